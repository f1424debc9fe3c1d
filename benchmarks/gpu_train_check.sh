#!/usr/bin/env bash
# The GPU check of the training input pipeline (issue 15, item 1): one short run on a CUDA machine.
#
#   bash benchmarks/gpu_train_check.sh            # PY=/path/to/python to pick the interpreter
#
# Makes the synthetic screen once (benchmarks/out/train-input/screen), then times the step loop of
# `cellmi train` (prefetching loader + train_step, bf16 autocast, B = 8 samples, crop 256) on the GPU:
# the base model at N = 4 (the default batch), 32 and 64 fields per sample, and the large and xl presets
# (model.size) at N = 64. Prints one Markdown table (crops/s, busy share, crops/s against the same
# steps on a fixed batch) and writes benchmarks/out/train-gpu.json. Targets: at least 20,000 crops/s
# and 80 % busy with the base model. About 3 minutes on an H200 with 16 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device visible to torch")'
"$PY" benchmarks/bench_train.py --parts input --device cuda --tag gpu --warmup 10 --rounds 5 --chunk 10 \
    --input-n 4 32 64 --sizes base
"$PY" benchmarks/bench_train.py --parts input --device cuda --tag gpu-sizes --warmup 5 --rounds 2 --chunk 10 \
    --input-n 64 --sizes large xl
