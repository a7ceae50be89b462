"""shrink_core: the library behind the shrink dashboard and CLI. Never imports streamlit."""

__version__ = "0.1.0"
