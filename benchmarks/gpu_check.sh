#!/usr/bin/env bash
# One short GPU session (a lent H100): the GPU variants of the benchmarks and a 1-epoch
# training run through the CLI (bf16 autocast, channels_last, data on the GPU).
# Usage on the GPU machine, from the repository root: OUT=<dir> bash benchmarks/gpu_check.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee "$OUT/env.txt"
timeout 200 python3 benchmarks/bench_train.py --device cuda --width 1.0 --rounds 3 --budget-s 120 \
    --out "$OUT/bench_train_cuda.txt"
timeout 120 python3 benchmarks/bench_step.py --device cuda --out "$OUT/bench_step_cuda.txt"
cat > /tmp/gpu1.yaml <<'YAML'
model: {name: resnet18, width: 1.0}
train: {epochs: 1, batch_size: 128}
method: {name: ssam_f, rho: 0.1, sparsity: 0.5, N_F: 128}
YAML
timeout 90 python3 -m ssam_tune.train /tmp/gpu1.yaml --out /tmp/gpu1 2>&1 | tail -4 | tee "$OUT/train_cli_cuda.txt"
