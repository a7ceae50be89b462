"""The store as the pages see it: one connection per store file for the whole app, and reads cached until the
store changes.

Every page gets the store from `store()`. Its read methods (results, candidates, models, plans, metrics) are
`st.cache_data` entries keyed on the store file and its change counter (`Store.change_counter`: bumped by every
write, from this app or from a worker process), so a rerun re-reads and re-parses nothing that did not change, and
one rerun reads each thing once however many helpers ask for it. Writes and job calls go to the Store itself.

A store file that cannot be read is reported in one sentence and never touched; a button starts a new store beside it.
"""
from __future__ import annotations

import os

import streamlit as st

from shrink_core.results.store import STORE_ENV, Store, StoreUnreadable, default_path

CACHED_READS = ("results", "candidates", "latest_model", "model_specs", "plans", "metrics", "overview", "devices")


@st.cache_resource(show_spinner=False)
def _open(path: str) -> Store:
    return Store(path)  # check_same_thread=False: shared by the app's sessions; SQLite serializes the calls


@st.cache_data(show_spinner=False, max_entries=512)
def _read(path: str, counter: tuple[int, int], method: str, args: tuple, kwargs: tuple):
    """One read of the store, kept for as long as the counter says the store has not changed."""
    return getattr(_open(path), method)(*args, **dict(kwargs))


class CachedStore:
    """A Store whose reads come from the cache; everything else (writes, execute, path) is the Store's own."""

    def __init__(self, db: Store):
        self._db = db

    def __getattr__(self, name: str):
        attribute = getattr(self._db, name)
        if name not in CACHED_READS:
            return attribute
        path = str(self._db.path)

        def read(*args, **kwargs):
            return _read(path, self._db.change_counter(), name, args, tuple(sorted(kwargs.items())))

        return read


def store() -> CachedStore:
    """The app's store; on an unreadable store file, says so, offers a new store beside it and stops the page."""
    path = default_path()
    try:
        db = _open(str(path))
    except StoreUnreadable as exc:
        _offer_fresh_store(exc)
        st.stop()
    note = st.session_state.pop("fresh_store_note", None)
    if note:
        st.success(note)
    return CachedStore(db)


def _offer_fresh_store(exc: StoreUnreadable) -> None:
    st.error(f"The store {exc.path} cannot be read ({exc.reason}), so it was left as it is.")
    if st.button(f"Start a new store beside it ({exc.fresh.name})", key="start_fresh_store", type="primary"):
        _open(str(exc.fresh))  # creates and migrates the new file; the unreadable one is never opened for writing
        os.environ[STORE_ENV] = str(exc.fresh)  # this app and the workers it starts use the new store from now on
        st.session_state["fresh_store_note"] = (
            f"Started a new store at {exc.fresh}; {exc.path} is untouched. To keep using the new one after a "
            f"restart, start the app with {STORE_ENV}={exc.fresh}.")
        st.rerun()
    st.caption(f"The new store is an empty file next to it; {exc.path} stays as it is for you to inspect or restore. "
               f"The same works from the command line: {STORE_ENV}={exc.fresh} python -m shrink_core ...")
