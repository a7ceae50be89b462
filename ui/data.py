"""The store as the pages see it. One connection per script run: cheap, and never shared across threads."""
from __future__ import annotations

from shrink_core.results.store import Store


def store() -> Store:
    return Store()
