"""ssam_tune.method.masks.fisher_scores against a batch-size-1 loop with the same BatchNorm mode.

Model: CIFAR ResNet-18 (10 classes) at reduced width on CPU (default 0.5; full width 1.0 with
--device cuda), random 32x32 inputs and labels. For N_F in {128, 512} and for both BatchNorm
modes, time:

- ``loop``: the reference's way, written below: deep copy of the model, train mode for
  bn="per_sample" (each sample's BatchNorm uses its own statistics) or eval mode for
  bn="eval" (running statistics), then one forward/backward per sample, accumulating grad**2.
- ``layers``: fisher_scores(..., method="layers") (batched forward/backward per chunk, per-
  sample squares formed layer by layer).
- ``vmap``: fisher_scores(..., method="vmap") (torch.func), for N_F=128 only on CPU (slow).

Rounds of interleaved runs (the order rotates every round); median seconds per call, ms per
sample, and speedup = loop time / method time as the median of per-round ratios (why:
benchmarks/_common.py).

Agreement, from the first round's results: ``vs loop`` is the largest |method - loop| over
all entries divided by the largest |loop| entry of the same parameter tensor (max over
tensors). Float32 Fisher sums of a real network are ill-conditioned (a sample whose BatchNorm
channel has almost no variance amplifies round-off), so for the smaller N_F the script also
runs the batch-size-1 loop in float64 as the truth and prints every float32 result's error
against it (``vs f64``, same measure). On CUDA, PyTorch lets cuDNN run float32 convolutions
in TF32 by default, which makes every float32 result (the loop's too) much less accurate;
--no-tf32 turns that off. No assertion on the numbers.

    .venv/bin/python benchmarks/bench_fisher.py              # CPU, writes bench_fisher.txt
    .venv/bin/python benchmarks/bench_fisher.py --quick      # smoke run (stdout only)
    .venv/bin/python benchmarks/bench_fisher.py --device cuda
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

from ssam_tune.method.masks import fisher_scores
from ssam_tune.training.models import build_model, count_params

NAME = Path(__file__).stem


def loop_fisher(model, inputs, targets, bn: str) -> list[torch.Tensor]:
    """Batch-size-1 loop: sum over samples of squared per-sample gradients of the NLL."""
    work = copy.deepcopy(model).train(bn == "per_sample")
    params = list(work.parameters())
    acc = [torch.zeros_like(p) for p in params]
    for i in range(inputs.shape[0]):
        for p in params:
            p.grad = None
        F.cross_entropy(work(inputs[i:i + 1]), targets[i:i + 1]).backward()
        for a, p in zip(acc, params, strict=True):
            if p.grad is not None:
                a.add_(p.grad.square())
    return acc


def max_rel_diff(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    worst = 0.0
    for g, r in zip(got, ref, strict=True):
        scale = float(r.abs().max())
        if scale > 0:
            worst = max(worst, float((g - r).abs().max()) / scale)
    return worst


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_device_args(ap, NAME, tf32_flag=True)
    ap.add_argument("--quick", action="store_true", help="smoke run: width 0.125, N_F in {16, 32}, 1 round")
    ap.add_argument("--width", type=float, default=None, help="ResNet-18 width (default 0.5 on CPU, "
                    "1.0 on CUDA)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="N_F values (default 128 512)")
    ap.add_argument("--no-vmap", action="store_true", help="skip method='vmap'")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    device = setup(args)
    gpu = device.type == "cuda"
    if args.quick:
        width, sizes, rounds = args.width or 0.125, (16, 32), args.rounds or 1
    else:
        width, sizes, rounds = args.width or (1.0 if gpu else 0.5), (128, 512), args.rounds or 3
    sizes = tuple(args.sizes) if args.sizes else sizes
    vmap_sizes = set() if args.no_vmap else (set(sizes) if gpu else {min(sizes)})

    out = Tee()
    header(out, NAME, device)
    torch.manual_seed(0)
    model = build_model("resnet18", 10, width=width).to(device)
    # Non-trivial running statistics for bn="eval": a few train-mode passes, then eval mode
    # (fisher_scores and the loop both work on copies and leave the model as found).
    with torch.no_grad():
        model.train()
        for _ in range(3):
            model(torch.randn(64, 3, 32, 32, device=device))
    model.eval()
    out(f"\n## resnet18 width {width} ({count_params(model) / 1e6:.2f}M parameters), 32x32 random data, "
        f"{rounds} round(s) per size, interleaved; fisher_scores chunk_size default (128 for 'layers')")
    if not gpu and width < 1.0:
        out(f"# width reduced to {width} on CPU to keep the run within a few minutes "
            f"(--device cuda uses full width)")
    out(f"{'bn':<11}{'N_F':>5}  {'method':<7}{'median s':>10}{'ms/sample':>11}{'speedup':>9}"
        f"{'vs loop':>10}{'vs f64':>10}")
    model64 = copy.deepcopy(model).double()
    g = torch.Generator().manual_seed(1)
    verdicts = []
    for n_f in sizes:
        x = torch.randn(n_f, 3, 32, 32, generator=g).to(device)
        y = torch.randint(0, 10, (n_f,), generator=g).to(device)
        for bn in ("per_sample", "eval"):
            fns = {
                "loop": lambda x=x, y=y, bn=bn: loop_fisher(model, x, y, bn),
                "layers": lambda x=x, y=y, bn=bn: fisher_scores(model, None, x, y, bn=bn, method="layers"),
            }
            if n_f in vmap_sizes:
                fns["vmap"] = lambda x=x, y=y, bn=bn: fisher_scores(model, None, x, y, bn=bn, method="vmap")
            names = list(fns)
            results = {}  # the first round's result of each method
            times = interleave(fns, rounds, device,
                               each=lambda r, k, t, res, first=results: first.setdefault(k, res))
            truth = None
            if n_f == min(sizes):
                truth = loop_fisher(model64, x.double(), y, bn)
            for k in names:
                med = statistics.median(times[k])
                err = "" if truth is None else f"{max_rel_diff([t.double() for t in results[k]], truth):.1e}"
                if k == "loop":
                    speed, diff = "", ""
                else:
                    s = paired_ratio(times, "loop", k)
                    speed = f"{s:.2f}x"
                    diff = f"{max_rel_diff(results[k], results['loop']):.1e}"
                    target = 1.0 if bn == "per_sample" else 2.0
                    verdicts.append((bn, n_f, k, s, target))
                out(f"{bn:<11}{n_f:>5}  {k:<7}{med:>10.3f}{med / n_f * 1e3:>11.2f}{speed:>9}{diff:>10}{err:>10}")
            del results, truth
    out("targets: bn='per_sample' never slower than the loop (speedup >= 1); bn='eval' at least 2x")
    for bn, n_f, k, s, target in verdicts:
        out(f"  {bn:<11}N_F={n_f:<4} {k:<7} speedup {s:5.2f}x  target >= {target:.0f}x: "
            f"{'met' if s >= target else 'NOT met'}")
    out(f"# wall time {time.perf_counter() - t_start:.0f} s")
    out.save(output_path(args, NAME))


if __name__ == "__main__":
    main()
