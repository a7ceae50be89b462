"""Evaluation slices: the built-in registry (evalsets/), user slices, and calibration mixes.

Built-in slices are committed files described by evalsets/manifest.json. User slices live in
$SHRINK_HOME/slices/ with a manifest of their own, so a bad upload can never touch the built-in ones.
"""
from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from shrink_core.errors import ShrinkError
from shrink_core.paths import REPO_ROOT, SAFE_NAME, safe_join, safe_name, shrink_home

BUILTIN_DIR = REPO_ROOT / "evalsets"
TOY_DIR = REPO_ROOT / "evalsets" / "toy"
CALIB_FRACTION = 0.25


class SliceError(ShrinkError):
    """A slice that does not exist or a user file that cannot become one."""


@dataclass(frozen=True)
class SliceInfo:
    id: str
    title: str
    kind: str  # "text" | "task" | "pairs"
    metric: str  # "ppl" | "accuracy"
    languages: tuple[str, ...]
    source: tuple[str, ...]
    license: str
    rows: int
    rows_calib: int
    rows_eval: int
    tokens: int
    path: Path
    description: str = ""
    protocol: str = ""
    user: bool = False

    def row(self) -> dict:
        data = asdict(self)
        data["path"] = str(self.path)
        data["languages"] = ", ".join(self.languages)
        data["source"] = ", ".join(self.source)
        return data


def _read_manifest(directory: Path, user: bool) -> list[SliceInfo]:
    path = directory / "manifest.json"
    if not path.is_file():
        return []
    manifest = json.loads(path.read_text())
    infos = []
    for entry in manifest["slices"]:
        if user and not SAFE_NAME.fullmatch(str(entry.get("id"))):
            continue  # written by an older version that let a name leave the folder; never read or write through it
        infos.append(
            SliceInfo(
                id=entry["id"],
                title=entry.get("title", entry["id"]),
                kind=entry["kind"],
                metric=entry["metric"],
                languages=tuple(entry.get("languages") or entry.get("programming_languages") or ()),
                source=tuple(entry.get("source", ())),
                license=entry.get("license", "unknown"),
                rows=entry["rows"],
                rows_calib=entry["rows_calib"],
                rows_eval=entry["rows_eval"],
                tokens=entry.get("tokens", 0),
                path=directory / "data" / f"{entry['id']}.jsonl.gz",
                description=entry.get("description", ""),
                protocol=entry.get("protocol", ""),
                user=user,
            )
        )
    return infos


def _checked_id(slice_id) -> str:
    """A user slice id is a file name: one validator for every name that becomes a path (shrink_core.paths)."""
    try:
        return safe_name(slice_id, "slice id")
    except ShrinkError as exc:
        raise SliceError(str(exc)) from None


def _data_path(directory: Path, slice_id: str) -> Path:
    """Where a user slice's rows live; the id is checked, and the path must stay inside the slices folder."""
    return safe_join(directory / "data", f"{_checked_id(slice_id)}.jsonl.gz")


def user_dir() -> Path:
    path = shrink_home() / "slices"
    (path / "data").mkdir(parents=True, exist_ok=True)
    return path


def list_slices(include_toy: bool = False) -> list[SliceInfo]:
    """Built-in slices, then the user's own (then the toy set, for tests)."""
    infos = _read_manifest(BUILTIN_DIR, user=False) + _read_manifest(user_dir(), user=True)
    if include_toy:
        infos += _read_manifest(TOY_DIR, user=False)
    return infos


def get_slice(slice_id: str) -> SliceInfo:
    for info in list_slices(include_toy=True):
        if info.id == slice_id:
            return info
    known = ", ".join(s.id for s in list_slices())
    raise SliceError(f"There is no slice '{slice_id}'; choose from: {known}.")


def parse_slice_list(text: str) -> list[SliceInfo]:
    ids = [part.strip() for part in text.split(",") if part.strip()]
    if not ids:
        raise SliceError("No slices given; pass e.g. --slices en,fr.")
    return [get_slice(slice_id) for slice_id in ids]


@lru_cache(maxsize=64)
def _rows_cached(path: str, sha: str) -> tuple[dict, ...]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return tuple(json.loads(line) for line in handle)


def load_rows(info: SliceInfo, split: str | None = "eval") -> list[dict]:
    """The rows of one split ("eval" or "calib"; None for all), in file order."""
    stat = info.path.stat()
    rows = _rows_cached(str(info.path), f"{stat.st_size}:{stat.st_mtime_ns}")
    return [r for r in rows if split is None or r["split"] == split]


# ---------------------------------------------------------------- user slices


MAX_UPLOAD_BYTES = 50 * 1024 * 1024
MAX_ROW_ERRORS = 5


