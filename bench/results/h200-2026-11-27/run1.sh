set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 SHRINK_HOME=/root/sh TOKENIZERS_PARALLELISM=false
mkdir -p /root/g && cp .gpu/a/smol.part00 /root/g/
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee $OUT/smi.txt
python3 -m pip install -q --no-index --no-deps --no-compile --target /root/site .gpu/a/*.whl || echo "pip failed"
echo /root/site > /root/pp
if ! PYTHONPATH=/root/site python3 -c "import transformers, gguf, torch, shrink_core.distill.run"; then
  echo "transformers 5.24 does not import here; using the image's transformers + gguf only"
  mkdir -p /root/site_g && cp -r /root/site/gguf* /root/site_g/ && echo /root/site_g > /root/pp
fi
export PYTHONPATH=$(cat /root/pp)
python3 -c "import transformers,gguf,torch;print('versions', transformers.__version__, gguf.__version__, torch.__version__, torch.cuda.get_device_name(0))"
timeout 240 python3 bench/bench_gpu.py --parts env,kernels --out $OUT/gpu.jsonl > $OUT/kernels.log 2>&1; echo kernels rc=$?
grep -o '"shape[^{]*tokens": [0-9]*' $OUT/kernels.log | head -3; grep -c kernel $OUT/kernels.log; grep -i error $OUT/kernels.log | head -c 2500
python3 -c "from shrink_core.distill.toy import save_toy_teacher; save_toy_teacher('/root/toy')" && timeout 150 python3 -m shrink_core distill --teacher /root/toy --drop-blocks 1 --steps 20 --device cuda --slices en --budget fast --json > $OUT/toy_distill.json 2>$OUT/toy_distill.err; echo toy rc=$?
tail -c 600 $OUT/toy_distill.json; tail -3 $OUT/toy_distill.err
