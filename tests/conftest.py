import os
import shutil
import tempfile
from pathlib import Path

import pytest

from .jobwait import kill_workers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests that use a throw-away SHRINK_HOME still share the converted built-in models.
_home = os.environ.get("SHRINK_HOME") or os.path.expanduser("~/.cache/shrink")
os.environ.setdefault("SHRINK_MODEL_CACHE", os.path.join(_home, "models"))


def pytest_report_header(config):
    """Free disk where the suite writes: the first thing to read when a run fails for space (the whole suite peaks at
    a few GB: the converted built-in models under $SHRINK_HOME, one test's exports or checkpoints at a time)."""
    free = []
    for label, place in {"temporary root": Path(tempfile.gettempdir()), "$SHRINK_HOME": Path(_home)}.items():
        existing = next(p for p in (place, *place.parents) if p.is_dir())  # a fresh $SHRINK_HOME does not exist yet
        free.append(f"{shutil.disk_usage(existing).free / 2**30:.1f} GiB free at the {label} ({place})")
    return "shrink: " + "; ".join(free)


@pytest.fixture
def tiny_model():
    from shrink_core.model.toy import tiny_llama

    return tiny_llama()


@pytest.fixture
def toy_dir(tmp_path):
    """A tiny Llama saved as a model directory (safetensors) with a byte-level fast tokenizer: a spec `load` takes."""
    from shrink_core.model.toy import tiny_llama
    from tests.test_evaluate import byte_level_tokenizer

    directory = tmp_path / "toy-model"
    tiny_llama(vocab=258).save_pretrained(directory, safe_serialization=True)
    byte_level_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture
def shrink_home(tmp_path, monkeypatch):
    """An empty SHRINK_HOME for tests that write state (store, caches); at teardown, every job worker whose store lies
    under it is killed (with its process group), so no test leaves a worker running."""
    home = tmp_path / "shrink-home"
    monkeypatch.setenv("SHRINK_HOME", str(home))
    yield home
    kill_workers(home)


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory, request):
    """A directory for the files one test module shares (exports of the real model, hundreds of MB), removed when the
    module is done, so the suite holds one module's exports at a time, not the sum over the suite."""
    path = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def _test_root(tmp_path_factory):
    """This session's temporary root (every test's tmp_path lies under it); at the end, no worker under it survives."""
    root = tmp_path_factory.getbasetemp()
    yield root
    kill_workers(root)


@pytest.fixture(autouse=True)
def _no_worker_outlives_its_test(_test_root, request):
    """Guard: a job worker still running under this session's temporary root after a test (its fixtures torn down)
    is killed, and the test errors at teardown, naming the pids."""
    yield
    left = kill_workers(_test_root)
    if left:
        pytest.fail(f"{request.node.nodeid} left job workers running (pids {left}); they were killed. Use the "
                    "shrink_home fixture (it kills the workers under it at teardown).", pytrace=False)


@pytest.fixture(scope="session")
def smollm2():
    """The real built-in model, loaded once per test session (from the fp32 cache after the first run)."""
    from shrink_core.model.load import load

    return load("builtin:smollm2-135m")


@pytest.fixture(scope="session")
def _scanned_template(tmp_path_factory):
    """A SHRINK_HOME made once per session: the default model's inventory (what the Model page stores on load), a
    user's own slice `user_notes` (six short paragraphs, uploaded as the Eval sets page would) and a small real fast
    scan of it (settings w4g64, w3g64; quick depth). A flow that runs a plan evaluates the three notes in seconds,
    where the built-in `en` would take minutes on 2 cores; the flows under test are the same."""
    import sqlite3

    from shrink_core.evaluation.slices import add_user_records, get_slice, load_rows
    from shrink_core.model.describe import describe
    from shrink_core.model.load import load
    from shrink_core.results.store import Store
    from shrink_core.sensitivity import run_scan

    home = tmp_path_factory.mktemp("scanned") / "shrink-home"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SHRINK_HOME", str(home))
        store = Store()
        store.save_model(describe("builtin:smollm2-135m"))
        notes = add_user_records([{"text": row["text"]} for row in load_rows(get_slice("toy_en"), split=None)],
                                 "notes.jsonl")
        run_scan(load("builtin:smollm2-135m"), [notes.id], ["w4g64", "w3g64"], "fast", "quick", store=store)
        store.close()
    with sqlite3.connect(home / "shrink.db") as db:  # fold the write-ahead log in: the copy is one file
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return home


@pytest.fixture
def scanned_home(shrink_home, _scanned_template):
    """`shrink_home` holding a copy of the session's scanned store (see `_scanned_template`)."""
    import shutil

    shutil.copytree(_scanned_template, shrink_home, dirs_exist_ok=True)
    return shrink_home
