#!/bin/bash
# The packages train.py needs that the GPU machine's image lacks (it has torch, torchvision, numpy,
# pillow, scipy, scikit-learn, safetensors, tabulate): grad-cam with its ttach (core.saliency,
# imported for the tumour masks) and pydicom (core.reader), as wheels for its Python 3.12 on
# x86-64, into .whl/ (ignored; carried by the call). Versions as requirements.txt resolves here.
set -euo pipefail
mkdir -p .whl
ver() { python -m pip show "$1" | sed -n 's/^Version: //p'; }
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .whl "pydicom==$(ver pydicom)" "ttach==$(ver ttach)"
tmp=$(mktemp -d)
python -m pip download -q --no-deps --no-binary=:all: -d "$tmp" "grad-cam==$(ver grad-cam)"
python -m pip wheel -q --no-deps --no-build-isolation -w .whl "$tmp"/grad*cam-*.tar.gz
ls -la .whl
