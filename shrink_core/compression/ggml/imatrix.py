"""The importance-matrix file `llama-quantize --imatrix` reads (llama.cpp as vendored in llama-cpp-python 0.3.36).

That version's `llama-imatrix` writes, and `llama-quantize` reads first, a GGUF file (common/imatrix-loader.cpp):
- key/values: general.type = "imatrix", imatrix.datasets (string array), imatrix.chunk_count and imatrix.chunk_size
  (uint32); llama-quantize refuses a GGUF imatrix without all three;
- per weight tensor `<name>.in_sum2`: F32, ggml shape (cols, n_mat): the sum over activation rows of x^2 per input
  column (n_mat = experts of a 3-D expert tensor, else 1); `<name>.counts`: F32, ggml shape (1, n_mat): rows summed.
  Trailing 1-sized dimensions are not written (a dense entry is (cols) and (1)), as ggml's own writer does.
llama-quantize uses in_sum2 / count per column. The older binary .dat format is read too (`read_imatrix`): it stores
mean * ncall per column, with ncall as the count, so sums / count is the same mean.
"""
from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from shrink_core.compression.ggml.gguf_file import write_atomically
from shrink_core.errors import ShrinkError

KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUMS, COUNTS = ".in_sum2", ".counts"


@dataclass(frozen=True)
class Imatrix:
    """entries: GGUF tensor name -> (sum of squared activations per input column, activation rows summed); for an
    expert tensor, sums (n_experts, cols) and counts a 1-D tensor per expert."""

    entries: dict[str, tuple[torch.Tensor, int | torch.Tensor]]
    datasets: tuple[str, ...]
    chunk_count: int
    chunk_size: int
    legacy: bool = False


def _entry_arrays(name: str, sums: torch.Tensor, count) -> tuple[np.ndarray, np.ndarray]:
    """(in_sum2, counts) as numpy float32, shaped as llama-imatrix writes them: (cols,) and (1,) for a dense weight,
    (n_mat, cols) and (n_mat, 1) for an expert tensor."""
    sums = torch.as_tensor(sums).detach().to(torch.float32)
    if sums.dim() not in (1, 2) or sums.numel() == 0:
        raise ShrinkError(f"The imatrix entry {name} must be a non-empty 1-D (cols) or 2-D (experts, cols) tensor.")
    if not torch.isfinite(sums).all() or (sums < 0).any():
        raise ShrinkError(f"The imatrix entry {name} holds negative or non-finite sums of squares; recompute it.")
    matrix = sums.reshape(-1, sums.shape[-1])
    counts = torch.as_tensor(count, dtype=torch.float64).reshape(-1)
    if counts.numel() == 1:
        counts = counts.expand(matrix.shape[0])
    if counts.numel() != matrix.shape[0] or (counts < 0).any():
        raise ShrinkError(f"The imatrix entry {name} needs one non-negative row count per matrix "
                          f"({matrix.shape[0]}), not {tuple(counts.shape)}.")
    counts = counts.to(torch.float32).reshape(-1, 1)
    if matrix.shape[0] == 1:  # ggml writes no trailing 1-sized dimensions: a dense entry is (cols,) and (1,)
        return matrix.reshape(-1).contiguous().numpy(), counts.reshape(1).numpy()
    return matrix.contiguous().numpy(), counts.numpy()


