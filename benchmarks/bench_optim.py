"""Optimizer-only cost of one SAM / SSAM step (first_step + second_step, no forward/backward).

Parameter sets: CIFAR ResNet-18 (10 classes, 11.2M) and WRN-28-10 (100 classes, 36.5M).
Every parameter gets a fixed random ``.grad`` once; the steps never clear it, so each timed
step does exactly the optimizer's work: the perturbation (norm, backup, e, w += e) and the
restore plus the base SGD step (lr=0.05, momentum=0.9, weight_decay=5e-4, foreach default).

Variants, all on the SAME parameter tensors (each optimizer keeps its own state):

- ``SAM``, ``SSAM50``, ``SSAM90``: ssam_tune.method.optim with random masks (normalize="full").
- ``SAM-loop``, ``SSAM50-loop``, ``SSAM90-loop``: the reference code's per-parameter Python
  loop, written below (norm of torch.stack of per-parameter norms; e = g * scale * mask with
  a float32 mask copy as the reference stores it; p.add_(e); e kept in a dict; then
  p.sub_(e) and the base SGD step).

Timing: rounds of interleaved blocks (the variant order rotates every round), median
ms/step per variant, and ratios as the median of per-round ratios (paired, so that machine
noise shared by a round cancels; the reasons are in benchmarks/_common.py). No assertion on
the numbers: this prints them.

    .venv/bin/python benchmarks/bench_optim.py              # CPU, writes bench_optim.txt
    .venv/bin/python benchmarks/bench_optim.py --quick      # smoke run (stdout only)
    .venv/bin/python benchmarks/bench_optim.py --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _common import Tee, add_device_args, header, interleave, output_path, paired_ratio, setup

from ssam_tune import SAM, SSAM
from ssam_tune.method.masks import random_mask
from ssam_tune.training.models import build_model

NAME = Path(__file__).stem
BASE = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}
RHO = 0.05


# ----------------------------------------------------------------------------- the loop
class LoopSAM:
    """The reference code's SAM/SSAM steps, one parameter at a time.

    ``restore="sub"`` is the reference (w = (w + e) - e, not exact in floating point);
    ``restore="copy"`` backs w up and copies it back, as ssam_tune does (exact), to show
    what the exact restore costs in the loop.
    """

    def __init__(self, params, masks=None, rho=RHO, restore="sub"):
        self.params = list(params)
        self.rho = rho
        self.restore = restore
        self.backup: dict[torch.Tensor, torch.Tensor] = {}
        self.base = torch.optim.SGD(self.params, **BASE)
        # The reference keeps its mask as a float32 tensor per parameter (state[p]["mask"]).
        self.mask = None if masks is None else {p: m.to(torch.float32) for p, m in zip(self.params, masks, strict=True)}
        self.e: dict[torch.Tensor, torch.Tensor] = {}

    @torch.no_grad()
    def first_step(self) -> None:
        grad_norm = torch.norm(torch.stack([p.grad.norm(p=2) for p in self.params if p.grad is not None]), p=2)
        scale = self.rho / (grad_norm + 1e-7)
        for p in self.params:
            if p.grad is None:
                continue
            e = p.grad * scale.to(p)
            if self.mask is not None:
                e.mul_(self.mask[p])
            if self.restore == "copy":
                if p not in self.backup:
                    self.backup[p] = torch.empty_like(p)
                self.backup[p].copy_(p)
            p.add_(e)
            self.e[p] = e

    @torch.no_grad()
    def second_step(self) -> None:
        for p, e in self.e.items():
            if self.restore == "copy":
                p.copy_(self.backup[p])
            else:
                p.sub_(e)
        self.e = {}
        self.base.step()


# ----------------------------------------------------------------------------- benchmark
def make_variants(params, device, generator):
    masks50 = random_mask(params, 0.5, generator)
    masks90 = random_mask(params, 0.9, generator)
    sam = SAM(params, torch.optim.SGD, rho=RHO, **BASE)
    ssam50 = SSAM(params, torch.optim.SGD, rho=RHO, sparsity=0.5, normalize="full", **BASE)
    ssam50.set_masks(masks50)
    ssam90 = SSAM(params, torch.optim.SGD, rho=RHO, sparsity=0.9, normalize="full", **BASE)
    ssam90.set_masks(masks90)
    return {
        "SAM": sam,
        "SSAM50": ssam50,
        "SSAM90": ssam90,
        "SAM-loop": LoopSAM(params),
        "SSAM50-loop": LoopSAM(params, masks50),
        "SSAM90-loop": LoopSAM(params, masks90),
        "SAM-loop-copy": LoopSAM(params, restore="copy"),
    }


def run_steps(opt, steps: int) -> None:
    for _ in range(steps):
        opt.first_step()
        opt.second_step()


def bench_model(out: Tee, label: str, model, device, rounds: int, steps: int, seed: int = 0) -> dict:
    model = model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator(device="cpu").manual_seed(seed)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(device)
    n = sum(p.numel() for p in params)
    variants = make_variants(params, device, torch.Generator(device=device).manual_seed(seed))
    names = list(variants)
    for opt in variants.values():  # warm-up: allocate backups, momentum buffers, e, caches
        run_steps(opt, 2)
    seconds = interleave({name: lambda opt=opt: run_steps(opt, steps) for name, opt in variants.items()},
                         rounds, device)
    times = {name: [t / steps * 1e3 for t in ts] for name, ts in seconds.items()}  # ms/step

    def med(name):
        return statistics.median(times[name])

    def ratio(a, b):
        return paired_ratio(times, a, b)

    out(f"\n## {label}: {n / 1e6:.1f}M parameters in {len(params)} tensors, "
        f"{rounds} rounds x {steps} steps per variant (interleaved)")
    out(f"{'variant':<14}{'median ms/step':>16}{'min':>10}{'max':>10}")
    for name in names:
        out(f"{name:<14}{med(name):>16.2f}{min(times[name]):>10.2f}{max(times[name]):>10.2f}")
    ratios = {
        "SSAM50/SAM": ratio("SSAM50", "SAM"),
        "SSAM90/SAM": ratio("SSAM90", "SAM"),
        "SAM-loop/SAM": ratio("SAM-loop", "SAM"),
        "SSAM50-loop/SSAM50": ratio("SSAM50-loop", "SSAM50"),
        "SSAM90-loop/SSAM90": ratio("SSAM90-loop", "SSAM90"),
        "SAM-loop-copy/SAM": ratio("SAM-loop-copy", "SAM"),
    }
    out("ratios (median of per-round ratios; loop/ours > 1 means ours is faster):")
    for k, v in ratios.items():
        out(f"  {k:<20}{v:>7.3f}")
    ssam_ok = max(ratios["SSAM50/SAM"], ratios["SSAM90/SAM"]) <= 1.3
    loop_ok = min(ratios["SAM-loop/SAM"], ratios["SSAM50-loop/SSAM50"], ratios["SSAM90-loop/SSAM90"]) > 1.0
    out("  (SAM-loop-copy: the loop with ssam_tune's exact backup/copy restore instead of p.sub_(e))")
    out(f"targets: SSAM <= 1.3x SAM: {'met' if ssam_ok else 'NOT met'}; "
        f"ours faster than the loop: {'met' if loop_ok else 'NOT met'}")
    # What the reference's restore by subtraction does to w (ssam_tune restores by copy).
    with torch.no_grad():
        w0 = [p.detach().clone() for p in params]
        loop = variants["SAM-loop"]
        loop.first_step()
        for p, e in loop.e.items():
            p.sub_(e)
        loop.e = {}
        off = sum(int((p != w).sum()) for p, w in zip(params, w0, strict=True))
        for p, w in zip(params, w0, strict=True):
            p.copy_(w)
    out(f"reference restore p.sub_(e) after p.add_(e): {off} of {n} weights ({off / n:.2%}) not restored "
        f"bit-exactly in one step (ssam_tune: 0, by construction)")
    del variants, model, params
    return ratios


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_device_args(ap, NAME)
    ap.add_argument("--quick", action="store_true", help="smoke run: ResNet-18 only, 2 rounds")
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    device = setup(args)
    out = Tee()
    header(out, NAME, device)
    torch.manual_seed(0)
    gpu = device.type == "cuda"
    models = [("resnet18 (CIFAR, 10 classes)", lambda: build_model("resnet18", 10))]
    if not args.quick:
        models.append(("wrn28_10 (CIFAR, 100 classes)", lambda: build_model("wrn28_10", 100)))
    for label, build in models:
        is_wrn = label.startswith("wrn")
        if args.quick:
            rounds, steps = 2, 1
        else:
            rounds = args.rounds or (15 if gpu else (21 if is_wrn else 31))
            steps = 20 if gpu else (1 if is_wrn else 2)
        bench_model(out, label, build(), device, rounds, steps)
    out(f"# wall time {time.perf_counter() - t_start:.0f} s")
    out.save(output_path(args, NAME))


if __name__ == "__main__":
    main()
