import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests that use a throw-away SHRINK_HOME still share the converted built-in models.
_home = os.environ.get("SHRINK_HOME") or os.path.expanduser("~/.cache/shrink")
os.environ.setdefault("SHRINK_MODEL_CACHE", os.path.join(_home, "models"))


@pytest.fixture
def tiny_model():
    from shrink_core.model.toy import tiny_llama

    return tiny_llama()


@pytest.fixture
def shrink_home(tmp_path, monkeypatch):
    """An empty SHRINK_HOME for tests that write state (store, caches)."""
    home = tmp_path / "shrink-home"
    monkeypatch.setenv("SHRINK_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def smollm2():
    """The real built-in model, loaded once per test session (from the fp32 cache after the first run)."""
    from shrink_core.model.load import load

    return load("builtin:smollm2-135m")
