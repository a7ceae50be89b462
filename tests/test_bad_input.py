"""Bad input, tried as a new user would: every case is one sentence, a non-zero exit, and nothing lost or touched.

Each CLI row runs `python -m shrink_core`'s `main` in a sandbox folder holding $SHRINK_HOME (with one user slice),
a file beside it that a path could reach, and folders to write into. The whole sandbox is fingerprinted before and
after: only the row's allowed folders may change. Page rows drive the Eval sets uploader the same way.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from shrink_core.cli.entry import main
from shrink_core.paths import REPO_ROOT

PLAN_NAME_5 = "version: 1\nrules:\n  - name: 5\n    keep: true\n"


def _bert_encoder(directory: Path) -> None:
    """A BERT encoder checkpoint (no LM head): loading it as a causal LM would leave the head random."""
    import torch
    from safetensors.torch import save_file
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    directory.mkdir()
    config.save_pretrained(directory)
    save_file({k: v.contiguous() for k, v in BertModel(config).state_dict().items()}, directory / "model.safetensors")


@dataclass(frozen=True)
class Row:
    id: str
    argv: tuple[str, ...]
    sentence: str  # regex the one stderr line must match
    code: int = 1
    allowed: tuple[str, ...] = ()  # sandbox folders that may change (state the command opens, e.g. home/shrink.db)
    setup: tuple[str, ...] = ()  # "bert", "tiny", "store", "plan5", "readonly", "notes"


CLI_ROWS = [
    Row("slice-add-traversal", ("slices", "add", "notes.txt", "--id", "../../../x"),
        r"slice id '\.\./\.\./\.\./x' is not valid"),
    Row("slice-add-one-level-up", ("slices", "add", "notes.txt", "--id", "../manifest"),
        r"slice id '\.\./manifest' is not valid"),
    Row("slice-remove-traversal", ("slices", "remove", "../../../victim"), r"slice id '\.\./\.\./\.\./victim' is not valid"),
    Row("slice-remove-missing", ("slices", "remove", "no_such_slice"), r"no user slice 'no_such_slice'.*your slices: mine"),
    Row("slice-remove-builtin", ("slices", "remove", "en"), r"'en' is a built-in slice"),
    Row("encoder-as-causal-lm", ("inspect", "--model", "bert"),
        r"lacks 6 weights that BertLMHeadModel needs \(cls\.predictions\.bias, .* and 3 more\)", setup=("bert",)),
    Row("report-readonly-out", ("report", "--out", "ro/report.html"), r"--out ro/report\.html cannot be written: ro is read-only",
        allowed=("home",), setup=("readonly", "store")),
    Row("report-out-under-a-file", ("report", "--out", "notes.txt/report.html"), r"because notes\.txt is a file",
        allowed=("home",), setup=("store",)),
    Row("apply-readonly-out", ("apply", "--model", "tiny", "--plan", "preset:w8", "--out", "ro/candidate"),
        r"--out ro/candidate cannot be written: ro is read-only", setup=("readonly", "tiny")),
    Row("apply-out-holds-other-files", ("apply", "--model", "tiny", "--plan", "preset:w8", "--out", "notes"),
        r"--out notes already holds other files", setup=("notes", "tiny")),
    Row("candidates-export-readonly-out", ("candidates", "export", "1", "--out", "ro/exports"),
        r"--out ro/exports cannot be written: ro is read-only", allowed=("home",), setup=("readonly", "store")),
    Row("plan-readonly-out", ("plan", "--model", "tiny", "--budget-mb", "1", "--out", "ro/plan.yaml"),
        r"--out ro/plan\.yaml cannot be written: ro is read-only", setup=("readonly", "tiny")),
    Row("distill-out-holds-other-files", ("distill", "--teacher", "tiny", "--out", "notes", "--steps", "1"),
        r"--out notes already holds other files", setup=("notes", "tiny")),
    Row("distill-mix-not-a-number", ("distill", "--mix", "en=abc", "--steps", "1"),
        r"calibration weight 'abc' for slice 'en' is not a number"),
    Row("apply-calibration-not-a-number", ("apply", "--model", "tiny", "--plan", "preset:w4g64", "--out", "cand",
                                           "--calibration", '{"mix": {"en": "abc"}}'),
        r"calibration weight 'abc' for slice 'en' is not a number", setup=("tiny",)),
    Row("apply-calibration-not-json", ("apply", "--model", "tiny", "--plan", "preset:w8", "--out", "cand",
                                       "--calibration", "{en: 1"), r"--calibration is not valid JSON", setup=("tiny",)),
    Row("plan-rule-name-not-a-string", ("apply", "--model", "tiny", "--plan", "plan5.yaml", "--out", "cand"),
        r"Rule 1: name must be a string, not 5", setup=("plan5", "tiny")),
    Row("plan-rule-keep-not-true-or-false", ("apply", "--model", "tiny", "--out", "cand", "--plan",
                                             "version: 1\nrules:\n  - {kind: q, keep: 'no'}\n"),
        r"Rule 1: keep must be true or false, not 'no'", setup=("tiny",)),
    Row("plan-name-not-a-string", ("apply", "--model", "tiny", "--out", "cand", "--plan",
                                   "version: 1\nname: 2024\nrules:\n  - {kind: q, keep: true}\n"),
        r"The plan's name must be a string, not 2024", setup=("tiny",)),
    Row("apply-model-without-tokenizer", ("apply", "--model", "tiny", "--plan", "preset:w8", "--out", "cand"),
        r"The model tiny has no tokenizer, which a saved candidate needs", allowed=("home",), setup=("tiny",)),
]


def _fingerprint(root: Path) -> dict[str, str]:
    """Every file and folder under root, with a digest of each file's bytes."""
    seen = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        try:
            seen[key] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
        except FileNotFoundError:  # sqlite's -shm/-wal files come and go with the store's connections
            continue
    return seen


