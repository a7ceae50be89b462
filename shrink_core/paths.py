"""Where shrink keeps its state on disk."""
from __future__ import annotations

import os
import re
from pathlib import Path

from shrink_core.errors import ShrinkError

REPO_ROOT = Path(__file__).resolve().parent.parent


def shrink_home() -> Path:
    """`$SHRINK_HOME`, default `~/.cache/shrink`; created on first use."""
    home = Path(os.environ.get("SHRINK_HOME") or Path.home() / ".cache" / "shrink").expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home


def model_cache_dir() -> Path:
    """Dequantized copies of GGUF models (model/load.py `_gguf_cache`); `$SHRINK_MODEL_CACHE` lets several homes (tests)
    share one."""
    override = os.environ.get("SHRINK_MODEL_CACHE")
    path = Path(override).expanduser() if override else shrink_home() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------- names users give that become paths

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
NAME_RULE = "letters, digits, '.', '_' or '-', starting with a letter or digit, at most 64 characters"


def safe_name(name, what: str = "name") -> str:
    """A user-given name that becomes a file or folder name; anything that could leave its folder is refused."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
        raise ShrinkError(f"The {what} {name!r} is not valid; use {NAME_RULE}.")
    return name


def safe_join(folder: Path | str, *parts: str) -> Path:
    """`folder / parts...`, refused unless the resolved result (symlinks followed) stays inside `folder`."""
    base = Path(folder).resolve()
    path = base.joinpath(*parts).resolve()
    if path == base or base not in path.parents:
        raise ShrinkError(f"The path {Path(folder, *parts)} leads outside {base}; use a plain name ({NAME_RULE}).")
    return path


def check_writable(out: Path | str, what: str = "--out", directory: bool = False, replace: bool = False) -> Path:
    """Refuse, before any work, an output path that cannot be written: its nearest existing folder is read-only,
    something in the way is a file, or a file is asked for where a folder is. `replace`: the output is written beside
    and renamed into place, so its parent folder must be writable too."""
    path = Path(out).expanduser()
    if path.exists() and path.is_dir() != directory:
        kind = "a folder" if path.is_dir() else "a file"
        raise ShrinkError(f"{what} {path} is {kind}; give {'a folder' if directory else 'a file name'} instead.")
    checks = []
    if path.exists():  # written in place (a file, or files into a folder), or removed when replaced
        checks.append((path, os.W_OK | (os.X_OK if directory else 0)))
    if replace or not path.exists():  # created, or written beside and renamed: its folder must take new entries
        existing = path.parent
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise ShrinkError(f"{what} {path} cannot be created because {existing} is a file, not a folder.")
        checks.append((existing, os.W_OK | os.X_OK))
    for place, mode in checks:
        if not os.access(place, mode):
            raise ShrinkError(f"{what} {path} cannot be written: {place} is read-only for you; choose another place.")
    return path


def check_replaceable(out: Path, what: str, marker: str) -> None:
    """A folder about to be replaced whole must be new, empty, or an earlier output (it holds `marker`)."""
    if out.is_dir() and any(out.iterdir()) and not (out / marker).is_file():
        raise ShrinkError(f"{what} {out} already holds other files, and writing there replaces the whole folder; "
                          "give a new or empty folder.")