def _decode(data: bytes, name: str) -> str:
    if not data.strip():
        raise SliceError(f"The file {name} is empty; add rows (JSON lines, CSV with a header, or text paragraphs).")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SliceError(
            f"The file {name} is not UTF-8 text (byte 0x{data[exc.start]:02x} at position {exc.start}); "
            "save it as UTF-8 and try again."
        ) from None


def _parse_records(text: str, name: str) -> list:
    suffix = Path(name).suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        stripped = text.lstrip()
        if suffix == ".json" and stripped.startswith("["):
            try:
                return json.loads(text)
            except json.JSONDecodeError as exc:
                raise SliceError(f"The file {name} is not valid JSON ({exc.msg} at line {exc.lineno}).") from None
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise SliceError(f"row {number}: not valid JSON ({exc.msg} at column {exc.colno}).") from None
        return records
    if suffix == ".csv":
        import csv
        import io

        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames:
            raise SliceError(f"The CSV file {name} has no header row; its first line must name the columns (e.g. text).")
        records = []
        for row in reader:
            if row.get("choices"):
                try:
                    row["choices"] = json.loads(row["choices"])
                except json.JSONDecodeError:
                    pass  # validation reports it as "must be a list"
            if row.get("answer", "").strip().lstrip("-").isdigit() and "choices" in row:
                row["answer"] = int(row["answer"])
            records.append({k: v for k, v in row.items() if k is not None and v not in (None, "")})
        return records
    if suffix in (".txt", ".md", ""):
        paragraphs = [p.strip() for p in text.replace("\r\n", "\n").split("\n\n")]
        return [{"text": p} for p in paragraphs if p]
    raise SliceError(f"The file {name} has an unsupported type '{suffix}'; use .jsonl, .json, .csv or .txt.")


def validate_rows(records: list) -> tuple[str, list[str]]:
    """Returns (kind, errors); errors are row-level sentences like "row 17: field 'choices' must be a list"."""
    errors: list[str] = []
    kind = None
    for number, record in enumerate(records, start=1):
        if len(errors) >= MAX_ROW_ERRORS:
            break
        if not isinstance(record, dict):
            errors.append(f"row {number}: must be an object with fields, got {type(record).__name__}")
            continue
        row_kind = "text" if "text" in record else "task" if "context" in record else None
        if row_kind is None:
            errors.append(f"row {number}: needs a field 'text' (for perplexity) or 'context' and 'answer' (for a task)")
            continue
        kind = kind or row_kind
        if row_kind != kind:
            errors.append(f"row {number}: is a {row_kind} row but earlier rows are {kind} rows; keep one kind per file")
            continue
        if kind == "text":
            if not isinstance(record["text"], str) or not record["text"].strip():
                errors.append(f"row {number}: field 'text' must be a non-empty string")
            continue
        if not isinstance(record["context"], str):
            errors.append(f"row {number}: field 'context' must be a string")
        elif "answer" not in record:
            errors.append(f"row {number}: field 'answer' is missing")
        elif "choices" in record:
            choices = record["choices"]
            if not isinstance(choices, list) or len(choices) < 2:
                errors.append(f"row {number}: field 'choices' must be a list of at least two strings")
            elif not all(isinstance(c, str) for c in choices):
                errors.append(f"row {number}: every entry of 'choices' must be a string")
            elif not isinstance(record["answer"], int) or not 0 <= record["answer"] < len(choices):
                errors.append(f"row {number}: field 'answer' must be the index (0 to {len(choices) - 1}) of the right choice")
        elif not isinstance(record["answer"], str) or not record["answer"].strip():
            errors.append(f"row {number}: field 'answer' must be a non-empty string (or add 'choices' for multiple choice)")
    return kind or "text", errors


def _split_for(key: str) -> str:
    digest = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
    return "calib" if digest / 0xFFFFFFFF < CALIB_FRACTION else "eval"


def _normalise(records: list[dict], kind: str, source: str) -> list[dict]:
    rows = []
    for number, record in enumerate(records, start=1):
        row = dict(record)
        row.setdefault("id", f"row{number}")
        row["id"] = str(row["id"])
        if kind == "task":
            row["task"] = "mc" if "choices" in row else "exact"
        if row.get("split") not in ("calib", "eval"):
            row["split"] = _split_for(row.get("text") or row["context"])
        row.setdefault("source", source)
        row.setdefault("license", "user-provided")
        rows.append(row)
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise SliceError(f"The field 'id' must be unique, but '{duplicate}' appears more than once.")
    return rows


def slice_id_from(name: str) -> str:
    stem = Path(name).name.split(".")[0].lower()
    cleaned = "".join(ch if ch.isalnum() else "_" for ch in stem).strip("_") or "user"
    return f"user_{cleaned}"[:40]


