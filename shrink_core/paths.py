"""Where shrink keeps its state on disk."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def shrink_home() -> Path:
    """`$SHRINK_HOME`, default `~/.cache/shrink`; created on first use."""
    home = Path(os.environ.get("SHRINK_HOME") or Path.home() / ".cache" / "shrink").expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home


def model_cache_dir() -> Path:
    """fp32 copies of GGUF models; `$SHRINK_MODEL_CACHE` lets several homes (tests) share one."""
    override = os.environ.get("SHRINK_MODEL_CACHE")
    path = Path(override).expanduser() if override else shrink_home() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path
