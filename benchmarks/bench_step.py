"""Whole training-step time of SGD, SAM, SSAM, SSAM-T and SAM-ON, side by side.

Two models: CIFAR ResNet-18 (``build_model("resnet18", 10, width=W)``) and WideResNet-28
(``build_model("wrn28_10", 10, depth=28, widen_factor=K)``; the full WRN-28-10 on CUDA, a
narrower K on CPU so the run stays short: ``--wrn-widen``). Train mode, one fixed batch of
un-augmented, normalised images of the embedded CIFAR-10 subset (the same batch every step).
Each variant has its own copy of the same initial model and its own optimizer; base
optimizer everywhere SGD(lr=0.05, momentum=0.9, weight_decay=5e-4), rho = 0.05. A step is:

- ``SGD``: forward, loss.backward(), SGD.step() (1 forward/backward).
- ``SAM``: ``with opt.first_pass(): loss.backward()``; first_step(zero_grad=True);
  loss.backward(); second_step(zero_grad=True) (2 forward/backward; first_pass does nothing).
- ``SSAM 50%``: the same step with SSAM, a 50% random element mask (masks.random_mask) and
  normalize="full": the paper's method. Every gradient at w is needed for ||g||, so the pass
  at w is a full one: about 1.0x a SAM step on dense hardware.
- ``SSAM-T 50%`` / ``SSAM-T 90%``: SSAM-F at tensor granularity (granularity="tensor",
  tensor_score="per_flop", normalize="masked"): whole tensors chosen by
  ``opt.set_masks_from_scores`` from real Fisher scores (masks.fisher_scores on 64 training
  samples, the scores SSAM-F uses in training) and per-tensor backward costs
  (flops.backward_flops_per_tensor). ``opt.first_pass()`` turns off requires_grad of the
  unperturbed tensors (``opt.skipped()``), so the pass at w skips their weight gradients and
  stops backward at the earliest perturbed layer.
- ``SAM-ON``: only the normalization layers' parameters perturbed (masks.norm_mask),
  normalize="masked", the pass at w inside ``opt.first_pass()`` as for SSAM-T.

Masks are built once, before timing (the timed steps contain no mask refresh and no Fisher
pass). Reported per model: median ms/step (and min/max over rounds), img/s (batch / median
step), the perturbed fraction of the parameters (density), the number of perturbed tensors,
B1/B (backward of the pass at w over a full backward), the executed FLOPs per step relative to
SAM, (2F + B1 + B) / (2F + 2B), from flops.forward_backward_flops (with ``frozen`` = the
skipped tensors for B1; matmuls and convolutions only), and the measured time relative to SAM
(median over rounds of the per-round ratio, _common.paired_ratio). Then the goal line
"SSAM-T 50% <= 0.80x a SAM step", met or NOT met per model.

Rounds of interleaved blocks (one block of every variant per round, the order rotating every
round; why: benchmarks/_common.py); no round starts once the model's share of
``--budget-s`` is spent. CUDA: bf16 autocast (loss in float32) and channels_last, as the
trainer does (``--no-amp``: float32); CPU: float32, 1 thread. No assertion on the numbers.

Defaults: CPU ResNet-18 width 1.0 and WRN-28-4, batch 32, 24 rounds x 1 step (about 5-8
minutes on the 2-core machine: a round is about 5-7 s for ResNet-18 and 7-10 s for WRN-28-4,
plus about 1 minute of set-up and warm-up; the 600 s budget caps the timing); CUDA ResNet-18
width 1.0 and WRN-28-10, batch 128, 30 rounds x 10 steps.

    .venv/bin/python benchmarks/bench_step.py              # CPU, writes bench_step.txt
    .venv/bin/python benchmarks/bench_step.py --quick      # smoke run (tiny sizes, stdout only)
    .venv/bin/python benchmarks/bench_step.py --device cuda   # writes bench_step_cuda.txt
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import Tee, add_device_args, header, interleave, output_path, paired_ratio, setup

from ssam_tune import SAM, SSAM
from ssam_tune.method.flops import backward_flops_per_tensor, forward_backward_flops
from ssam_tune.method.masks import fisher_scores, mask_stats, norm_mask, random_mask
from ssam_tune.training.batches import sample_for_fisher
from ssam_tune.training.data import load_dataset
from ssam_tune.training.models import build_model, count_params

NAME = Path(__file__).stem
BASE = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}
RHO = 0.05
SHAPE = (3, 32, 32)
GOAL = ("SSAM-T 50%", 0.80)  # variant, time vs SAM at most
MODELS = ("resnet18", "wrn28")


class Variant:
    """One timed variant: its model copy, optimizer and what the table reports about it."""

    def __init__(self, name: str, model, opt, passes: str) -> None:
        self.name, self.model, self.opt, self.passes = name, model, opt, passes
        self.density: float | None = None
        self.tensors: str = ""
        self.b1: float | None = None  # backward FLOPs per sample of the pass at w


def make_variants(model, scores, costs: dict[str, float], seed: int) -> list[Variant]:
    """SGD, SAM, SSAM 50%, SSAM-T 50%, SSAM-T 90%, SAM-ON, each on its own copy of ``model``."""
    out = []

    m = copy.deepcopy(model)
    out.append(Variant("SGD", m, torch.optim.SGD(m.parameters(), **BASE), "1"))
    m = copy.deepcopy(model)
    out.append(Variant("SAM", m, SAM(m.parameters(), torch.optim.SGD, rho=RHO, **BASE), "2"))

    m = copy.deepcopy(model)
    opt = SSAM(m.parameters(), torch.optim.SGD, rho=RHO, sparsity=0.5, normalize="full", **BASE)
    gen = torch.Generator(device=next(m.parameters()).device).manual_seed(seed)
    opt.set_masks(random_mask(opt.params(), 0.5, gen))
    out.append(Variant("SSAM 50%", m, opt, "2"))

    for s in (0.5, 0.9):
        m = copy.deepcopy(model)
        opt = SSAM(m.parameters(), torch.optim.SGD, rho=RHO, sparsity=s, normalize="masked",
                   granularity="tensor", tensor_score="per_flop", **BASE)
        opt.set_masks_from_scores(scores, list(m.parameters()), [costs[n] for n, _ in m.named_parameters()])
        out.append(Variant(f"SSAM-T {round(s * 100)}%", m, opt, "2, lean pass at w"))

    m = copy.deepcopy(model)
    opt = SSAM(m.parameters(), torch.optim.SGD, rho=RHO, sparsity=0.5, normalize="masked", **BASE)
    opt.set_masks(norm_mask(m, opt.params()))
    out.append(Variant("SAM-ON", m, opt, "2, lean pass at w"))
    return out


def step_fn(v: Variant, x, y, amp: torch.dtype | None, per_block: int):
    """``per_block`` training steps of variant ``v`` on the batch (x, y)."""
    model, opt = v.model, v.opt

    def loss():
        with torch.autocast(x.device.type, dtype=amp) if amp is not None else contextlib.nullcontext():
            return F.cross_entropy(model(x).float(), y)

    if isinstance(opt, SAM):
        def one():
            with opt.first_pass():  # SSAM-T, SAM-ON: only the perturbed tensors' gradients
                loss().backward()
            opt.first_step(zero_grad=True)
            loss().backward()
            opt.second_step(zero_grad=True)
    else:
        def one():
            loss().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    def block():
        for _ in range(per_block):
            one()
    return block


def build(kind: str, args):
    """(model on the CPU, description) for ``kind`` in MODELS."""
    if kind == "resnet18":
        model = build_model("resnet18", 10, width=args.width)
        return model, f"CIFAR ResNet-18, width {args.width}"
    model = build_model("wrn28_10", 10, depth=args.wrn_depth, widen_factor=args.wrn_widen)
    note = "" if (args.wrn_depth, args.wrn_widen) == (28, 10) else " (reduced: the full model is WRN-28-10)"
    return model, f"WideResNet-{args.wrn_depth}-{args.wrn_widen}{note}"


def bench_model(out, kind: str, args, data, device, amp, rounds: int, per_block: int, warmup: int,
                budget_s: float) -> dict:
    """Set up, warm up and time the variants on model ``kind``; print its table. No round
    starts ``budget_s`` seconds after the timing began."""
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model, desc = build(kind, args)
    model.train()
    F_, B_ = forward_backward_flops(model, SHAPE)  # per sample, meta device
    costs = backward_flops_per_tensor(model, SHAPE)
    model.to(device)
    gen = torch.Generator().manual_seed(1)
    x, y = sample_for_fisher(data.train, args.batch, gen)
    xf, yf = sample_for_fisher(data.train, args.n_fisher, gen)
    x, y, xf, yf = x.to(device), y.to(device), xf.to(device), yf.to(device)
    scores = fisher_scores(model, None, xf, yf)  # model.parameters() order, float32
    if amp is not None:  # as the trainer on CUDA: channels_last model and batch
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    variants = make_variants(model, scores, costs, seed=2)
    for v in variants:
        if isinstance(v.opt, SSAM):
            masks = v.opt.masks()
            v.density = mask_stats(masks)["density"]
            on = sum(bool(m.any()) for m in masks)
            v.tensors = f"{on}/{len(masks)}"
            names = {p: n for n, p in v.model.named_parameters()}
            skipped = [names[p] for p in v.opt.skipped()]
            v.b1 = forward_backward_flops(v.model, SHAPE, frozen=skipped)[1] if skipped else B_
        elif isinstance(v.opt, SAM):
            v.b1 = B_
    setup_s = time.perf_counter() - t0
    for v in variants:  # warm-up: allocator, momentum buffers, backups, cuDNN/oneDNN choices
        step_fn(v, x, y, amp, warmup)()
    fns = {v.name: step_fn(v, x, y, amp, per_block) for v in variants}
    t1 = time.perf_counter()
    seconds = interleave(fns, rounds, device, deadline=t1 + budget_s)
    timed_s = time.perf_counter() - t1
    times = {name: [t / per_block * 1e3 for t in ts] for name, ts in seconds.items()}  # ms/step
    done = len(times["SGD"])

    out(f"\n## {desc}: {count_params(model) / 1e6:.2f}M parameters, batch {args.batch}, 32x32 CIFAR-10 "
        f"images, train mode, {'bf16 autocast + channels_last' if amp is not None else 'float32'}")
    cut = " (time budget reached)" if done < rounds else ""
    out(f"# {done} rounds x {per_block} step(s) per variant (interleaved){cut}; "
        f"Fisher scores on {args.n_fisher} samples; F = {F_ / 1e9:.3f}, B = {B_ / 1e9:.3f} GFLOP/sample; "
        f"set-up {setup_s:.0f} s, timing {timed_s:.0f} s")
    out(f"{'variant':<12}{'ms/step':>10}{'min':>9}{'max':>9}{'img/s':>9}{'density':>9}{'tensors':>9}"
        f"{'B1/B':>7}{'FLOPs/SAM':>11}{'time/SAM':>10}   forward/backward passes")
    sam_flops = 2 * F_ + 2 * B_
    ratios = {}
    for v in variants:
        ts = times[v.name]
        med = statistics.median(ts)
        flops = (F_ + B_) if v.b1 is None else (2 * F_ + v.b1 + B_)
        ratios[v.name] = paired_ratio(times, v.name, "SAM")
        dens = "" if v.density is None else f"{v.density:.3f}" if v.density >= 0.01 else f"{v.density:.1e}"
        b1 = "" if v.b1 is None else f"{v.b1 / B_:.3f}"
        out(f"{v.name:<12}{med:>10.1f}{min(ts):>9.1f}{max(ts):>9.1f}{args.batch / med * 1e3:>9.1f}{dens:>9}"
            f"{v.tensors:>9}{b1:>7}{flops / sam_flops:>11.3f}{ratios[v.name]:>10.3f}   {v.passes}")
    out(f"SAM/SGD time {paired_ratio(times, 'SAM', 'SGD'):.3f} (2 forward/backward passes: about 2 expected); "
        f"SSAM 50% (element, normalize full) expected ~1.0x SAM")
    return {"desc": desc, "ratio": ratios[GOAL[0]]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_device_args(ap, NAME, tf32_flag=True)
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny models, batch 8, 2 rounds, stdout only")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {MODELS}")
    ap.add_argument("--width", type=float, default=None, help="ResNet-18 width (default 1.0; --quick 0.125)")
    ap.add_argument("--wrn-widen", type=int, default=None, help="WRN widen_factor (default 4 on CPU, "
                    "10 on CUDA; --quick 1)")
    ap.add_argument("--wrn-depth", type=int, default=None, help="WRN depth (default 28; --quick 10)")
    ap.add_argument("--batch", type=int, default=None, help="default 32 on CPU, 128 on CUDA; --quick 8")
    ap.add_argument("--n-fisher", type=int, default=None, help="Fisher samples (default 64; --quick 16)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per model (default 24 on CPU, "
                    "30 on CUDA; --quick 2)")
    ap.add_argument("--per-block", type=int, default=None, help="steps per timed block (default 1 on "
                    "CPU, 10 on CUDA)")
    ap.add_argument("--budget-s", type=float, default=None, help="timing budget (set-up and warm-up not "
                    "included), shared equally by the models: no round starts after a model's share "
                    "(default 600 on CPU, 300 on CUDA)")
    ap.add_argument("--no-amp", action="store_true", help="CUDA: float32 and the default memory format "
                    "instead of bf16 autocast + channels_last")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    device = setup(args)
    gpu = device.type == "cuda"
    q = args.quick
    args.width = args.width if args.width is not None else (0.125 if q else 1.0)
    args.wrn_widen = args.wrn_widen if args.wrn_widen is not None else (1 if q else 10 if gpu else 4)
    args.wrn_depth = args.wrn_depth if args.wrn_depth is not None else (10 if q else 28)
    args.batch = args.batch if args.batch is not None else (8 if q else 128 if gpu else 32)
    args.n_fisher = args.n_fisher if args.n_fisher is not None else (16 if q else 64)
    rounds = args.rounds if args.rounds is not None else (2 if q else 30 if gpu else 24)
    per_block = args.per_block if args.per_block is not None else (10 if gpu and not q else 1)
    warmup = 1 if q or not gpu else 3
    budget = args.budget_s if args.budget_s is not None else (300.0 if gpu else 600.0)
    amp = torch.bfloat16 if gpu and not args.no_amp else None
    kinds = [k.strip() for k in args.models.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(MODELS))
    if unknown or not kinds:
        raise SystemExit(f"--models: unknown {unknown}; choices {MODELS}")

    out = Tee()
    header(out, NAME, device)
    out(f"# sizes: ResNet-18 width {args.width}, WRN-{args.wrn_depth}-{args.wrn_widen}, batch {args.batch}, "
        f"{rounds} rounds x {per_block} step(s), timing budget {budget:.0f} s; "
        f"{'bf16 autocast + channels_last' if amp is not None else 'float32'}")
    data = load_dataset("embedded", val_fraction=0.1, seed=0)
    results = []
    for kind in kinds:
        results.append(bench_model(out, kind, args, data, device, amp, rounds, per_block, warmup,
                                   budget / len(kinds)))
    out("\n" + f"goal: {GOAL[0]} <= {GOAL[1]:.2f}x a SAM step")
    for r in results:
        out(f"  {r['desc']}: {r['ratio']:.3f}x  {'met' if r['ratio'] <= GOAL[1] else 'NOT met'}")
    out(f"# wall time {time.perf_counter() - t_start:.0f} s")
    out.save(output_path(args, NAME))


if __name__ == "__main__":
    main()