def _make_readonly(path: Path) -> None:
    """A folder this process cannot write: mode 555, or for root (who ignores modes) the immutable attribute."""
    path.mkdir()
    path.chmod(0o555)
    if os.geteuid() == 0:
        done = subprocess.run(["chattr", "+i", str(path)], check=False, capture_output=True) if shutil.which("chattr") else None
        if done is None or done.returncode != 0:
            pytest.skip("running as root on a file system without chattr +i: no folder is read-only to root here")


def _release(path: Path) -> None:
    if path.exists():
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(path)], check=False, capture_output=True)
        path.chmod(0o755)


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    from shrink_core.evaluation.slices import add_user_slice

    root = tmp_path / "sandbox"
    root.mkdir()
    monkeypatch.setenv("SHRINK_HOME", str(root / "home"))
    monkeypatch.chdir(root)
    add_user_slice("mine.txt", b"A paragraph of mine.\n\nAnother one.", slice_id="mine")
    (root / "notes.txt").write_text("First note.\n\nSecond note.\n")
    (root / "victim.jsonl.gz").write_bytes(b"precious")  # what ../../../victim from home/slices/data reaches
    yield root
    _release(root / "ro")


def _setup(root: Path, row: Row) -> None:
    if "bert" in row.setup:
        _bert_encoder(root / "bert")
    if "tiny" in row.setup:  # a small model, so a row that got past its check on older code still ends quickly
        from shrink_core.model.toy import tiny_llama

        tiny_llama().save_pretrained(root / "tiny")
    if "store" in row.setup:  # candidates with results, so a report or an export has something to write
        from shrink_core.results.store import Store

        from .test_candidates import seed_store

        seed_store(Store())
    if "plan5" in row.setup:
        (root / "plan5.yaml").write_text(PLAN_NAME_5)
    if "notes" in row.setup:
        (root / "notes").mkdir()
        (root / "notes" / "todo.txt").write_text("my own file")
    if "readonly" in row.setup:
        _make_readonly(root / "ro")


@pytest.mark.parametrize("row", CLI_ROWS, ids=[r.id for r in CLI_ROWS])
def test_cli_bad_input(sandbox, capsys, row):
    _setup(sandbox, row)
    capsys.readouterr()  # what the set-up printed is not the command's
    before = _fingerprint(sandbox)
    code = main(list(row.argv))
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == row.code, captured.err
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(row.sentence, lines[0]), lines
    assert lines[0].endswith("."), lines[0]
    assert captured.out == ""
    after = _fingerprint(sandbox)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert {k for k in changed if not any(k == a or k.startswith(a + os.sep) for a in row.allowed)} == set()


def test_a_good_slice_id_still_adds_and_removes(sandbox, capsys):
    """The validator refuses names that leave the folder, not ordinary ones."""
    assert main(["slices", "add", "notes.txt", "--id", "field-notes.v2"]) == 0
    data = sandbox / "home" / "slices" / "data"
    assert (data / "field-notes.v2.jsonl.gz").is_file()
    assert main(["slices", "remove", "field-notes.v2"]) == 0
    assert not (data / "field-notes.v2.jsonl.gz").exists() and (data / "mine.jsonl.gz").is_file()
    manifest = json.loads((sandbox / "home" / "slices" / "manifest.json").read_text())
    assert [s["id"] for s in manifest["slices"]] == ["mine"]
    assert "removed slice 'field-notes.v2'" in capsys.readouterr().out


# ---------------------------------------------------------------- the Eval sets page's uploader

PAGE = str(REPO_ROOT / "app_pages" / "evalsets.py")
PAGE_ROWS = [
    ("upload-id-traversal", "../../../x", False, r"slice id '\.\./\.\./\.\./x' is not valid"),
    ("upload-id-absolute", "/tmp/x", False, r"slice id '/tmp/x' is not valid"),
    ("upload-home-readonly", "fine", True, r"could not be saved .*check that \$SHRINK_HOME is writable"),
]


def _without_store(seen: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in seen.items() if not k.startswith("home/shrink.db")}  # the page opens its store


@pytest.mark.parametrize("case, slice_id, readonly_home, sentence", PAGE_ROWS, ids=[r[0] for r in PAGE_ROWS])
def test_page_upload_bad_input(sandbox, case, slice_id, readonly_home, sentence):
    from streamlit.testing.v1 import AppTest

    data_dir = sandbox / "home" / "slices" / "data"
    if readonly_home:
        shutil.move(data_dir, sandbox / "data-moved")
        _make_readonly(sandbox / "ro")
        data_dir.symlink_to(sandbox / "ro")
    before = _fingerprint(sandbox)
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    at.file_uploader(key="slice_upload").set_value(("notes.txt", b"First note.\n\nSecond note.", "text/plain"))
    at.run()
    at.text_input(key="slice_upload_id").set_value(slice_id)
    at.button(key="add_slice").click()
    at.run()
    assert not at.exception
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and re.search(sentence, errors[0]) and "\n" not in errors[0], errors
    assert not at.success
    assert _without_store(_fingerprint(sandbox)) == _without_store(before)
