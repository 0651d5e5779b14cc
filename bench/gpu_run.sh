#!/bin/bash
# On the GPU machine (the device tool), from the repository root: train every gpu/*.toml that
# bench/prepare_gpu_data.py wrote, side by side on the one GPU, and pack what each run wrote
# into $OUT (15 MiB pieces of res.tgz). Called from here, with weights/ moved out of the tree
# (docs/gpu.md):  run(command="bash bench/gpu_run.sh", carry=[".whl", "gpupack"], timeout_s=590)
# BUDGET: seconds from the start to the end of packing (under the call's timeout_s). A run still
# training when its share ends is stopped; its best epoch's weights are salvaged for
# `train.py --finish-from` (core.engine.salvage_best; trained.json says what it was).
# SKIP_CHECK=1: a second call of one session skips the throughput figure and the check runs.
set -u
START=$SECONDS
BUDGET=${BUDGET:-560}
OUT=${OUT:-/tmp/gpu_out}
# The packed images travel as one archive (bench/prepare_gpu_data.py: many small files count as more)
if [ -f gpupack/gpu.tgz ]; then tar xzf gpupack/gpu.tgz && rm -rf gpupack || exit 2; fi
mkdir -p "$OUT" gpu/out/logs
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 BT_CACHE=/tmp/btcache
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, torchvision; print('torch', torch.__version__, torchvision.__version__, 'cuda', torch.cuda.is_available())"
configs=(gpu/*.toml)
if [ -z "${SKIP_CHECK:-}" ]; then  # a second call in one session: the path was checked by the first
# The GPU's training throughput alone (issue 3 asks for it; the runs below share the GPU):
timeout 90 python3 bench/train_throughput.py --arch resnet18 --img 192 --device cuda --precision bf16 \
    --steps 50 > gpu/out/logs/throughput.log 2>&1; tail -3 gpu/out/logs/throughput.log
# A check of the whole path (CUDA, worker processes, mask loss, EMA, finish) for every config at
# once on 60 images a source: a bug found here costs a minute of the session's device time, not the runs.
for cfg in "${configs[@]}"; do
    m=$(basename "$cfg" .toml)
    timeout 150 python3 train.py --config "$cfg" --limit 60 --epochs 1 --img 64 --small-img 0 --out "/tmp/check_$m" \
        > "gpu/out/logs/check_$m.log" 2>&1 &
done
wait
for cfg in "${configs[@]}"; do
    m=$(basename "$cfg" .toml)
    if [ ! -f "/tmp/check_$m/card.json" ]; then
        echo "the check run of $m failed:"; tail -40 "gpu/out/logs/check_$m.log"; exit 4
    fi
done
fi
LIMIT=$(( BUDGET - (SECONDS - START) - 45 ))  # 45 s kept for salvage and packing
[ "$LIMIT" -lt 30 ] && LIMIT=30  # timeout 0 would mean no limit at all
checks="check runs passed"; [ -n "${SKIP_CHECK:-}" ] && checks="check runs skipped (SKIP_CHECK)"
echo "$checks after $(( SECONDS - START )) s; each run may take $LIMIT s"
for cfg in "${configs[@]}"; do
    m=$(basename "$cfg" .toml)
    (timeout "$LIMIT" python3 train.py --config "$cfg" > "gpu/out/logs/$m.log" 2>&1
     echo "exit $? after $(( SECONDS - START )) s" >> "gpu/out/logs/$m.log") &
done
wait
keep=(gpu/out/logs)
for cfg in "${configs[@]}"; do
    m=$(basename "$cfg" .toml); d=gpu/out/$m
    if [ ! -f "$d/card.json" ] && [ ! -f "$d/model.safetensors" ]; then
        python3 -c "import sys; from core.engine import salvage_best; print('salvaged:', salvage_best(sys.argv[1]))" "$d"
    fi
    for f in model.safetensors salvaged.safetensors card.json history.json eval.json split.json trained.json; do
        [ -f "$d/$f" ] && keep+=("$d/$f")
    done
    echo "== $m"; grep -E "img/s" "gpu/out/logs/$m.log" | tail -2; tail -4 "gpu/out/logs/$m.log"
done
tar czf /tmp/res.tgz "${keep[@]}"
size=$(stat -c %s /tmp/res.tgz)
if [ "$size" -gt $(( 60 * 1048576 )) ]; then  # the tool returns at most 64 MiB in 8 files
    echo "results are $size bytes: packing the logs and cards only"; tar czf /tmp/res.tgz gpu/out/logs gpu/out/*/*.json
fi
split -b 15M /tmp/res.tgz "$OUT/res.tgz." && ls -la "$OUT"
