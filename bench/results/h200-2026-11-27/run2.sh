set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 SHRINK_HOME=/root/sh TOKENIZERS_PARALLELISM=false
test -f /root/pp && test -f /root/g/smol.part00 || { echo "fresh machine: part a is missing"; exit 4; }
export PYTHONPATH=$(cat /root/pp)
M=/root/g/SmolLM2-135M-Instruct.Q4_1.gguf
cat /root/g/smol.part00 .gpu/b/smol.part01 > $M
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $M" | sha256sum -c || exit 5
timeout 150 python3 bench/bench_gpu.py --parts model,train_raw --model $M --out $OUT/gpu2.jsonl > $OUT/model.log 2>&1; echo model rc=$?
cut -c1-700 $OUT/model.log | tail -12
timeout 330 python3 -m shrink_core distill --teacher $M --drop-blocks 10 --steps 400 --batch-size 8 --seq-len 512 --mix en=0.6,code=0.2,fr=0.1,zh=0.1 --checkpoint-every 200 --device cuda --slices en,fr,zh,code --budget fast --name gpu --out /root/student --json > $OUT/distill.json 2>$OUT/distill.err; echo distill rc=$?
python3 - > $OUT/distill_metrics.json <<'PY'
import glob, json, sqlite3, statistics
for path in glob.glob('/root/sh/**/*.db', recursive=True) + glob.glob('/root/sh/**/*.sqlite*', recursive=True):
    try:
        con = sqlite3.connect(path)
        rows = con.execute("select step, key, value from metrics").fetchall()
    except Exception as exc:
        print(json.dumps({"db": path, "error": str(exc)})); continue
    tps = [v for s, n, v in rows if n == "tokens_per_s" and s > 5]
    print(json.dumps({"db": path, "steps_logged": len({s for s, n, v in rows}), "tokens_per_s_median": statistics.median(tps) if tps else None,
                      "last": sorted([r for r in rows if r[1] in ("train_loss", "heldout_loss")])[-4:]}))
PY
cat $OUT/distill_metrics.json; tail -c 2500 $OUT/distill.json; tail -4 $OUT/distill.err
