"""`python -m ssam_tune.sharpness RUN_OR_CHECKPOINT`: how sharp the minimum a run found is.

    python -m ssam_tune.sharpness runs/ssam_f_embedded/            # a train CLI run folder
    python -m ssam_tune.sharpness results/ray/<name>/checkpoints/<trial id>/checkpoint.pt
    python -m ssam_tune.sharpness RUN --samples 1000 --iters 15 --trace-samples 15 [--json]

Reads the checkpoint (``checkpoint.pt``, or a folder holding one), rebuilds the model from the
config stored in it, and reports, on a fixed seeded subset of the training split (not
augmented; BatchNorm in eval mode): the top Hessian eigenvalue ``lambda_max`` and the k-th
(Lanczos on Hessian-vector products), their ratio, and the Hessian trace (Hutchinson), all
of the mean training cross-entropy (method/sharpness.py).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from ssam_tune.storage.experiment import CKPT_FILE

__all__ = ["ITERS", "TRACE_SAMPLES", "front_sharpness", "main", "measure"]

# The defaults: each Lanczos step and each Hutchinson probe is one Hessian-vector product (about
# 3.4 s for 1,000 CIFAR images on ResNet-18 width 0.25 on 2 CPU cores,
# benchmarks/bench_sharpness.txt), so 15 + 15 keeps a measurement under 2 minutes there.
# Lanczos finds the top eigenvalues in few steps; the trace's standard error is reported.
ITERS, TRACE_SAMPLES = 15, 15


def _checkpoint(path: Path) -> Path:
    if path.is_dir():
        path = path / CKPT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint here (give a checkpoint.pt, or the folder of a run of "
                                "python -m ssam_tune.train, or a trial's checkpoints/<trial id>/ folder)")
    return path


def measure(path: str | Path, *, samples: int = 1000, k: int = 5, iters: int = ITERS,
            trace_samples: int = TRACE_SAMPLES, seed: int = 0, batch: int = 250, device: str = "cpu") -> dict:
    """The sharpness of the model in a checkpoint (see the module doc); also the number of
    samples and the seconds it took."""
    import torch

    from ssam_tune.method.sharpness import sharpness
    from ssam_tune.training.batches import sample_for_fisher
    from ssam_tune.training.config import config_from_dict
    from ssam_tune.training.trainer import Trainer, load_checkpoint

    start = time.perf_counter()
    ckpt = _checkpoint(Path(path))
    state = load_checkpoint(ckpt)
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise ValueError(f"{ckpt}: not an ssam-tune training checkpoint")
    cfg = config_from_dict(state["config"])
    trainer = Trainer(cfg, device=device)  # the run's data split and model
    trainer.model.load_state_dict(state["model"])
    if not trainer.data.in_memory:
        raise ValueError(f"{ckpt}: sharpness needs an in-memory data set (this run reads image files)")
    x, y = sample_for_fisher(trainer.train_split, samples, torch.Generator().manual_seed(seed))
    batches = [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(y), batch)]
    out = sharpness(trainer.model, batches, k=k, iters=iters, trace_samples=trace_samples, seed=seed)
    return {"checkpoint": str(ckpt), "epoch": state.get("epoch"), "method": cfg.method.name, "samples": len(y),
            **out, "seconds": time.perf_counter() - start}


def front_sharpness(exp_root: str, trial_ids: list[str], *, log=print, **kw) -> dict[str, dict]:
    """``tune.diagnostics: sharpness``: :func:`measure` on each trial's newest checkpoint
    (its final weights: the front is built from completed trials), kept by trial id in the
    experiment's ``diagnostics.json`` under ``"sharpness"``, written after each trial so an
    interrupted run keeps what it measured; a trial measured before is not measured again. A
    trial that cannot be measured (no checkpoint kept, data read from image files) gets
    ``{"error": why}``. ``kw`` goes to :func:`measure`. Returns the ``"sharpness"`` mapping."""
    import tempfile

    from ssam_tune.storage.experiment import DIAGNOSTICS_FILE, Experiment

    exp = Experiment(exp_root)
    diagnostics = json.loads(exp.read_text(DIAGNOSTICS_FILE) or "{}")
    done = diagnostics.setdefault("sharpness", {})
    for trial_id in trial_ids:
        if trial_id in done:
            continue
        kept = exp.trial_checkpoints(trial_id)
        data = exp.read_bytes(f"{kept[-1]}/{CKPT_FILE}") if kept else None
        if data is None:
            done[trial_id] = {"error": "no checkpoint kept (tune.retain_checkpoints)"}
        else:
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / CKPT_FILE).write_bytes(data)
                try:
                    r = measure(Path(tmp) / CKPT_FILE, **kw) | {"checkpoint": kept[-1]}
                    # a zero k-th eigenvalue makes the ratio infinite: JSON has no infinity
                    done[trial_id] = {key: (v if not isinstance(v, float) or math.isfinite(v) else None)
                                      for key, v in r.items()}
                except (ValueError, FileNotFoundError) as err:
                    done[trial_id] = {"error": str(err).replace(str(Path(tmp) / CKPT_FILE), kept[-1])}
        r = done[trial_id]
        log(f"sharpness of trial {trial_id}: " + (f"lambda_max {r['lambda_max']:.4g}, trace {r['trace']:.4g} "
                                                   f"({r['seconds']:.0f} s)" if "error" not in r else r["error"]))
        exp.write_text(DIAGNOSTICS_FILE, json.dumps(diagnostics, indent=2, allow_nan=False) + "\n")
    return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ssam_tune.sharpness", description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a checkpoint.pt, or a folder holding one")
    p.add_argument("--samples", type=int, default=1000, help="training samples (seeded, not augmented)")
    p.add_argument("--k", type=int, default=5, help="report lambda_max and the k-th largest eigenvalue")
    p.add_argument("--iters", type=int, default=ITERS, help="Lanczos steps")
    p.add_argument("--trace-samples", type=int, default=TRACE_SAMPLES, help="Hutchinson probes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    for name in ("samples", "k", "iters", "trace_samples"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    try:
        r = measure(args.run, samples=args.samples, k=args.k, iters=args.iters, trace_samples=args.trace_samples,
                    seed=args.seed)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"{r['checkpoint']} (epoch {r['epoch']}, {r['method']}), {r['samples']} training samples, eval mode:")
    print(f"  lambda_max {r['lambda_max']:.4g}   lambda_{args.k} {r[f'lambda_{args.k}']:.4g}   "
          f"ratio {r[f'lambda_max_over_lambda_{args.k}']:.3g}")
    print(f"  trace {r['trace']:.4g} +- {r['trace_stderr']:.2g} (Hutchinson, {args.trace_samples} probes)")
    print(f"  {r['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
