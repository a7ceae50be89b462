"""User-facing errors: one sentence that says what is wrong and how to fix it."""


class ShrinkError(Exception):
    """An error caused by the user's input or environment, shown as its message alone (no traceback)."""


class ModelLoadError(ShrinkError):
    """A model spec could not be resolved or loaded."""


class JobCancelled(Exception):
    """Raised inside a worker when the user cancels its job."""
