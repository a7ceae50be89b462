"""Code and structured-format text: Python stdlib source, JSON, CSV, service logs, LaTeX."""

from __future__ import annotations

import ast
import gzip
import platform
import sysconfig
from pathlib import Path

from .common import PACKAGES, chunk_lines, deb_root, pick, split_for, wheel

CODE_MIN_CHARS, CODE_MAX_CHARS = 500, 2000
STDLIB_CHUNKS = 600
SKIPPED_STDLIB_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3"}


def _definitions(tree: ast.Module):
    """Top-level functions and classes; the methods of classes too large to keep whole."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node.name, node
            if isinstance(node, ast.ClassDef):
                for child in node.body:
                    if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        yield f"{node.name}.{child.name}", child


def _source_of(lines: list[str], node: ast.AST) -> str:
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    return "".join(lines[first - 1:node.end_lineno])


def stdlib_rows() -> list[dict]:
    """Function/class-sized pieces of the running interpreter's stdlib (tests skipped), deduplicated."""
    root = Path(sysconfig.get_paths()["stdlib"])
    source = f"cpython=={platform.python_version()}"
    candidates, seen = [], set()
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if SKIPPED_STDLIB_DIRS & set(relative.parts[:-1]) or relative.name.startswith("test_"):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        try:
            tree = ast.parse(text)
        except SyntaxError:  # a handful of stdlib files are deliberately invalid (e.g. bad_coding samples)
            continue
        lines = text.splitlines(keepends=True)
        module = ".".join(relative.with_suffix("").parts)
        for qualname, node in _definitions(tree):
            chunk = _source_of(lines, node).rstrip()
            if CODE_MIN_CHARS <= len(chunk) <= CODE_MAX_CHARS and chunk not in seen:
                seen.add(chunk)
                candidates.append((f"py:{module}:{qualname}", chunk))
    chosen = pick(candidates, lambda c: c[0], STDLIB_CHUNKS, "stdlib")
    return [{"id": row_id, "split": split_for(row_id), "source": source, "license": "PSF-2.0",
             "lang": "python", "subset": "stdlib", "text": chunk} for row_id, chunk in sorted(chosen)]


# ---------------------------------------------------------------- formats

FORMAT_MIN_CHARS, FORMAT_MAX_CHARS = 300, 1500
CHUNKS_PER_FORMAT = 200
CHUNKS_PER_FILE = 25  # so one big file cannot fill a format on its own


def _chunks(fmt: str, files: list[tuple[str, str]], package_name: str, license_: str) -> list[dict]:
    """Chunks of whole lines from each (name, text) file, at most CHUNKS_PER_FILE of them per file."""
    source = PACKAGES[package_name].source
    rows = []
    for name, text in files:
        indexed = list(enumerate(chunk_lines(text, FORMAT_MIN_CHARS, FORMAT_MAX_CHARS)))
        for index, chunk in pick(indexed, lambda c: f"{name}:{c[0]}", CHUNKS_PER_FILE, fmt):
            row_id = f"{fmt}:{name}:{index}"
            rows.append({"id": row_id, "split": split_for(row_id), "source": source, "license": license_,
                         "format": fmt, "text": chunk})
    return rows


def json_files() -> list[tuple[str, str]]:
    root = deb_root("iso-codes") / "usr/share/iso-codes/json"
    return [(p.stem, p.read_text(encoding="utf-8")) for p in sorted(root.glob("*.json"))]


def vega_files(suffix: str) -> list[tuple[str, str]]:
    archive = wheel("vega_datasets")
    names = sorted(n for n in archive.namelist() if n.startswith("vega_datasets/_data/") and n.endswith(suffix))
    return [(Path(name).stem, archive.read(name).decode("utf-8")) for name in names]


def _with_header(rows: list[dict], files: list[tuple[str, str]]) -> list[dict]:
    """A CSV chunk without its header line is just numbers; give every chunk the file's header."""
    headers = {name: text.splitlines()[0] for name, text in files}
    for row in rows:
        header = headers[row["id"].split(":")[1]]
        if not row["text"].startswith(header):
            row["text"] = header + "\n" + row["text"]
    return rows


def log_files() -> list[tuple[str, str]]:
    """fail2ban's test logs, minus its own annotation lines (# failJSON ...), which are not log output."""
    root = deb_root("fail2ban") / "usr/lib/python3/dist-packages/fail2ban/tests/files/logs"
    files = []
    for path in sorted(root.iterdir()):
        if path.is_file():
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
            kept = [line for line in lines if line.strip() and not line.startswith("#")]
            files.append((path.name, "\n".join(kept) + "\n"))
    return files


LATEX_PACKAGES = ("amsmath", "amscls", "base")  # documentation of the LaTeX kernel and AMS packages: all LPPL-1.3c


def latex_files() -> list[tuple[str, str]]:
    """LaTeX documentation sources: real LaTeX with math, environments and macro definitions."""
    root = deb_root("texlive-latex-base-doc") / "usr/share/doc/texlive-doc/latex"
    files = []
    for package in LATEX_PACKAGES:
        for path in sorted((root / package).glob("*.tex*")):
            raw = path.read_bytes()
            text = (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode("utf-8", errors="replace")
            files.append((f"{package}/{path.name.split('.')[0]}", text))
    return files


def formats_slice() -> list[dict]:
    csvs = vega_files(".csv")
    by_format = {
        "json": _chunks("json", json_files(), "iso-codes", "LGPL-2.1+")
        + _chunks("json", vega_files(".json"), "vega_datasets", "BSD-3-Clause (vega_datasets)"),
        "csv": _with_header(_chunks("csv", csvs, "vega_datasets", "BSD-3-Clause (vega_datasets)"), csvs),
        "log": _chunks("log", log_files(), "fail2ban", "GPL-2.0+"),
        "latex": _chunks("latex", latex_files(), "texlive-latex-base-doc", "LPPL-1.3c"),
    }
    rows = []
    for fmt, candidates in by_format.items():
        rows += sorted(pick(candidates, lambda r: r["id"], CHUNKS_PER_FORMAT, fmt), key=lambda r: r["id"])
    return rows
