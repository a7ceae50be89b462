"""llama.cpp's CPU tools (quantize, imatrix, bench, perplexity) as an optional runtime: built here from the sources
vendored in the pinned `llama-cpp-python` sdist, then run as subprocesses whose output is parsed into figures.

Layout under `<SHRINK_HOME>/tools/`: `src/` holds the downloaded sdist and its unpacked tree; `llama.cpp-<version>/`
holds the cmake build folder, `bin/` with the four tools, and `tools.json`, written last, which marks the build done.
"""
from __future__ import annotations

import collections
import fcntl
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from shrink_core.errors import ShrinkError

Progress = Callable[[float, str], None]

SDIST_NAME = "llama-cpp-python"
SDIST_VERSION = "0.3.36"
# The sdist strips llama.cpp's git metadata, so its build reports commit "unknown"/0 unless told. 0.3.36's CHANGELOG
# names ggml-org/llama.cpp@0c1e57098, which is llama.cpp's release tag b11312; passed to cmake so the tools say so.
VENDORED_COMMIT = "0c1e57098"
VENDORED_BUILD_NUMBER = 11312
TARGETS = ("llama-quantize", "llama-imatrix", "llama-bench", "llama-perplexity")
MANIFEST = "tools.json"
MANIFEST_FORMAT = 1
BUILD_COMMAND = "python -m shrink_core tools llama-cpp"
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",  # static: the tools keep working whatever happens to the build folder
    "-DGGML_NATIVE=ON",  # tuned for this CPU: the figures are about this machine, not a portable binary
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",  # the tools read local files only
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DGGML_CUDA=OFF",
    f"-DLLAMA_BUILD_COMMIT={VENDORED_COMMIT}",
    f"-DLLAMA_BUILD_NUMBER={VENDORED_BUILD_NUMBER}",
)
# Virtual machines can list AMX in cpuid yet fault on its tile instructions (measured here: a Firecracker VM on
# Sapphire Rapids, SIGILL at `tilezero` in ggml's AMX matmul), and -march=native would compile them in. Explicit -mno
# flags win over -march=native in gcc and clang, whatever their order.
X86_NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def cmake_options(machine: str) -> tuple[str, ...]:
    """The configure options for a CPU architecture (`platform.machine()`)."""
    if machine.lower() in ("x86_64", "amd64"):
        return (*CMAKE_OPTIONS, f"-DCMAKE_C_FLAGS={X86_NO_AMX}", f"-DCMAKE_CXX_FLAGS={X86_NO_AMX}")
    return CMAKE_OPTIONS


TOOLS_HOME_ENV = "SHRINK_TOOLS_HOME"
TAIL_LINES = 25  # lines of a failed tool's output quoted in the error


@dataclass(frozen=True)
class ToolSet:
    """A finished build: where each tool is and which llama.cpp it is."""

    root: Path
    version: str  # the llama-cpp-python sdist the sources came from
    build_commit: str
    build_number: int
    quantize: Path
    imatrix: Path
    bench: Path
    perplexity: Path

    @property
    def build_id(self) -> str:
        """llama.cpp's own release naming (`b11312`), with the commit: what a figure's runtime label carries."""
        return f"b{self.build_number} ({self.build_commit})"

    def to_dict(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()} | {"build_id": self.build_id}


def default_home() -> Path:
    """`$SHRINK_TOOLS_HOME` if set (a throw-away SHRINK_HOME, as in tests, can share one build), else `$SHRINK_HOME`."""
    from shrink_core.paths import shrink_home

    override = os.environ.get(TOOLS_HOME_ENV)
    return Path(override).expanduser() if override else shrink_home()


def tools_dir(home: Path | str) -> Path:
    return Path(home) / "tools"


def build_dir(home: Path | str) -> Path:
    return tools_dir(home) / f"llama.cpp-{SDIST_VERSION}"


def find_tools(home: Path | str) -> ToolSet | None:
    """The finished build under `home`, or None when there is none (or it is incomplete, or from another format)."""
    root = build_dir(home)
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if (manifest.get("format") != MANIFEST_FORMAT or manifest.get("version") != SDIST_VERSION
            or manifest.get("cmake_options") != list(cmake_options(platform.machine()))):
        return None  # built otherwise (older options, another format): rebuilt, as cmake resumes what it can
    paths = {name: root / "bin" / name for name in TARGETS}
    if not all(os.access(p, os.X_OK) for p in paths.values()):
        return None
    return ToolSet(root, SDIST_VERSION, str(manifest["build_commit"]), int(manifest["build_number"]),
                   paths["llama-quantize"], paths["llama-imatrix"], paths["llama-bench"], paths["llama-perplexity"])


