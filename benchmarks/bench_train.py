"""Training throughput of SGD, SAM and SSAM (50%) through the real training loop.

Runs ssam_tune.train.Trainer's epoch loop (in-memory data on the device, vectorised
augmentation, mask refreshes included) on the embedded CIFAR-10 subset, interleaving the
methods round by round so they see the same machine state, and prints images/s and ratios.

    python benchmarks/bench_train.py                      # CPU, width 0.25
    python benchmarks/bench_train.py --device cuda --width 1.0 --out OUT.txt   # GPU: bf16, channels_last

Output is written line by line (flushed), so a run cut short still leaves its numbers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import Tee, header, interleave  # noqa: E402

from ssam_tune.config import config_from_dict  # noqa: E402
from ssam_tune.data import load_dataset  # noqa: E402
from ssam_tune.train import Trainer  # noqa: E402

NAME = Path(__file__).stem
METHODS = [("sgd", {}), ("sam", {}), ("ssam_f", {"sparsity": 0.5, "N_F": 128}), ("ssam_d", {"sparsity": 0.5})]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--width", type=float, default=None, help="default 0.25 on CPU, 1.0 on GPU")
    p.add_argument("--batch-size", type=int, default=None, help="default 64 on CPU, 128 on GPU")
    p.add_argument("--steps", type=int, default=None, help="steps per timed epoch (default 8 CPU, 35 GPU)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=240.0, help="stop starting new rounds after this")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    gpu = args.device.startswith("cuda")
    width = args.width or (1.0 if gpu else 0.25)
    bs = args.batch_size or (128 if gpu else 64)
    steps = args.steps or (35 if gpu else 8)
    say = Tee(live=args.out)  # each line is written to --out as it comes

    start = time.perf_counter()
    header(say, NAME, args.device)
    say(f"# resnet18 width {width}, batch {bs}, {steps} steps per timed epoch, embedded CIFAR-10 subset in memory"
        f"{', bf16 autocast + channels_last' if gpu else ', fp32'}")
    data = load_dataset("embedded", val_fraction=0.1, seed=0)
    trainers = {}
    for name, extra in METHODS:
        cfg = config_from_dict({"model": {"width": width}, "train": {
            "epochs": 1000, "batch_size": bs, "max_steps_per_epoch": steps, "device": args.device},
            "method": {"name": name, **extra}})
        trainers[name] = Trainer(cfg, data=data)
        trainers[name]._train_epoch()  # warm-up: allocator, cuDNN autotuning, first mask
    rates: dict[str, list[float]] = {name: [] for name, _ in METHODS}

    def record(r: int, name: str, seconds: float, metrics) -> None:
        rates[name].append(metrics["train_images"] / seconds)
        say(f"round {r}: {name:7s} {rates[name][-1]:10.1f} img/s")

    # Rounds in a fixed method order; no round starts after --budget-s (the first always runs).
    times = interleave({name: tr._train_epoch for name, tr in trainers.items()}, args.rounds, args.device,
                       rotate=False, each=record, deadline=start + args.budget_s)
    done = min(len(t) for t in times.values())
    if done < args.rounds:
        say(f"# time budget reached after {done} rounds")
    say()
    say(f"{'method':8s} {'median img/s':>14s} {'vs sgd':>8s} {'vs sam':>8s}")
    med = {k: statistics.median(v) for k, v in rates.items() if v}
    for name in med:
        say(f"{name:8s} {med[name]:14.1f} {med[name] / med['sgd']:8.3f} {med[name] / med['sam']:8.3f}")
    say("# SAM and SSAM do two forward/backward passes per step (about 0.5x SGD expected); SSAM's")
    say("# mask makes no dense-hardware saving (the paper's savings are theoretical), so SSAM ~ SAM;")
    say("# ssam_f includes one Fisher refresh (N_F=128) per timed epoch, as T_m=1 does.")
    say(f"# total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
