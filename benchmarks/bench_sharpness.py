"""Sharpness diagnostics (ssam_tune/method/sharpness.py): the cost of a Hessian-vector product
with the gradient graph kept (``Hessian``, what ``python -m ssam_tune.sharpness`` uses) against
one that rebuilds the forward pass and gradient graph for every product (how the first version
computed it), side by side, and the wall time of the whole measurement with the CLI's defaults.

Model: CIFAR ResNet-18 at ``--width`` (default 0.25), seeded initial weights in eval mode (the
cost does not depend on the weights), ``--samples`` embedded CIFAR-10 training images in
batches of 250, float32 on the CPU. Rounds interleave the two kinds of product (one product
each per round; benchmarks/_common.py says why). Then one timed ``sharpness()`` call with the
CLI's defaults (``ssam_tune.sharpness.ITERS`` Lanczos steps and ``TRACE_SAMPLES`` Hutchinson
probes, one product each) and the goal of issue 23:
under 2 minutes for 1,000 samples on this 2-core CPU.

    python benchmarks/bench_sharpness.py --threads 2    # both cores, as the CLI uses them: minutes
    python benchmarks/bench_sharpness.py --samples 250 --rounds 2 --out -   # a quick look

No assertion on the numbers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from _common import Tee, add_device_args, header, interleave, output_path, setup  # noqa: E402

from ssam_tune.method.sharpness import Hessian, hvp, sharpness  # noqa: E402
from ssam_tune.sharpness import ITERS, TRACE_SAMPLES  # noqa: E402
from ssam_tune.training.batches import sample_for_fisher  # noqa: E402
from ssam_tune.training.data import load_dataset  # noqa: E402
from ssam_tune.training.models import build_model  # noqa: E402

NAME = Path(__file__).stem
GOAL_S = 120.0  # whole measurement, 1,000 samples, ResNet-18 width 0.25, 2-core CPU


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_device_args(ap, NAME)
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    device = setup(args)
    say = Tee()
    header(say, NAME, device)
    data = load_dataset("embedded", val_fraction=0.1, seed=0)
    torch.manual_seed(0)
    model = build_model("resnet18", 10, width=args.width, input_shape=(3, 32, 32)).to(device).eval()
    x, y = sample_for_fisher(data.train, args.samples, torch.Generator().manual_seed(0))
    batches = [(x[i:i + 250].to(device), y[i:i + 250].to(device)) for i in range(0, len(y), 250)]
    params = [p for p in model.parameters() if p.requires_grad]
    d = sum(p.numel() for p in params)
    say(f"# resnet18 width {args.width} ({d} parameters), {len(y)} samples in {len(batches)} batches, eval mode, "
        f"float32, {args.rounds} rounds")
    v = torch.randn(d, generator=torch.Generator().manual_seed(1)).to(device)

    t0 = time.perf_counter()
    kept = Hessian(model, batches)
    build_s = time.perf_counter() - t0
    say(f"building the kept graphs (once per measurement): {build_s:.2f} s")
    a, b = kept(v), hvp(model, batches, v)  # hvp: the graphs built for this one product
    say(f"the two products agree: max |difference| / max |H v| = {float((a - b).abs().max() / b.abs().max()):.2e}")
    times = interleave({"kept graph": lambda: kept(v), "rebuilt graph": lambda: hvp(model, batches, v)},
                       args.rounds, device,
                       each=lambda r, name, s, _: say(f"round {r}: {name:14s} {s:7.2f} s per product"))
    med = {k: statistics.median(t) for k, t in times.items()}
    ratio = statistics.median(k / r for k, r in zip(times["kept graph"], times["rebuilt graph"], strict=True))
    say(f"median seconds per product: kept {med['kept graph']:.2f}, rebuilt {med['rebuilt graph']:.2f}; "
        f"kept / rebuilt {ratio:.3f} (median of per-round ratios)")
    kept.grads.clear()  # free the kept graphs before the whole measurement builds its own

    t0 = time.perf_counter()
    out = sharpness(model, batches, k=5, iters=ITERS, trace_samples=TRACE_SAMPLES)
    whole = time.perf_counter() - t0
    verdict = "met" if whole <= GOAL_S else "NOT met"
    say(f"sharpness() with the CLI's defaults ({ITERS} Lanczos steps, {TRACE_SAMPLES} probes): {whole:.1f} s "
        f"(lambda_max {out['lambda_max']:.4g}, trace {out['trace']:.4g}); goal <= {GOAL_S:.0f} s for 1,000 "
        f"samples: {verdict if len(y) >= 1000 else 'not judged (fewer samples)'}")
    say.save(output_path(args, NAME))


if __name__ == "__main__":
    main()