def require_tools(home: Path | str) -> ToolSet:
    tools = find_tools(home)
    if tools is None:
        raise ShrinkError(f"llama.cpp's tools are not built under {tools_dir(home)}; build them first with "
                          f"`{BUILD_COMMAND}` (about half an hour on two cores).")
    return tools


# ---------------------------------------------------------------- building

def _no_progress(fraction: float, message: str) -> None:
    return None


def cmake_percent(line: str) -> int | None:
    """The percentage of a Makefile generator's progress line (`[ 42%] Building C object ...`), else None."""
    match = re.match(r"\s*\[\s*(\d{1,3})%\]", line)
    return int(match.group(1)) if match else None


def _tail(lines) -> str:
    return "\n".join(list(lines)[-TAIL_LINES:])


def _run_step(what: str, cmd: list[str], cwd: Path | None = None, on_line: Callable[[str], None] | None = None,
              nice: bool = False) -> None:
    """Run one build step, streaming its output; a failure becomes a ShrinkError quoting its last lines."""
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    try:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", preexec_fn=(lambda: os.nice(19)) if nice else None)
    except FileNotFoundError as exc:
        raise ShrinkError(f"{what} needs `{cmd[0]}`, which is not installed; install it (e.g. `apt-get install "
                          f"cmake build-essential`) and run `{BUILD_COMMAND}` again.") from exc
    with proc:
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            if on_line:
                on_line(line)
    if proc.returncode != 0:
        raise ShrinkError(f"{what} failed (exit {proc.returncode}); fix the cause shown in its last lines and run "
                          f"`{BUILD_COMMAND}` again:\n{_tail(tail)}")


def _download(src: Path) -> Path:
    """The sdist in `src`, downloaded by pip unless an earlier run left a readable copy."""
    sdist = src / f"{SDIST_NAME.replace('-', '_')}-{SDIST_VERSION}.tar.gz"
    if sdist.is_file() and tarfile.is_tarfile(sdist):
        return sdist
    with tempfile.TemporaryDirectory(dir=src) as tmp:  # pip writes here; only a whole file is moved into place
        _run_step(f"Downloading {SDIST_NAME}=={SDIST_VERSION}",
                  [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   f"{SDIST_NAME}=={SDIST_VERSION}", "-d", tmp])
        got = Path(tmp) / sdist.name
        if not got.is_file():
            raise ShrinkError(f"pip did not produce {sdist.name}; check the package index settings and run "
                              f"`{BUILD_COMMAND}` again.")
        os.replace(got, sdist)
    return sdist


