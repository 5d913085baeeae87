"""Whole training-step time: SGD (1 forward/backward) vs SAM and SSAM (2 forward/backward).

Model: CIFAR ResNet-18 at reduced width (default 0.25 on CPU, 1.0 with --device cuda),
train mode, batch of 64 random 32x32 images with random labels (the same batch every step).
Each variant has its own copy of the same initial model and its own optimizer:

- ``SGD``:  loss.backward(); SGD.step()
- ``SAM``:  loss.backward(); first_step(zero_grad=True); loss.backward(); second_step(zero_grad=True)
- ``SSAM``: the same with a 50% random mask (ssam_tune.masks.random_mask, normalize="full")

Base optimizer everywhere: SGD(lr=0.05, momentum=0.9, weight_decay=5e-4). Rounds of
interleaved blocks (the order rotates every round); median ms/step per variant and ratios as
the median of per-round ratios (why: benchmarks/_common.py). No assertion on the numbers.

    .venv/bin/python benchmarks/bench_step.py              # CPU, writes bench_step.txt
    .venv/bin/python benchmarks/bench_step.py --quick      # smoke run (stdout only)
    .venv/bin/python benchmarks/bench_step.py --device cuda
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import Tee, add_device_args, header, interleave, output_path, paired_ratio, setup

from ssam_tune import SAM, SSAM
from ssam_tune.masks import random_mask
from ssam_tune.models import build_model, count_params

NAME = Path(__file__).stem
BASE = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}
RHO = 0.05


def make_steps(model, x, y, sparsity: float, seed: int):
    """One step function per variant, each on its own copy of ``model``."""
    steps = {}

    m_sgd = copy.deepcopy(model)
    sgd = torch.optim.SGD(m_sgd.parameters(), **BASE)

    def sgd_step():
        F.cross_entropy(m_sgd(x), y).backward()
        sgd.step()
        sgd.zero_grad(set_to_none=True)

    steps["SGD"] = sgd_step

    def sam_like(opt, m):
        def step():
            F.cross_entropy(m(x), y).backward()
            opt.first_step(zero_grad=True)
            F.cross_entropy(m(x), y).backward()
            opt.second_step(zero_grad=True)
        return step

    m_sam = copy.deepcopy(model)
    steps["SAM"] = sam_like(SAM(m_sam.parameters(), torch.optim.SGD, rho=RHO, **BASE), m_sam)

    m_ssam = copy.deepcopy(model)
    ssam = SSAM(m_ssam.parameters(), torch.optim.SGD, rho=RHO, sparsity=sparsity, normalize="full", **BASE)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    ssam.set_masks(random_mask(ssam.params(), sparsity, gen))
    steps["SSAM"] = sam_like(ssam, m_ssam)
    return steps


def run_steps(step, n: int) -> None:
    for _ in range(n):
        step()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_device_args(ap, NAME, tf32_flag=True)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 rounds of 1 step")
    ap.add_argument("--width", type=float, default=None, help="ResNet-18 width (default 0.25 on "
                    "CPU, 1.0 on CUDA)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    device = setup(args)
    gpu = device.type == "cuda"
    width = args.width if args.width is not None else (1.0 if gpu else 0.25)
    if args.quick:
        rounds, per_block = 2, 1
    else:
        rounds, per_block = args.rounds or (31 if gpu else 41), (20 if gpu else 2)

    out = Tee()
    header(out, NAME, device)
    torch.manual_seed(0)
    model = build_model("resnet18", 10, width=width).to(device).train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(device)
    steps = make_steps(model, x, y, sparsity=0.5, seed=2)
    names = list(steps)
    for step in steps.values():  # warm-up: allocator, momentum buffers, backups, cuDNN/oneDNN choices
        run_steps(step, 2)
    seconds = interleave({name: lambda step=step: run_steps(step, per_block) for name, step in steps.items()},
                         rounds, device)
    times = {name: [t / per_block * 1e3 for t in ts] for name, ts in seconds.items()}  # ms/step

    def ratio(a, b):
        return paired_ratio(times, a, b)

    out(f"\n## resnet18 width {width} ({count_params(model) / 1e6:.2f}M parameters), batch {args.batch}, "
        f"32x32 random data, train mode; {rounds} rounds x {per_block} steps per variant (interleaved)")
    out(f"{'variant':<8}{'median ms/step':>16}{'min':>10}{'max':>10}   forward/backward passes")
    passes = {"SGD": 1, "SAM": 2, "SSAM": 2}
    for name in names:
        out(f"{name:<8}{statistics.median(times[name]):>16.2f}{min(times[name]):>10.2f}"
            f"{max(times[name]):>10.2f}   {passes[name]}")
    sam_sgd, ssam_sam = ratio("SAM", "SGD"), ratio("SSAM", "SAM")
    out("ratios (median of per-round ratios):")
    out(f"  SAM/SGD    {sam_sgd:7.3f}   (2 forward/backward passes: about 2 expected)")
    out(f"  SSAM/SAM   {ssam_sam:7.3f}   (target <= 1.05)")
    out(f"target SSAM/SAM <= 1.05: {'met' if ssam_sam <= 1.05 else 'NOT met'}")
    out(f"# wall time {time.perf_counter() - t_start:.0f} s")
    out.save(output_path(args, NAME))


if __name__ == "__main__":
    main()
