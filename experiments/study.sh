#!/usr/bin/env bash
# The generalisation study: one run per source mix, then the per-source table.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs/logs
for n in benchmark plus_br35h plus_lgg plus_brisc all; do
  python train.py --config "experiments/study_$n.toml" --no-progress > "runs/logs/study_$n.log" 2>&1
done
python experiments/study_table.py runs/study_benchmark runs/study_plus_br35h runs/study_plus_lgg runs/study_plus_brisc runs/study_all weights/mobilenet_v3_small weights/resnet18 weights/resnet18_176