def _unpack(sdist: Path, src: Path) -> Path:
    """The vendored llama.cpp source tree, unpacked once (into a temporary folder renamed into place)."""
    tree = src / f"{SDIST_NAME.replace('-', '_')}-{SDIST_VERSION}"
    source = tree / "vendor" / "llama.cpp"
    if (source / "CMakeLists.txt").is_file():
        return source
    with tempfile.TemporaryDirectory(dir=src) as tmp:
        try:
            with tarfile.open(sdist) as archive:
                archive.extractall(tmp, filter="data")  # refuses paths leaving tmp, links outside it, devices
        except (tarfile.TarError, OSError) as exc:
            raise ShrinkError(f"Could not unpack {sdist} ({exc}); delete it and run `{BUILD_COMMAND}` again.") from exc
        if tree.exists():
            shutil.rmtree(tree)  # a partial tree from an interrupted run
        os.replace(Path(tmp) / tree.name, tree)
    if not (source / "CMakeLists.txt").is_file():
        raise ShrinkError(f"{sdist.name} holds no vendor/llama.cpp; delete {sdist} and run `{BUILD_COMMAND}` again.")
    return source


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_tools(home: Path | str, progress: Progress | None = None, jobs: int | None = None,
                nice: bool = False) -> ToolSet:
    """Download, configure and build the four CPU tools into `<home>/tools/llama.cpp-<version>/`. Idempotent: a
    finished build is returned as found; an interrupted one resumes where cmake left off. `nice`: compile at the lowest
    CPU priority."""
    progress = progress or _no_progress
    found = find_tools(home)
    if found:
        progress(1.0, "already built")
        return found
    root = build_dir(home)
    src = tools_dir(home) / "src"
    src.mkdir(parents=True, exist_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise ShrinkError(f"Another build of llama.cpp's tools is running in {root}; wait for it to finish "
                              "(check with `python -m shrink_core tools status`).") from exc
        found = find_tools(home)  # a build that held the lock may have finished since the first look
        if found:
            return found
        return _build_locked(home, root, src, progress, jobs or os.cpu_count() or 1, nice)


def _build_locked(home, root: Path, src: Path, progress: Progress, jobs: int, nice: bool) -> ToolSet:
    started = time.monotonic()
    progress(0.0, f"downloading {SDIST_NAME}=={SDIST_VERSION}")
    sdist = _download(src)
    progress(0.0, "unpacking")
    source = _unpack(sdist, src)
    progress(0.0, "configuring")
    build = root / "build"
    options = cmake_options(platform.machine())
    _run_step("Configuring llama.cpp (cmake)", ["cmake", "-S", str(source), "-B", str(build),
                                                 "-G", "Unix Makefiles", *options], nice=nice)

    def on_line(line: str) -> None:
        percent = cmake_percent(line)
        if percent is not None:
            progress(percent / 100, line.split("]", 1)[1].strip()[:80])

    _run_step("Building llama.cpp's tools", ["cmake", "--build", str(build), "-j", str(jobs), "--target", *TARGETS],
              on_line=on_line, nice=nice)
    bin_dir = root / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in TARGETS:
        built = build / "bin" / name
        if not built.is_file():
            raise ShrinkError(f"The build finished without {built}; delete {root} and run `{BUILD_COMMAND}` again.")
        shutil.copy2(built, bin_dir / f".{name}.tmp")
        os.replace(bin_dir / f".{name}.tmp", bin_dir / name)
    manifest = {
        "format": MANIFEST_FORMAT, "version": SDIST_VERSION, "build_commit": VENDORED_COMMIT,
        "build_number": VENDORED_BUILD_NUMBER, "source": str(source), "cmake_options": list(options),
        "cpu": _cpu_model(), "jobs": jobs, "build_seconds": round(time.monotonic() - started, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "tools": {name: str(bin_dir / name) for name in TARGETS},
    }
    tmp = root / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, root / MANIFEST)  # written last: its presence means the build is whole
    progress(1.0, "built")
    tools = find_tools(home)
    assert tools is not None
    return tools


# ---------------------------------------------------------------- running the tools

def run_tool(what: str, cmd: list[str], timeout_s: float) -> tuple[str, str]:
    """A tool's (stdout, stderr); a failure or a hang becomes a ShrinkError quoting its last lines."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        out = "".join(part.decode(errors="replace") if isinstance(part, bytes) else part or ""
                      for part in (exc.stdout, exc.stderr))
        raise ShrinkError(f"{what} did not finish within {timeout_s:.0f} s; use a smaller workload or a less busy "
                          f"machine. Its last lines:\n{_tail(out.splitlines())}") from exc
    if done.returncode == -signal.SIGILL:
        raise ShrinkError(f"{what} stopped on an illegal instruction: the tools use a CPU feature this machine does "
                          f"not allow (built elsewhere, or a VM hiding it); delete {Path(cmd[0]).parent.parent} and "
                          f"rebuild here with `{BUILD_COMMAND}`.")
    if done.returncode != 0:
        raise ShrinkError(f"{what} failed (exit {done.returncode}); check the file and settings named in its last "
                          f"lines:\n{_tail((done.stdout + done.stderr).splitlines())}")
    return done.stdout, done.stderr


def _check_gguf(path: Path | str, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ShrinkError(f"The {what} {path} does not exist; give the path of a .gguf file.")
    with path.open("rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ShrinkError(f"The {what} {path} is not a GGUF file (it lacks the GGUF magic); give a .gguf file.")
    return path


def _positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ShrinkError(f"{name.replace('_', ' ')} must be at least 1, not {value}.")


def bench_command(tools: ToolSet, gguf: Path, threads: int, prompt_tokens: int, gen_tokens: int,
                  repetitions: int) -> list[str]:
    return [str(tools.bench), "-m", str(gguf), "-t", str(threads), "-p", str(prompt_tokens), "-n", str(gen_tokens),
            "-r", str(repetitions), "-o", "json"]


def _records(text: str) -> list[dict]:
    """llama-bench's `-o json` array; log lines, if any reached the same stream, sit outside it."""
    start, end = text.find("["), text.rfind("]")
    try:
        records = json.loads(text[start:end + 1]) if start >= 0 and end > start else None
    except ValueError:
        records = None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ShrinkError(f"llama-bench printed no JSON results; its last lines:\n{_tail(text.splitlines())}")
    return records


def _speed(record: dict, tokens_field: str) -> dict:
    tokens = int(record[tokens_field])
    samples_ns = [float(s) for s in record.get("samples_ns", [])]
    return {"tokens": tokens, "tokens_per_s": float(record["avg_ts"]),
            "tokens_per_s_stddev": float(record["stddev_ts"]),
            "samples_tokens_per_s": [float(s) for s in record.get("samples_ts", [])],
            "samples_ms_per_token": [ns / 1e6 / tokens for ns in samples_ns]}


def parse_bench(text: str) -> dict:
    """The figures of one llama-bench run (`-o json`): prompt processing and generation speed, and what ran where."""
    records = _records(text)
    prompt = [r for r in records if int(r.get("n_prompt", 0)) > 0 and int(r.get("n_gen", 0)) == 0]
    gen = [r for r in records if int(r.get("n_gen", 0)) > 0 and int(r.get("n_prompt", 0)) == 0]
    if not records:
        raise ShrinkError("llama-bench ran no test; give it at least one prompt or generation token.")
    first = records[0]
    return {
        "build_commit": first.get("build_commit"), "build_number": first.get("build_number"),
        "cpu_info": first.get("cpu_info"), "gpu_info": first.get("gpu_info") or None, "backends": first.get("backends"),
        "model_filename": first.get("model_filename"), "model_type": first.get("model_type"),
        "model_size": first.get("model_size"), "model_n_params": first.get("model_n_params"),
        "threads": first.get("n_threads"), "n_batch": first.get("n_batch"), "n_ubatch": first.get("n_ubatch"),
        "flash_attn": first.get("flash_attn"), "type_k": first.get("type_k"), "type_v": first.get("type_v"),
        "repetitions": len(first.get("samples_ns", [])),
        "prompt": _speed(prompt[0], "n_prompt") if prompt else None,
        "generation": _speed(gen[0], "n_gen") if gen else None,
        "test_time": first.get("test_time"),
    }


def bench(tools: ToolSet, gguf_path: Path | str, threads: int, prompt_tokens: int = 128, gen_tokens: int = 64,
          repetitions: int = 3, timeout_s: float = 1800) -> dict:
    """llama-bench on one GGUF: prompt (pp) and generation (tg) tokens/s, mean and stddev over `repetitions`."""
    _positive(threads=threads, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, repetitions=repetitions)
    gguf = _check_gguf(gguf_path, "GGUF file")
    with tempfile.TemporaryDirectory(prefix="shrink-bench-") as tmp:
        target = gguf
        if "," in str(gguf):  # llama-bench reads -m as a comma-separated list of models: give it a path without one
            target = Path(tmp) / "model.gguf"
            target.symlink_to(gguf.resolve())
        cmd = bench_command(tools, target, threads, prompt_tokens, gen_tokens, repetitions)
        result = parse_bench(run_tool("llama-bench", cmd, timeout_s)[0])  # the JSON is on stdout, logs on stderr
    return {**result, "file": str(gguf), "file_bytes": gguf.stat().st_size, "build_id": tools.build_id,
            "command": cmd}


# llama-perplexity prints `value ± uncertainty` pairs; in the C locale, which it sets, numbers use a dot.
_NUM = r"(-?(?:\d+(?:\.\d*)?|nan|inf))"
_PAIR = _NUM + r"\s*±\s*" + _NUM


def _number(text: str) -> float:
    return float(text.replace("-nan", "nan"))


def _pair(pattern: str, text: str) -> tuple[float, float] | None:
    match = re.search(pattern, text, re.MULTILINE)
    return (_number(match.group(1)), _number(match.group(2))) if match else None


# One row per chunk: chunk, PPL(Q), ln(PPL(Q)/PPL(base)), KLD, RMS Δp %, same top p %, each with its uncertainty.
_CHUNK_ROW = re.compile(r"^\s*(\d+)\s+" + r"\s+".join([_PAIR] * 3) + r"\s+" + _PAIR + r"\s*%\s+" + _PAIR + r"\s*%\s*$",
                        re.MULTILINE)


def parse_kld(text: str) -> dict:
    """The figures of a `llama-perplexity --kl-divergence` run. The summary block needs 100+ scored tokens; below
    that only per-chunk rows are printed, and their last (running) row is used instead (`summary` False)."""
    chunks = re.search(r"computing over (\d+) chunks, n_ctx=(\d+)", text)
    if not chunks:
        raise ShrinkError(f"llama-perplexity did not start its KL-divergence pass; its last lines:\n"
                          f"{_tail(text.splitlines())}")
    n_chunks, n_ctx = int(chunks.group(1)), int(chunks.group(2))
    out = {"chunks": n_chunks, "ctx": n_ctx, "tokens_scored": n_chunks * (n_ctx - 1 - n_ctx // 2)}
    kld = _pair(r"^Mean\s+KLD:\s*" + _PAIR, text)
    if kld:
        top = _pair(r"^Same top p:\s*" + _PAIR + r"\s*%", text)
        ppl = _pair(r"^Mean PPL\(Q\)\s*:\s*" + _PAIR, text)
        base = _pair(r"^Mean PPL\(base\)\s*:\s*" + _PAIR, text)
        ratio = _pair(r"^Mean PPL\(Q\)/PPL\(base\)\s*:\s*" + _PAIR, text)
        if not (top and ppl and base):
            raise ShrinkError("llama-perplexity's KL-divergence summary is incomplete; its last lines:\n"
                              f"{_tail(text.splitlines())}")
        quantiles = {name: _number(value) for name, value in re.findall(
            r"^\s*(Maximum|99\.9%|99\.0%|95\.0%|90\.0%|Median|10\.0%|5\.0%|1\.0%|0\.1%|Minimum)\s+KLD:\s*" + _NUM,
            text, re.MULTILINE)}
        return {**out, "summary": True, "mean_kld": kld[0], "mean_kld_uncertainty": kld[1],
                "same_top_p": round(top[0] / 100, 6), "same_top_p_uncertainty": round(top[1] / 100, 6),
                "ppl": ppl[0], "ppl_uncertainty": ppl[1], "ppl_base": base[0], "ppl_base_uncertainty": base[1],
                "ppl_ratio": ratio[0] if ratio else None, "ppl_ratio_uncertainty": ratio[1] if ratio else None,
                "kld_quantiles": quantiles}
    rows = _CHUNK_ROW.findall(text)
    if not rows:
        raise ShrinkError(f"llama-perplexity printed no KL-divergence figures; its last lines:\n"
                          f"{_tail(text.splitlines())}")
    last = [_number(v) for v in rows[-1][1:]]
    return {**out, "summary": False, "mean_kld": last[4], "mean_kld_uncertainty": last[5],
            "same_top_p": round(last[8] / 100, 6), "same_top_p_uncertainty": round(last[9] / 100, 6),
            "ppl": last[0], "ppl_uncertainty": last[1], "ppl_base": None, "ppl_base_uncertainty": None,
            "ppl_ratio": math.exp(last[2]), "ppl_ratio_uncertainty": None, "kld_quantiles": {}}


def parse_perplexity(text: str) -> tuple[float, float]:
    """`Final estimate: PPL = x +/- y` of a plain perplexity run (the reference pass)."""
    match = re.search(r"Final estimate: PPL = " + _NUM + r" \+/- " + _NUM, text)
    if not match:
        raise ShrinkError(f"llama-perplexity printed no perplexity; its last lines:\n{_tail(text.splitlines())}")
    return _number(match.group(1)), _number(match.group(2))


def kl_divergence(tools: ToolSet, reference_gguf: Path | str, candidate_gguf: Path | str, text_file: Path | str,
                  ctx: int, threads: int | None = None, chunks: int | None = None, timeout_s: float = 3600,
                  keep_base: Path | str | None = None) -> dict:
    """KL divergence of the candidate's next-token distributions from the reference's over `text_file`, scored on
    the second half of each `ctx`-token chunk (llama-perplexity's KL mode): mean KLD, top-1 agreement, perplexity.
    The reference's log-probabilities pass through a temporary file of about 2 bytes x vocabulary x ctx/2 per chunk
    (6 MB per 128-token chunk at a 49k vocabulary); `chunks` caps how much of the text is used. `keep_base`: copy
    that file there, e.g. to read back the exact tokens scored (`kld_base_tokens`)."""
    _positive(ctx=ctx, threads=threads or 1, chunks=chunks or 1)
    reference = _check_gguf(reference_gguf, "reference GGUF")
    candidate = _check_gguf(candidate_gguf, "candidate GGUF")
    text = Path(text_file).expanduser()
    if not text.is_file():
        raise ShrinkError(f"The text file {text} does not exist; give a plain-text file of at least {2 * ctx} tokens.")
    common = ["-c", str(ctx), *(["-t", str(threads)] if threads else []),
              *(["--chunks", str(chunks)] if chunks else [])]
    with tempfile.TemporaryDirectory(prefix="shrink-kld-") as tmp:
        base = Path(tmp) / "reference.kld"  # the reference's log-probabilities, and the tokens, for the second pass
        out = "\n".join(run_tool("llama-perplexity (reference pass)",
                                 [str(tools.perplexity), "-m", str(reference), "-f", str(text), "--kl-divergence-base",
                                  str(base), *common], timeout_s))
        short = re.search(r"you need at least (\d+) tokens.*?tokenizes to only (\d+) tokens", out, re.DOTALL)
        if short:  # llama-perplexity exits 0 here: say why there are no figures
            raise ShrinkError(f"The text file {text} is too short for ctx {ctx}: it is {short.group(2)} tokens and "
                              f"needs at least {short.group(1)}; use a longer text or a smaller ctx.")
        reference_ppl = parse_perplexity(out)
        scored = parse_kld("\n".join(run_tool("llama-perplexity (KL-divergence pass)",
                                               [str(tools.perplexity), "-m", str(candidate), "--kl-divergence-base",
                                                str(base), "--kl-divergence", *common], timeout_s)))
        if keep_base is not None:
            shutil.copyfile(base, keep_base)
    return {**scored, "reference_ppl": reference_ppl[0], "reference_ppl_uncertainty": reference_ppl[1],
            "reference": str(reference), "candidate": str(candidate), "text_file": str(text),
            "build_id": tools.build_id}


def kld_base_tokens(path: Path | str) -> tuple[int, list[list[int]]]:
    """(n_ctx, the token ids of each chunk) from a `--kl-divergence-base` file: what llama-perplexity scored, so
    another engine can score the very same tokens. Layout (perplexity.cpp): "_logits_", uint32 n_ctx, int32 n_vocab,
    int32 n_chunk, then n_chunk x n_ctx int32 tokens, then the log-probabilities."""
    import struct

    with open(path, "rb") as f:
        if f.read(8) != b"_logits_":
            raise ShrinkError(f"{path} is not a llama-perplexity --kl-divergence-base file.")
        n_ctx, _n_vocab, n_chunk = struct.unpack("<Iii", f.read(12))
        flat = struct.unpack(f"<{n_ctx * n_chunk}i", f.read(4 * n_ctx * n_chunk))
    return n_ctx, [list(flat[i * n_ctx:(i + 1) * n_ctx]) for i in range(n_chunk)]


# ---------------------------------------------------------------- as a stored measurement

def runtime_label(figures: dict) -> str:
    """`llama.cpp b11312 (0c1e57098)`: the build as the bench itself reported it."""
    return f"llama.cpp b{figures.get('build_number')} ({figures.get('build_commit')})"


def device_label(figures: dict) -> str:
    return f"{figures.get('cpu_info') or _cpu_model()}, {figures.get('threads')} threads (llama.cpp, cpu)"


def measured_entry(figures: dict, candidate: str, load_average: tuple[float, float]) -> dict:
    """One bench as a measured-latency row shaped like the torch runtime's (perf/latency.py `MeasuredLatency`), so
    pages and the candidates table read it the same way; batch 1, as llama-bench runs it."""
    from shrink_core.perf.latency import Timing

    prompt, gen = figures["prompt"], figures["generation"]
    prefill, decode = Timing(tuple(prompt["samples_ms_per_token"])), Timing(tuple(gen["samples_ms_per_token"]))
    return {
        "kind": "measured", "candidate": candidate, "device": device_label(figures), "runtime": runtime_label(figures),
        "threads": figures["threads"], "batch": 1, "prompt_tokens": prompt["tokens"], "decode_tokens": gen["tokens"],
        "runs": figures["repetitions"], "warmup": 1,  # llama-bench runs each test once untimed first
        "prefill_ms_per_token": prefill.to_dict(), "decode_ms_per_token": decode.to_dict(),
        "prefill_tokens_per_s": round(prompt["tokens_per_s"], 2), "decode_tokens_per_s": round(gen["tokens_per_s"], 2),
        "prefill_tokens_per_s_stddev": round(prompt["tokens_per_s_stddev"], 2),
        "decode_tokens_per_s_stddev": round(gen["tokens_per_s_stddev"], 2),
        "load_average": list(load_average),
    }
