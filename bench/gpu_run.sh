#!/bin/bash
# On the GPU machine (the device tool), from the repository root: train every gpu/*.toml that
# bench/prepare_gpu_data.py wrote, side by side on the one GPU, and pack what each run wrote
# into $OUT (16 MiB pieces of res.tgz). Called from here, with weights/ moved out of the tree
# (docs/gpu.md):  run(command="bash bench/gpu_run.sh", carry=[".whl", "gpu"], timeout_s=580)
# LIMIT: seconds each run may take, its finish included; a run stopped by it ships its best
# epoch's weights as salvaged.safetensors (no card: train it shorter next time).
set -u
LIMIT=${LIMIT:-460}
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 BT_CACHE=/tmp/btcache
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, torchvision; print('torch', torch.__version__, torchvision.__version__, 'cuda', torch.cuda.is_available())"
configs=(gpu/*.toml)
# A minute's check of the whole path (CUDA, mask loss, finish) before the long runs: a bug found
# here costs seconds of the session's device time, not the runs.
if ! timeout 120 python3 train.py --config "${configs[0]}" --limit 40 --epochs 1 --img 64 \
        --out /tmp/smoke > "$OUT/smoke.log" 2>&1; then
    echo "the check run failed:"; tail -40 "$OUT/smoke.log"; exit 4
fi
for cfg in "${configs[@]}"; do
    m=$(basename "$cfg" .toml)
    (timeout "$LIMIT" python3 train.py --config "$cfg" > "$OUT/$m.log" 2>&1; echo "exit $?" >> "$OUT/$m.log") &
done
wait
for cfg in "${configs[@]}"; do
    m=$(basename "$cfg" .toml); d=gpu/out/$m
    if [ ! -f "$d/model.safetensors" ] && [ -f "$d/best.pt" ]; then
        python3 -c "import sys, torch; from safetensors.torch import save_file; s = torch.load(sys.argv[1], weights_only=True); save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in s.items()}, sys.argv[2])" "$d/best.pt" "$d/salvaged.safetensors"
    fi
    rm -f "$d/checkpoint.pt" "$d/best.pt"
    cp "$OUT/$m.log" "$d/train.log" 2>/dev/null
    echo "== $m"; grep -E "img/s" "$OUT/$m.log" | tail -2; tail -4 "$OUT/$m.log"
done
tar czf /tmp/res.tgz gpu/out && split -b 15M /tmp/res.tgz "$OUT/res.tgz." && rm -f "$OUT"/*.log && ls -la "$OUT"