def write_imatrix(path, entries: Mapping[str, tuple[torch.Tensor, int]], *, dataset: str, chunks: int,
                  chunk_size: int) -> Path:
    """Write `entries` (GGUF tensor name -> (per-column sum of x^2, rows summed)) as a GGUF imatrix; atomic."""
    if not entries:
        raise ShrinkError("The imatrix has no entries; collect activations for at least one weight first.")
    if chunks < 0 or chunk_size < 0:
        raise ShrinkError("The imatrix chunk count and chunk size must be non-negative.")
    writer = gguf.GGUFWriter(None, "imatrix")
    writer.kv_data[0].pop("general.architecture")  # llama-imatrix writes none; keep the same keys
    writer.add_type("imatrix")
    writer.add_key_value(KEY_DATASETS, [dataset], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.STRING)
    writer.add_uint32(KEY_CHUNK_COUNT, int(chunks))
    writer.add_uint32(KEY_CHUNK_SIZE, int(chunk_size))
    for name in sorted(entries):  # llama-imatrix sorts too: the same data gives the same file
        sums, count = _entry_arrays(name, *entries[name])
        writer.add_tensor(name + SUMS, sums)
        writer.add_tensor(name + COUNTS, count)
    return write_atomically(writer, Path(path))


def _count(counts: np.ndarray) -> int | torch.Tensor:
    rounded = np.rint(counts.reshape(-1)).astype(np.int64)  # llama.cpp rounds the stored floats too
    return int(rounded[0]) if rounded.size == 1 else torch.from_numpy(rounded)


def _read_gguf(path: Path) -> Imatrix:
    reader = gguf.GGUFReader(path)
    fields = reader.fields
    missing = [k for k in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE) if k not in fields]
    if missing:
        raise ShrinkError(f"The imatrix {path} lacks {', '.join(missing)}, which llama-quantize requires; "
                          "regenerate it.")
    tensors = {t.name: t for t in reader.tensors}
    entries = {}
    for full in sorted(tensors):
        if not full.endswith(SUMS):
            continue
        name = full[: -len(SUMS)]
        if name + COUNTS not in tensors:
            raise ShrinkError(f"The imatrix {path} has sums but no counts for {name}; regenerate it.")
        sums = np.array(tensors[full].data, np.float32)
        sums = sums.reshape(-1) if sums.ndim == 1 or sums.shape[0] == 1 else sums.reshape(sums.shape[0], -1)
        entries[name] = (torch.from_numpy(sums), _count(np.array(tensors[name + COUNTS].data)))
    datasets = tuple(fields[KEY_DATASETS].contents())
    return Imatrix(entries, datasets, int(fields[KEY_CHUNK_COUNT].contents()),
                   int(fields[KEY_CHUNK_SIZE].contents()))


def _read_legacy(path: Path) -> Imatrix:
    data = path.read_bytes()
    offset = 0

    def take(fmt: str):
        nonlocal offset
        size = struct.calcsize(fmt)
        if offset + size > len(data):
            raise ShrinkError(f"The imatrix {path} is truncated; regenerate it.")
        values = struct.unpack_from(fmt, data, offset)
        offset += size
        return values

    (n_entries,) = take("<i")
    if n_entries < 1:
        raise ShrinkError(f"The imatrix {path} has no entries; regenerate it.")
    entries = {}
    for _ in range(n_entries):
        (length,) = take("<i")
        name = bytes(take(f"<{length}s")[0]).decode()
        ncall, nval = take("<ii")
        sums = torch.tensor(take(f"<{nval}f"), dtype=torch.float32)
        entries[name] = (sums, ncall)  # stored as mean * ncall: sums / count is the mean llama-quantize uses
    chunk_count, datasets = 0, ()
    if offset + 4 <= len(data):
        (chunk_count,) = take("<i")
        if offset + 4 <= len(data):
            (length,) = take("<i")
            if length > 0:
                datasets = (bytes(take(f"<{length}s")[0]).decode(),)
    return Imatrix(entries, datasets, chunk_count, 0, legacy=True)


def read_imatrix(path) -> Imatrix:
    """Read a GGUF imatrix (as written above, or by llama-imatrix) or a legacy binary .dat one."""
    path = Path(path)
    if not path.is_file():
        raise ShrinkError(f"The imatrix file {path} does not exist; check the path.")
    with path.open("rb") as handle:
        magic = handle.read(4)
    return _read_gguf(path) if magic == b"GGUF" else _read_legacy(path)
