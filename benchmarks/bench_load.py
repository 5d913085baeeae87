"""Load on the search machinery: many trials of a trivial trainable through ``run_search``.

Three measurements in one run, on one machine (a fresh local Ray for each experiment):

(a) Memory. 500 trials (497 sampled by TPE + 3 baselines, 4 epochs, ASHA grace 1, 4 trials at
    a time, 0.5 CPU each) through ``ssam_tune.run.run_search`` with the trivial trainable of
    ``_search_trivial.py``. The driver's resident memory (VmRSS of this process, from
    /proc/self/status) is read at the moment the searcher is told of the 50th, 100th, ...,
    500th finished trial: ``ssam_tune.tuning.search.SsamSearcher`` is replaced, for this run only,
    by a subclass whose ``on_trial_complete`` counts and reads VmRSS before calling the
    real one (``run_search`` looks the class up when it is called, so it picks the subclass up;
    nothing else changes; ``_search_common.searcher_patched``). Target: RSS(500) / RSS(50) <= 1.5.
(b) Overhead. The same trivial function trainable, N trials, 4 at a time, 0.5 CPU each,
    4 epochs, run by bare ``tune.Tuner`` (default FIFO scheduler, default random
    variant generator, no searcher, ``reuse_actors=True`` as run_search uses) and by
    ``run_search`` with ``scheduler: none`` and ``baselines: false`` (so both run all N
    trials to the last epoch). Each side is timed from ``ray.init`` to ``ray.shutdown``
    (run_search's wall also includes its exports, timed separately). The two run in
    A-B-B-A order so machine load drifts hit both; seconds per trial and the ratio are
    printed for each pair and for the sums.
(c) The quickstart (``python -m ssam_tune.run search_spaces/quickstart.yaml``, real training,
    2 trials at a time): its wall time against the sum of its trials' own ``train_seconds``
    (each trial's last reported value).

Usage: python benchmarks/bench_load.py [--quick] > benchmarks/bench_load.txt
(Ray's own progress output goes to stderr; ``--quick``: 60 / 20 trials and quickstart --smoke.)
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import header
from _search_common import (
    COUNTER,
    REPO,
    SEARCHER_S,
    SIDES,
    emit,
    emit_marks,
    footer,
    fresh_ray_env,
    quiet,
    read_trials,
    rss_mib,
    run_side,
    searcher_note,
    searcher_patched,
    timed_exports,
)
from _search_trivial import load_space_dict, trivial_trainable

NAME = Path(__file__).stem
fresh_ray_env()  # fresh local Ray instances; workers import _search_trivial by name


# --------------------------------------------------------------------------------------------
# (a) memory of the driver over a long search
# --------------------------------------------------------------------------------------------
def memory_run(n_trials: int, tmp: Path) -> None:
    from ssam_tune.run import run_search
    from ssam_tune.tuning.space import load_space

    marks = sorted({m for m in (50, 100, 200, 300, 400, 500, n_trials) if m <= n_trials} |
                   ({10} if n_trials < 100 else set()))
    first = 10 if n_trials < 100 else 50
    space = load_space(tmp / "mem.yaml", data=load_space_dict("mem", n_trials - 3))
    assert space.budget() == n_trials
    box: dict = {}
    rss_start = rss_mib()
    with searcher_patched(set(marks)), quiet(), timed_exports(box):
        out = run_search(space, storage=str(tmp / "ray"), resume=False, results=str(tmp),
                         trainable=trivial_trainable)
    wall = time.perf_counter() - COUNTER["t0"]
    rss_end = rss_mib()
    rows, statuses = read_trials(out)
    emit(f"(a) driver memory: {n_trials} trials ({n_trials - 3} TPE-sampled + 3 baselines), 4 epochs, "
         f"ASHA grace 1 rf 2, 4 at a time x 0.5 CPU, trivial trainable")
    emit(f"    completed in {wall:.0f} s ({wall / n_trials:.2f} s/trial, exports {box.get('export_s', 0):.0f} s); "
         f"trials.csv: {len(rows)} rows, {len({r['trial_id'] for r in rows})} unique, {statuses}")
    emit(f"    driver time inside the searcher: suggest (Optuna ask) {SEARCHER_S['suggest']:.0f} s, "
         f"on_trial_result {SEARCHER_S['on_trial_result']:.0f} s, on_trial_complete (tell) "
         f"{SEARCHER_S['on_trial_complete']:.0f} s = {1000 * sum(SEARCHER_S.values()) / n_trials:.0f} ms/trial")
    emit(f"    VmRSS before run_search: {rss_start:.0f} MiB; after run_search returned (Ray shut down, "
         f"exports written): {rss_end:.0f} MiB")
    emit_marks(marks)
    if first in COUNTER["marks"] and n_trials in COUNTER["marks"]:
        ratio = COUNTER["marks"][n_trials] / COUNTER["marks"][first]
        verdict = "PASS" if ratio <= 1.5 else "FAIL"
        emit(f"    RSS({n_trials}) / RSS({first}) = {ratio:.2f}  (target <= 1.5: {verdict})")


# --------------------------------------------------------------------------------------------
# (b) per-trial overhead against bare Ray Tune
# --------------------------------------------------------------------------------------------
def overhead(n: int, tmp: Path) -> None:
    emit(f"(b) per-trial wall overhead: {n} trials each side, 4 epochs, no early stopping, 4 at a time x "
         "0.5 CPU, same trivial trainable; order A-B-B-A")
    emit("    'run' = wall minus ray.init, ray.shutdown and (ssam-tune) the exports: the Tune loop itself")
    runs: dict[str, list[dict]] = {"bare": [], "ssam": []}
    for i, order in enumerate((("bare", "ssam"), ("ssam", "bare"))):
        for side in order:
            box = run_side(side, n, tmp, i, bare_verbose=1)  # bare side: Ray's status tables (to stderr)
            runs[side].append(box)
            emit(f"    {SIDES[side]} #{i + 1}: wall {box['wall_s']:6.1f} s = {box['wall_s'] / n:.3f} s/trial; "
                 f"init {box.get('init_s', 0):4.1f} s, shutdown {box.get('shutdown_s', 0):4.1f} s, "
                 f"exports {box.get('export_s', 0):4.1f} s, run {box['run_s'] / n:.3f} s/trial"
                 + searcher_note(box, n))

    def mean(side, key):
        return sum(b.get(key, 0.0) for b in runs[side]) / len(runs[side])

    bw, sw = mean("bare", "wall_s"), mean("ssam", "wall_s")
    br, sr = mean("bare", "run_s"), mean("ssam", "run_s")
    emit(f"    mean wall: bare {bw / n:.3f} s/trial, ssam-tune {sw / n:.3f} s/trial; overhead "
         f"{1000 * (sw - bw) / n:+.0f} ms/trial; ratio ssam-tune / bare = {sw / bw:.2f}x")
    emit(f"    mean driver time inside ssam-tune's searcher (Optuna ask/tell, journal): "
         f"{1000 * mean('ssam', 'searcher_s') / n:.0f} ms/trial")
    emit(f"    mean run : bare {br / n:.3f} s/trial, ssam-tune {sr / n:.3f} s/trial; overhead "
         f"{1000 * (sr - br) / n:+.0f} ms/trial; ratio ssam-tune / bare = {sr / br:.2f}x")


# --------------------------------------------------------------------------------------------
# (c) the quickstart: wall time against its trials' own training time
# --------------------------------------------------------------------------------------------
def quickstart(tmp: Path, smoke: bool) -> None:
    args = [sys.executable, "-m", "ssam_tune.run", "search_spaces/quickstart.yaml",
            "--storage", str(tmp / "ray"), "--results", str(tmp)] + (["--smoke"] if smoke else [])
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.perf_counter()
    r = subprocess.run(args, cwd=REPO, stdout=sys.stderr, stderr=sys.stderr, env=env, timeout=1800, check=False)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        emit(f"(c) quickstart FAILED (exit {r.returncode}) after {wall:.0f} s")
        return
    name = "quickstart-smoke" if smoke else "quickstart"
    own, epochs, n = 0.0, 0, 0
    for f in sorted(glob.glob(str(tmp / "ray" / name / "trial_*" / "result.json"))):
        rows = [json.loads(line) for line in Path(f).read_text().splitlines() if line.strip()]
        if rows:
            n += 1
            own += float(rows[-1].get("train_seconds", 0.0))
            epochs += int(rows[-1].get("epoch", 0))
    emit(f"(c) quickstart{' --smoke' if smoke else ''}: {n} trials, {epochs} epochs trained in all, "
         "2 trials at a time x 1 CPU (python -m ssam_tune.run ..., whole process)")
    emit(f"    wall {wall:.0f} s; sum of the trials' own train_seconds {own:.0f} s; "
         f"wall / sum = {wall / own:.2f} (perfect packing of 2 concurrent trials with zero overhead: 0.50)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke mode: 60 / 20 trials, quickstart --smoke")
    p.add_argument("--trials", type=int, default=None, help="trials of (a) (default 500; --quick 60)")
    p.add_argument("--overhead-trials", type=int, default=None, help="trials per side in (b) (default 100)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: a, b, c")
    args = p.parse_args()
    n_mem = args.trials or (60 if args.quick else 500)
    n_over = args.overhead_trials or (20 if args.quick else 100)
    skip = set(filter(None, args.skip.split(",")))

    header(emit, NAME, packages=("ray", "optuna"))
    emit(f"# the search machinery under load with a trivial trainable{' (--quick)' if args.quick else ''}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_load_") as d:
        tmp = Path(d)
        if "a" not in skip:
            (tmp / "a").mkdir()
            memory_run(n_mem, tmp / "a")
        if "b" not in skip:
            (tmp / "b").mkdir()
            overhead(n_over, tmp / "b")
        if "c" not in skip:
            (tmp / "c").mkdir()
            quickstart(tmp / "c", smoke=args.quick)
    footer(t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
