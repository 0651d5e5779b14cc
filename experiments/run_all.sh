#!/usr/bin/env bash
# Train every seed system in sequence, then compare them with everything else that has a card.
#
#   experiments/run_all.sh                 # CPU configs (reduced settings, ~5-8 min each)
#   GPU=1 experiments/run_all.sh           # the *_gpu.toml variants (224 px, 40 epochs)
#   GPU=1 NPROC=4 experiments/run_all.sh   # ... each on 4 GPUs with torchrun (DDP)
#   experiments/run_all.sh resnet18 vgg16  # only these seed systems
#
# Logs: runs/logs/<config>.log. A failed run is reported and the others still run.
# Comparison: runs/compare.md and runs/compare.json (also printed).
set -uo pipefail
cd "$(dirname "$0")/.."

SEEDS=(simple_cnn_binary simple_cnn_4class cnn_bn_aug cnn_bn_noaug resnet18 resnet50 vgg16
       efficientnet_b0)
[ $# -gt 0 ] && SEEDS=("$@")
SUFFIX=""; [ "${GPU:-0}" = "1" ] && SUFFIX="_gpu"
NPROC="${NPROC:-1}"
PY="${PYTHON:-python}"
# On a shared CPU be polite to other work; on a GPU machine NICE=0.
NICE="${NICE:-19}"

mkdir -p runs/logs
failed=()
for seed in "${SEEDS[@]}"; do
  cfg="experiments/${seed}${SUFFIX}.toml"
  log="runs/logs/${seed}${SUFFIX}.log"
  [ -f "$cfg" ] || { echo "missing $cfg"; failed+=("$seed"); continue; }
  if [ "$NPROC" -gt 1 ]; then
    cmd=("$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" train.py)
  else
    cmd=("$PY" train.py)
  fi
  echo "$(date '+%F %T') ${cfg} -> ${log}"
  start=$SECONDS
  if nice -n "$NICE" "${cmd[@]}" --config "$cfg" --no-progress >"$log" 2>&1; then
    echo "  done in $((SECONDS - start)) s"
  else
    echo "  FAILED after $((SECONDS - start)) s (see $log)"
    failed+=("$seed")
  fi
done

nice -n "$NICE" "$PY" -m core compare weights/* runs/* --md runs/compare.md --json runs/compare.json
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]}"
  exit 1
fi
