import json
import subprocess
import sys

import pytest

from shrink_core.paths import REPO_ROOT


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "shrink_core", *args], capture_output=True, text=True,
                          cwd=REPO_ROOT, env=env, timeout=600)


@pytest.mark.parametrize(
    "args, code, words",
    [
        (["inspect", "--bogus"], 2, "unrecognized arguments: --bogus"),
        (["frobnicate"], 2, "invalid choice"),
        (["inspect", "--model", "/no/such/dir"], 1, "does not exist"),
        (["inspect", "--model", "builtin:gpt5"], 1, "Unknown built-in model"),
        (["plan", "--budget-mb", "100", "--settings", "w9g7", "--out", "p.yaml"], 1, "cannot use setting 'w9g7'"),
        (["plan", "--budget-mb", "100", "--slices", "en,klingon", "--out", "p.yaml"], 1, "no slice 'klingon'"),
        (["plan", "--out", "p.yaml"], 2,
         "one of the arguments --budget-mb --budget-bits --budget-latency-ms is required"),
        (["plan", "--budget-latency-ms", "40", "--out", "p.yaml"], 1, "--budget-latency-ms needs --target"),
        (["plan", "--budget-mb", "100", "--max-2bit-per-block", "-1", "--out", "p.yaml"], 1,
         "2-bit modules per block must be a whole number >= 0, not -1"),
        (["plan", "--budget-latency-ms", "40", "--target", "cray-1", "--out", "p.yaml"], 1, "Unknown target 'cray-1'"),
        (["eval", "--slices", "en", "--protocol", "huge"], 2, "invalid choice: 'huge'"),
    ],
)
def test_bad_input_is_one_line_on_stderr(args, code, words):
    result = cli(*args)
    assert result.returncode == code
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and lines[0].startswith("error: ")
    assert result.stdout == ""


def test_inspect_tiny_directory_json(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "tiny")
    result = cli("inspect", "--model", str(tmp_path / "tiny"), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["summary"]["block_linears"] == 21
    # per block q 64x64, k and v 32x64, o 64x64, gate/up/down 128x64 each, two norms of 64; a tied 256x64 embedding
    assert report["summary"]["parameters"] == 3 * (2 * 4096 + 2 * 2048 + 3 * 8192 + 2 * 64) + 256 * 64 + 64
    assert {m["kind"] for m in report["modules"]} >= {"q", "down", "embedding", "lm_head"}


@pytest.mark.integration
def test_inspect_builtin_default():
    result = cli("inspect", "--model", "builtin:smollm2-135m", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["summary"]["parameters"] == 134_515_008
    assert report["summary"]["block_linears"] == 210
    assert report["summary"]["blocks"] == 30
    assert report["summary"]["tied_modules"] == ["lm_head"]
    assert report["from_cache"] is True  # the session fixture or an earlier run converted it
