"""Disk held by a search's checkpoints: ``tune.retain_checkpoints`` front (default) against all.

200 trials (197 TPE-sampled + 3 baselines), 4 epochs, MO-ASHA grace 1 rf 2, 4 trials at a
time x 0.5 CPU, through ``ssam_tune.run.run_search`` with ``checkpointing_trainable`` of
``_search_trivial.py``: the trivial trainable's results, each epoch with a checkpoint of
``--ckpt-mib`` MiB of random bytes (a stand-in for a model's; ResNet-18 is ~100 MB). A thread
sums the sizes of the files under the experiment folder every 0.25 s (the peak) and once
more after the export. The two settings run one after the other, same seed, same machine.

Usage: python benchmarks/bench_disk.py [--trials N] [--ckpt-mib M] > benchmarks/bench_disk.txt
(Ray's own output goes to stderr.)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

from _common import header
from _search_common import fresh_ray_env, quiet
from _search_trivial import CKPT_BYTES_ENV, checkpointing_trainable, load_space_dict

NAME = Path(__file__).stem
fresh_ray_env()  # fresh local Ray instances; workers import _search_trivial by name


def tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, f))
            except OSError:
                pass  # deleted while walking
    return total


def checkpoint_bytes(root: Path) -> int:
    return sum(tree_bytes(d) for d in root.glob("trial_*/checkpoint_*")) + tree_bytes(root / "checkpoints")


def run(retain: str, trials: int, tmp: Path) -> dict:
    from ssam_tune.export.read import load_trials
    from ssam_tune.run import run_search
    from ssam_tune.tuning.space import load_space

    space_dict = load_space_dict(f"disk_{retain}", trials - 3, scheduler="asha")
    space_dict["tune"]["scheduler"]["type"] = "mo_asha"
    space_dict["tune"]["retain_checkpoints"] = retain
    import yaml

    path = tmp / f"{retain}.yaml"
    path.write_text(yaml.safe_dump(space_dict, sort_keys=False))
    space = load_space(path, check_paths=False)
    exp = tmp / "ray" / space.name
    peak = {"all": 0, "ckpt": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            if exp.exists():
                peak["all"] = max(peak["all"], tree_bytes(exp))
                peak["ckpt"] = max(peak["ckpt"], checkpoint_bytes(exp))
            time.sleep(0.25)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    try:
        with quiet():  # Ray's and the driver's console to stderr
            run_search(space, storage=str(tmp / "ray"), resume=False, results=str(tmp),
                       trainable=checkpointing_trainable)
    finally:
        done.set()
        thread.join()
    rows = load_trials(str(exp), "flops_theoretical")
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    with_ckpt = sum(1 for d in exp.glob("trial_*") if list(d.glob("checkpoint_*")))
    return {"wall": time.perf_counter() - t0, "peak_all": peak["all"], "peak_ckpt": peak["ckpt"],
            "end_all": tree_bytes(exp), "end_ckpt": checkpoint_bytes(exp), "counts": counts,
            "trials": len(rows), "with_ckpt": with_ckpt}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--ckpt-mib", type=float, default=1.0)
    args = p.parse_args()
    os.environ[CKPT_BYTES_ENV] = str(int(args.ckpt_mib * (1 << 20)))  # read by the Ray workers
    out = print
    header(out, NAME, packages=("ray", "optuna"))
    mib = 1 << 20
    size = args.ckpt_mib
    out(f"{args.trials} trials, 4 epochs, MO-ASHA grace 1 rf 2, 4 at a time x 0.5 CPU; one checkpoint = "
        f"{size:g} MiB, every epoch; CheckpointConfig(num_to_keep=2)")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for retain in ("all", "front"):
            r = run(retain, args.trials, Path(tmp))
            results[retain] = r
            out(f"retain_checkpoints: {retain:5s}  {r['trials']} trials {r['counts']}, {r['wall']:.0f} s")
            per_trial = r["peak_ckpt"] / mib / size / args.trials
            out(f"    checkpoints: peak {r['peak_ckpt'] / mib:7.1f} MiB = {per_trial:.3f} checkpoints per trial;"
                f" after the export {r['end_ckpt'] / mib:7.1f} MiB "
                f"({r['with_ckpt']} trials keep checkpoints)")
            out(f"    whole experiment folder: peak {r['peak_all'] / mib:7.1f} MiB, after the export "
                f"{r['end_all'] / mib:7.1f} MiB = {r['end_all'] / args.trials / 1024:.1f} KiB per trial")
    a, f = results["all"], results["front"]
    out(f"front / all: peak {f['peak_ckpt'] / max(a['peak_ckpt'], 1):.3f}, after the export "
        f"{f['end_ckpt'] / max(a['end_ckpt'], 1):.4f}")
    done = f["counts"].get("completed", 0)
    front = f["with_ckpt"]
    out(f"README's bound, peak ~ (running 4 x 2 + completed {done}) x {size:g} MiB = {(8 + done) * size:.0f} MiB: "
        f"measured {f['peak_ckpt'] / mib:.1f} MiB; after the export {front} trials (front + best) x {size:g} MiB = "
        f"{front * size:.0f} MiB: measured {f['end_ckpt'] / mib:.1f} MiB")


if __name__ == "__main__":
    main()
