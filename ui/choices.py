"""Choices the pages offer, drawn from the registries (slices, settings), so a slice the user adds is offered too."""
from __future__ import annotations

from shrink_core.evaluation.slices import list_slices


def slice_ids(*kinds: str) -> list[str]:
    """Every registered slice id (built-in, then the user's), optionally only of these kinds ("text", "task", ...)."""
    return [s.id for s in list_slices() if not kinds or s.kind in kinds]


def defaults(preferred, available: list[str], fallback: int = 1) -> list[str]:
    """The preferred ids that exist, in order; else the first `fallback` available ones."""
    chosen = [s for s in preferred if s in available]
    return chosen or available[:fallback]
