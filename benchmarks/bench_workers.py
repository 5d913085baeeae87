"""Data-parallel training steps of the real Trainer: 1 worker against 2 workers (gloo, CPU).

``ssam_tune.training.trainer.Trainer`` is data-parallel when a torch.distributed process group is
initialised: ``train.batch_size`` is the global batch, each rank trains on its half of it,
and gradients are averaged after both SAM passes (ssam_tune/training/distributed.py). This script
times whole epochs of ``Trainer._train_epoch()`` (divided by ``trainer.steps_per_epoch``) for
SGD, SAM and SSAM-F (sparsity 0.5, element masks, normalize full, N_F 128 Fisher samples,
mask rebuilt at the first step of every epoch as T_m = 1 epoch does) on a CIFAR ResNet-18
of reduced width with the embedded CIFAR-10 subset, the same global batch in three set-ups:

- ``1w x 1t``: one process, no process group, 1 torch thread;
- ``1w x 2t``: one process, no process group, 2 torch threads (the same cores as 2 workers);
- ``2w x 1t``: two processes (torch.multiprocessing, spawn) in a gloo group (file:// store),
  1 thread each. Their timed block is ``_train_epoch()`` and then ``_check_replicas()``
  (BatchNorm running statistics averaged, masks compared bit for bit: what ``Trainer.epochs``
  adds once per epoch on several workers), after a barrier; rank 0's clock.

Every set-up keeps its processes, one Trainer per method (each with one untimed warm-up
epoch), for the whole run; idle processes wait on a queue. A round runs one epoch of every
(method, set-up) pair, the three set-ups of a method back to back, the order rotating every
round (why: benchmarks/_common.py); ratios are medians of the per-round ratios. No round
starts once ``--budget-s`` is spent. No assertion on the numbers.

    .venv/bin/python benchmarks/bench_workers.py > benchmarks/bench_workers.txt   # about 5 minutes
    .venv/bin/python benchmarks/bench_workers.py --quick                         # smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _common import Tee, header, paired_ratio

NAME = Path(__file__).stem
METHODS = ("sgd", "sam", "ssam_f")
SETUPS = {"1w x 1t": (1, 1), "1w x 2t": (1, 2), "2w x 1t": (2, 1)}  # name: (workers, threads each)


def make_config(method: str, args: argparse.Namespace):
    from ssam_tune.training.config import config_from_dict

    return config_from_dict({
        "seed": 0,
        "model": {"name": "resnet18", "width": args.width},
        "data": {"name": "embedded", "train_size": args.train_size, "val_fraction": 0.1},
        "train": {"epochs": 1000, "batch_size": args.batch, "device": "cpu", "precision": "fp32"},
        "method": {"name": method, "sparsity": 0.5},
    })


def worker(rank: int, setup: str, world: int, threads: int, args: argparse.Namespace, store: str,
           cmd_qs: list, res_q) -> None:
    """One process of a set-up: build a Trainer per method, then run the epochs it is sent."""
    torch.set_num_threads(threads)
    try:
        from ssam_tune.training.trainer import Trainer, load_data

        if world > 1:
            dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                    timeout=timedelta(seconds=600))
        data = load_data(make_config(args.methods[0], args))
        trainers = {m: Trainer(make_config(m, args), data=data) for m in args.methods}
        res_q.put((setup, rank, "ready", trainers[args.methods[0]].steps_per_epoch, 0.0))
        while (method := cmd_qs[rank].get()) is not None:
            tr = trainers[method]
            if world > 1:
                dist.barrier()
            t0 = time.perf_counter()
            if tr._train_epoch() is None:
                raise RuntimeError(f"{method}: the training loss became NaN or infinite")
            t1 = time.perf_counter()
            if world > 1:
                tr._check_replicas()
            res_q.put((setup, rank, method, time.perf_counter() - t0, time.perf_counter() - t1))
    except BaseException:
        res_q.put((setup, rank, "error", traceback.format_exc(), 0.0))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    os._exit(0)  # skip the interpreter's teardown (see tests/test_distributed.py)


def collect(res_q, n: int) -> list[tuple]:
    """The next ``n`` results; an error from any process stops the run with its traceback."""
    got = []
    for _ in range(n):
        item = res_q.get(timeout=900)
        if item[2] == "error":
            raise SystemExit(f"{item[0]} rank {item[1]} failed:\n{item[3]}")
        got.append(item)
    return got


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: width 0.125, 256 images, 2 rounds")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {METHODS}")
    ap.add_argument("--width", type=float, default=None, help="ResNet-18 width (default 0.25)")
    ap.add_argument("--batch", type=int, default=64, help="global batch (default 64; even)")
    ap.add_argument("--train-size", type=int, default=None, help="training images (default 1024)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 8)")
    ap.add_argument("--budget-s", type=float, default=150.0, help="no round starts after this much timing")
    args = ap.parse_args(argv)
    args.width = args.width if args.width is not None else (0.125 if args.quick else 0.25)
    args.train_size = args.train_size if args.train_size is not None else (256 if args.quick else 1024)
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 8)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not args.methods or set(args.methods) - set(METHODS):
        raise SystemExit(f"--methods: choose from {METHODS}")
    t_start, out = time.perf_counter(), Tee()
    header(out, NAME)
    out(f"# sizes: CIFAR ResNet-18 width {args.width}, embedded CIFAR-10, {args.train_size} training images, "
        f"global batch {args.batch}, float32; methods {', '.join(args.methods)} (SSAM-F sparsity 0.5); "
        f"{rounds} rounds, timing budget {args.budget_s:.0f} s")

    ctx = mp.get_context("spawn")
    res_q = ctx.Queue()
    tmp = tempfile.TemporaryDirectory()
    cmd_qs, procs = {}, []
    for setup, (world, threads) in SETUPS.items():
        cmd_qs[setup] = [ctx.Queue() for _ in range(world)]
        store = os.path.join(tmp.name, f"store{world}_{threads}")
        for rank in range(world):
            p = ctx.Process(target=worker, args=(rank, setup, world, threads, args, store, cmd_qs[setup], res_q))
            p.start()
            procs.append(p)
    steps = {item[3] for item in collect(res_q, len(procs))}
    assert len(steps) == 1, f"the set-ups disagree on steps per epoch: {steps}"
    steps_per_epoch = steps.pop()
    setup_s = time.perf_counter() - t_start

    def run(method: str, setup: str) -> tuple[float, float]:
        """One epoch of ``method`` in ``setup``: rank 0's (seconds, seconds of the replica check)."""
        for q in cmd_qs[setup]:
            q.put(method)
        got = collect(res_q, len(cmd_qs[setup]))
        item = next(i for i in got if i[1] == 0)
        return item[3], item[4]

    t0 = time.perf_counter()
    for method in args.methods:  # warm-up: allocator, momentum buffers, first mask, oneDNN choices
        for setup in SETUPS:
            run(method, setup)
    warm_s = time.perf_counter() - t0
    ms = {m: {s: [] for s in SETUPS} for m in args.methods}  # ms per step, per round
    check = {m: [] for m in args.methods}  # ms per epoch of the 2-worker replica check
    t1, done = time.perf_counter(), 0
    for r in range(rounds):
        if r > 0 and time.perf_counter() - t1 > args.budget_s:
            break
        names = list(SETUPS)
        order = args.methods[r % len(args.methods):] + args.methods[:r % len(args.methods)]
        for method in order:
            for setup in names[r % len(names):] + names[:r % len(names)]:
                seconds, checked = run(method, setup)
                ms[method][setup].append(seconds / steps_per_epoch * 1e3)
                if SETUPS[setup][0] > 1:
                    check[method].append(checked * 1e3)
        done += 1
    timed_s = time.perf_counter() - t1
    for qs in cmd_qs.values():
        for q in qs:
            q.put(None)
    for p in procs:
        p.join(timeout=60)
    tmp.cleanup()

    one, two_t, two_w = SETUPS
    cut = " (time budget reached)" if done < rounds else ""
    out(f"\n## ms per optimizer step (an epoch of {steps_per_epoch} steps / {steps_per_epoch}), median of {done} "
        f"rounds{cut}; set-up {setup_s:.0f} s, warm-up {warm_s:.0f} s, timing {timed_s:.0f} s")
    out(f"{'method':<8}" + "".join(f"{s:>10}" for s in SETUPS) + f"{'2w/1w1t':>9}{'2w/1w2t':>9}"
        + "".join(f"{'img/s ' + s:>15}" for s in SETUPS) + f"{'check ms':>10}")
    for m in args.methods:
        med = {s: statistics.median(ms[m][s]) for s in SETUPS}
        out(f"{m:<8}" + "".join(f"{med[s]:>10.1f}" for s in SETUPS)
            + f"{paired_ratio(ms[m], two_w, one):>9.3f}{paired_ratio(ms[m], two_w, two_t):>9.3f}"
            + "".join(f"{args.batch / med[s] * 1e3:>15.1f}" for s in SETUPS)
            + f"{statistics.median(check[m]):>10.1f}")
    out("# columns: set-up = workers x torch threads each; ratios: median over rounds of the per-round ratio "
        "(> 1: 2 workers slower); img/s: global batch / median step; check ms: the 2-worker per-epoch replica "
        "check (_check_replicas), included in the 2w x 1t ms/step")
    for m in args.methods:  # a contended round is slower, never faster: the min is the least-disturbed one
        out(f"# {m}: per-round ms/step min-max " + ", ".join(f"{s} {min(ms[m][s]):.0f}-{max(ms[m][s]):.0f}"
                                                       for s in SETUPS))
    out("# 1w x 2t: its 2 OpenMP threads meet at every operator, so another process on either core slows it "
        "far more than the 1-thread set-ups (benchmarks/_common.py); compare the minima on a shared machine")
    out(f"# 1-min load average at the end {os.getloadavg()[0]:.1f}; wall time {time.perf_counter() - t_start:.0f} s")
    out("\nNote: on one 2-core CPU the two workers share the cores, so this measures the overhead of data "
        "parallelism (gradient all-reduce after both passes, the per-epoch mask check), not a speed-up; "
        "multi-GPU scaling is unmeasured (no multi-GPU device was lent).")


if __name__ == "__main__":
    main()
