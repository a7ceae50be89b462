#!/usr/bin/env bash
# Issue 14's GPU checks in one call on a lent CUDA machine (figures in docs/scale.md):
#   1. the CUDA tests (pytest -m gpu): every path on cuda gives the CPU's figures; onloaded GPTQ matches the CPU;
#   2. sequential onloading: the 8B shape in host memory, RTN, GPTQ and eval with each block visiting the GPU;
#   3. the scale table on cuda: 1B, 3B and 8B shapes through rtn, gptq, the one-slice scan and eval.
# Here first (a machine with the venv):  bash bench/gpu_scale.sh prepare   (wheels and the SmolLM2 tokenizer in .gpu/,
# which .git/info/exclude must ignore). There, from the repo root, with .gpu carried:  bash bench/gpu_scale.sh [PARTS]
# PARTS: a comma list of tests, onload, cuda (default: all three).
# Results land in $OUT (the device tool's folder), else ./gpu-out.
set -o pipefail
if [ "$1" = prepare ]; then
  mkdir -p .gpu/whl .gpu/tok
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl transformers==5.24.0 gguf==0.19.0
  tok=$(ls -d "${SHRINK_HOME:-$HOME/.cache/shrink}"/models/SmolLM2-135M*/ | head -1)
  cp "$tok"/tokenizer.json "$tok"/tokenizer_config.json .gpu/tok/ && ls -la .gpu/whl .gpu/tok
  exit
fi
PARTS=",${1:-tests,onload,cuda},"
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false SHRINK_HOME=/tmp/shrink-gpu
mkdir -p $SHRINK_HOME/models/smollm2-tokenizer && cp .gpu/tok/* $SHRINK_HOME/models/smollm2-tokenizer/
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl || exit 3
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/smi.txt
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  | tee -a $OUT/smi.txt
t0=$SECONDS
if [[ $PARTS == *,tests,* ]]; then
  timeout 100 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_device.py tests/test_onload.py 2>&1 \
    | tee $OUT/pytest.log | tail -15
  echo "pytest ${SECONDS}s"
fi
if [[ $PARTS == *,onload,* ]]; then
  timeout 200 python3 bench/bench_scale.py --onload cuda --shapes 8b --stages build,rtn,gptq,eval --gptq-blocks 8 \
    --out $OUT/onload.jsonl > $OUT/onload.log 2>&1; echo "onload rc=$? ${SECONDS}s"
fi
if [[ $PARTS == *,cuda,* ]]; then
  timeout 250 python3 bench/bench_scale.py --device cuda --shapes 1b,3b,8b --stages build,rtn,gptq,scan,eval \
    --out $OUT/cuda.jsonl > $OUT/cuda.log 2>&1; echo "cuda rc=$? ${SECONDS}s"
fi
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
for name in ("onload.jsonl", "cuda.jsonl"):
    path = Path(sys.argv[1]) / name
    for line in path.read_text().splitlines() if path.exists() else []:
        r = json.loads(line)
        if "fit" in r or "failed" in r:
            print(name, json.dumps(r)[:600]); continue
        print(name, r["shape"], r["stage"], "s", r.get("stage_s"), "gpu_gb", r.get("peak_gpu_gb"), "rss_gb",
              r.get("peak_rss_gb"), "per_block_s", r.get("seconds_per_block"), "build_s", r.get("build_s"))
PY