def add_user_slice(name: str, data: bytes, slice_id: str | None = None, title: str | None = None) -> SliceInfo:
    """Validate a user file and add it as a slice. Nothing is written unless every row is valid."""
    if len(data) > MAX_UPLOAD_BYTES:
        raise SliceError(
            f"The file {name} is {len(data) / 1e6:.0f} MB, over the {MAX_UPLOAD_BYTES // (1024 * 1024)} MB limit; "
            "split it, or sample it down."
        )
    records = _parse_records(_decode(data, name), name)
    return add_user_records(records, name, slice_id=slice_id, title=title)


def add_user_records(records: list, name: str, slice_id: str | None = None, title: str | None = None) -> SliceInfo:
    if not records:
        raise SliceError(f"The file {name} has no rows; add rows (JSON lines, CSV with a header, or text paragraphs).")
    kind, errors = validate_rows(records)
    if errors:
        more = " (and more)" if len(errors) >= MAX_ROW_ERRORS else ""
        raise SliceError("; ".join(errors) + more + ".")
    slice_id = _checked_id(slice_id or slice_id_from(name))
    if any(s.id == slice_id and not s.user for s in list_slices(include_toy=True)):
        raise SliceError(f"'{slice_id}' is the name of a built-in slice; choose another name.")
    rows = _normalise(records, kind, source=f"user:{Path(name).name}")
    directory = user_dir()
    target = _data_path(directory, slice_id)
    payload = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode()
    tmp = target.with_name(target.name + ".partial")
    with gzip.GzipFile(tmp, "wb", mtime=0) as handle:
        handle.write(payload)
    tmp.replace(target)
    entry = {
        "id": slice_id, "title": title or f"User: {Path(name).name}", "kind": kind,
        "metric": "ppl" if kind == "text" else "accuracy", "languages": [], "source": [f"user:{Path(name).name}"],
        "license": "user-provided", "rows": len(rows), "rows_calib": sum(r["split"] == "calib" for r in rows),
        "rows_eval": sum(r["split"] == "eval" for r in rows), "tokens": 0,
        "sha256": hashlib.sha256(target.read_bytes()).hexdigest(),
        "description": f"Uploaded from {Path(name).name}.",
        "protocol": "Same protocol as the built-in slices of this kind.",
    }
    manifest_path = directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"version": 1, "slices": []}
    manifest["slices"] = [s for s in manifest["slices"] if s["id"] != slice_id] + [entry]
    tmp_manifest = manifest_path.with_suffix(".partial")
    tmp_manifest.write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
    tmp_manifest.replace(manifest_path)
    return get_slice(slice_id)


def remove_user_slice(slice_id: str) -> None:
    """Remove one user slice: its manifest entry and its rows. A built-in or unknown id is refused."""
    _checked_id(slice_id)
    directory = user_dir()
    manifest_path = directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"version": 1, "slices": []}
    if not any(s["id"] == slice_id for s in manifest["slices"]):
        if any(s.id == slice_id for s in list_slices(include_toy=True)):
            raise SliceError(f"'{slice_id}' is a built-in slice; only slices you added can be removed.")
        mine = ", ".join(s.id for s in list_slices() if s.user) or "none yet"
        raise SliceError(f"There is no user slice '{slice_id}' to remove; your slices: {mine}.")
    target = _data_path(directory, slice_id)
    manifest["slices"] = [s for s in manifest["slices"] if s["id"] != slice_id]
    tmp_manifest = manifest_path.with_suffix(".partial")
    tmp_manifest.write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
    tmp_manifest.replace(manifest_path)
    target.unlink(missing_ok=True)


def load_dataset_records(path_or_name: str, split: str = "train") -> list[dict]:
    """A file, a folder of files, or a `datasets`-loadable dataset name, as plain records."""
    import datasets

    path = Path(path_or_name).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".jsonl", ".json", ".csv", ".txt"))
        if not files:
            raise SliceError(f"The folder {path} has no .jsonl, .json, .csv or .txt files.")
        records = []
        for file in files:
            records += _parse_records(_decode(file.read_bytes(), file.name), file.name)
        return records
    if path.is_file():
        return _parse_records(_decode(path.read_bytes(), path.name), path.name)
    try:
        dataset = datasets.load_dataset(path_or_name, split=split)
    except Exception as exc:  # datasets raises many types for "not found" and "offline"
        raise SliceError(
            f"Could not load '{path_or_name}' as a file, folder or dataset ({type(exc).__name__}); "
            "check the path, or the dataset name and split."
        ) from None
    return [dict(row) for row in dataset]
