#!/usr/bin/env bash
# One short GPU session (a lent H100/H200), about 6 minutes, at most about 7: the training
# throughput through the Trainer (bench_train: SGD, SAM, SSAM-F tensor 50%, SAM-ON, eager and
# train.compile, img/s, MFU against a measured bf16 matmul rate, the SAM/SGD and 30k img/s
# goals; 170 s budget, killed at 230 s, each line written as it comes and the summary printed
# even on the timeout's SIGTERM), the step benchmark (bench_step) and a 1-epoch training run
# through the CLI (bf16 autocast, channels_last, data on the GPU). Output in $OUT.
# Usage on the GPU machine, from the repository root: OUT=<dir> bash benchmarks/gpu_check.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee "$OUT/env.txt"
timeout -k 10 230 python3 benchmarks/bench_train.py --device cuda --budget-s 170 \
    --out "$OUT/bench_train_cuda.txt" 2> "$OUT/bench_train_cuda.err"
timeout 120 python3 benchmarks/bench_step.py --device cuda --out "$OUT/bench_step_cuda.txt"
cat > /tmp/gpu1.yaml <<'YAML'
model: {name: resnet18, width: 1.0}
train: {epochs: 1, batch_size: 128}
method: {name: ssam_f, rho: 0.1, sparsity: 0.5, N_F: 128}
YAML
timeout 60 python3 -m ssam_tune.train /tmp/gpu1.yaml --out /tmp/gpu1 2>&1 | tail -4 | tee "$OUT/train_cli_cuda.txt"
