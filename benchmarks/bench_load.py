"""Load on the search machinery: many trials of a trivial trainable through ``run_search``.

Three measurements in one run, on one machine (a fresh local Ray for each experiment):

(a) Memory. 500 trials (497 sampled by TPE + 3 baselines, 4 epochs, ASHA grace 1, 4 trials at
    a time, 0.5 CPU each) through ``ssam_tune.run.run_search`` with the trivial trainable of
    ``tests/_trivial.py``. The driver's resident memory (VmRSS of this process, from
    /proc/self/status) is read at the moment the searcher is told of the 50th, 100th, ...,
    500th finished trial: ``ssam_tune.tuning.search.SsamSearcher`` is replaced, for this run only,
    by a subclass whose ``on_trial_complete`` counts and reads VmRSS before calling the
    real one (``run_search`` imports the class at call time, so it picks the subclass up;
    nothing else changes). Target: RSS(500) / RSS(50) <= 1.5.
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
import contextlib
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import header

NAME = Path(__file__).stem
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
os.environ.pop("RAY_ADDRESS", None)  # always fresh local Ray instances

from _trivial import load_space_dict, trivial_trainable, worker_pythonpath  # noqa: E402

os.environ["PYTHONPATH"] = worker_pythonpath(os.environ)  # Ray workers import _trivial by name

OUT = sys.stdout


def emit(line: str = "") -> None:
    print(line, file=OUT, flush=True)


@contextlib.contextmanager
def quiet_stdout():
    """Send fd 1 (Ray Tune's tables, worker logs) to stderr; the report keeps the real stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    global OUT
    real = os.fdopen(os.dup(saved), "w")
    OUT = real
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        real.close()
        OUT = sys.stdout


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


# --------------------------------------------------------------------------------------------
# (a) memory of the driver over a long search
# --------------------------------------------------------------------------------------------
COUNTER = {"done": 0, "marks": {}, "times": {}, "t0": None}


SEARCHER_S = {"suggest": 0.0, "on_trial_result": 0.0, "on_trial_complete": 0.0}


def instrumented_searcher(marks: set[int]):
    """SsamSearcher that counts finished trials (reading VmRSS at ``marks``) and adds up the
    driver time spent in its own calls (Optuna ask/tell and the journal file)."""
    from ssam_tune.tuning.search import SsamSearcher

    class InstrumentedSearcher(SsamSearcher):
        def suggest(self, trial_id):
            t = time.perf_counter()
            try:
                return super().suggest(trial_id)
            finally:
                SEARCHER_S["suggest"] += time.perf_counter() - t

        def on_trial_result(self, trial_id, result):
            t = time.perf_counter()
            try:
                return super().on_trial_result(trial_id, result)
            finally:
                SEARCHER_S["on_trial_result"] += time.perf_counter() - t

        def on_trial_complete(self, trial_id, result=None, error=False):
            COUNTER["done"] += 1
            n = COUNTER["done"]
            if n in marks:
                COUNTER["marks"][n] = rss_mib()
                COUNTER["times"][n] = time.perf_counter() - COUNTER["t0"]
            t = time.perf_counter()
            try:
                return super().on_trial_complete(trial_id, result, error)
            finally:
                SEARCHER_S["on_trial_complete"] += time.perf_counter() - t

    return InstrumentedSearcher


@contextlib.contextmanager
def searcher_patched(marks: set[int]):
    """run_search imports SsamSearcher from ssam_tune.tuning.search at call time: swap it for the run."""
    import ssam_tune.tuning.search as S

    real = S.SsamSearcher
    S.SsamSearcher = instrumented_searcher(marks)
    COUNTER.update(done=0, marks={}, times={}, t0=time.perf_counter())
    for k in SEARCHER_S:
        SEARCHER_S[k] = 0.0
    try:
        yield
    finally:
        S.SsamSearcher = real


@contextlib.contextmanager
def timed_exports(box: dict):
    import ssam_tune.export as E

    real = E.export_experiment

    def wrapper(*args, **kw):
        t = time.perf_counter()
        try:
            return real(*args, **kw)
        finally:
            box["export_s"] = box.get("export_s", 0.0) + time.perf_counter() - t

    E.export_experiment = wrapper
    try:
        yield
    finally:
        E.export_experiment = real


def memory_run(n_trials: int, tmp: Path) -> None:
    import csv

    from ssam_tune.run import run_search
    from ssam_tune.tuning.space import load_space

    marks = sorted({m for m in (50, 100, 200, 300, 400, 500, n_trials) if m <= n_trials} |
                   ({10} if n_trials < 100 else set()))
    first = 10 if n_trials < 100 else 50
    space = load_space(tmp / "mem.yaml", data=load_space_dict("mem", n_trials - 3))
    assert space.budget() == n_trials
    box: dict = {}
    rss_start = rss_mib()
    with searcher_patched(set(marks)), quiet_stdout(), timed_exports(box):
        out = run_search(space, storage=str(tmp / "ray"), resume=False, results=str(tmp),
                         trainable=trivial_trainable)
    wall = time.perf_counter() - COUNTER["t0"]
    rss_end = rss_mib()
    with open(out / "trials.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    emit(f"(a) driver memory: {n_trials} trials ({n_trials - 3} TPE-sampled + 3 baselines), 4 epochs, "
         f"ASHA grace 1 rf 2, 4 at a time x 0.5 CPU, trivial trainable")
    emit(f"    completed in {wall:.0f} s ({wall / n_trials:.2f} s/trial, exports {box.get('export_s', 0):.0f} s); "
         f"trials.csv: {len(rows)} rows, {len({r['trial_id'] for r in rows})} unique, {statuses}")
    emit(f"    driver time inside the searcher: suggest (Optuna ask) {SEARCHER_S['suggest']:.0f} s, "
         f"on_trial_result {SEARCHER_S['on_trial_result']:.0f} s, on_trial_complete (tell) "
         f"{SEARCHER_S['on_trial_complete']:.0f} s = {1000 * sum(SEARCHER_S.values()) / n_trials:.0f} ms/trial")
    emit(f"    VmRSS before run_search: {rss_start:.0f} MiB; after run_search returned (Ray shut down, "
         f"exports written): {rss_end:.0f} MiB")
    prev_t, prev_n = 0.0, 0
    for n in marks:
        if n not in COUNTER["marks"]:
            emit(f"    after {n:>4} finished trials: not reached (searcher told of {COUNTER['done']})")
            continue
        t = COUNTER["times"][n]
        rate = (t - prev_t) / (n - prev_n)
        emit(f"    after {n:>4} finished trials: VmRSS {COUNTER['marks'][n]:7.0f} MiB   "
             f"t = {t:6.0f} s   ({rate:.2f} s/trial since the previous mark)")
        prev_t, prev_n = t, n
    if first in COUNTER["marks"] and n_trials in COUNTER["marks"]:
        ratio = COUNTER["marks"][n_trials] / COUNTER["marks"][first]
        verdict = "PASS" if ratio <= 1.5 else "FAIL"
        emit(f"    RSS({n_trials}) / RSS({first}) = {ratio:.2f}  (target <= 1.5: {verdict})")


# --------------------------------------------------------------------------------------------
# (b) per-trial overhead against bare Ray Tune
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def timed_ray(box: dict):
    """Time ray.init and ray.shutdown (start-up and tear-down, the same for both sides)."""
    import ray

    real_init, real_shutdown = ray.init, ray.shutdown

    def timed(fn, key):
        def wrapper(*args, **kw):
            t = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                box[key] = box.get(key, 0.0) + time.perf_counter() - t
        return wrapper

    ray.init, ray.shutdown = timed(real_init, "init_s"), timed(real_shutdown, "shutdown_s")
    try:
        yield
    finally:
        ray.init, ray.shutdown = real_init, real_shutdown


def bare_run(n: int, tmp: Path, name: str) -> dict:
    import ray
    from ray import tune

    from ssam_tune.tuning.space import load_space

    base = load_space(tmp / "b.yaml", data=load_space_dict("b", 1)).base
    cfg = json.loads(json.dumps(base))
    cfg["method"].update(name=tune.choice(["sam", "ssam_f", "ssam_d"]), rho=tune.loguniform(0.02, 0.5),
                         sparsity=tune.uniform(0.5, 0.95), N_F=tune.choice([8, 16]))
    box: dict = {}
    t0 = time.perf_counter()
    with quiet_stdout(), timed_ray(box):
        ray.init(address="local", include_dashboard=False,
                 runtime_env={"env_vars": {"RAY_CHDIR_TO_TRIAL_DIR": "0"}}, log_to_driver=True)
        try:
            tuner = tune.Tuner(
                tune.with_resources(trivial_trainable, {"cpu": 0.5, "gpu": 0.0}),
                param_space={"ssam_tune": {"label": "bare"}, "config": cfg},
                tune_config=tune.TuneConfig(num_samples=n, max_concurrent_trials=4, reuse_actors=True),
                run_config=tune.RunConfig(name=name, storage_path=str(tmp / "ray"), verbose=1))
            results = tuner.fit()
        finally:
            ray.shutdown()
    box["wall_s"] = time.perf_counter() - t0
    assert len(results) == n and not results.errors, (len(results), results.errors)
    return box


def ssam_run(n: int, tmp: Path, name: str) -> dict:
    from ssam_tune.run import run_search
    from ssam_tune.tuning.space import load_space

    space = load_space(tmp / f"{name}.yaml", data=load_space_dict(name, n, scheduler="none", baselines=[]))
    assert space.budget() == n
    box: dict = {}
    t0 = time.perf_counter()
    with searcher_patched(set()), quiet_stdout(), timed_exports(box), timed_ray(box):
        out = run_search(space, storage=str(tmp / "ray"), resume=False, results=str(tmp),
                         trainable=trivial_trainable)
    box["wall_s"] = time.perf_counter() - t0
    box["searcher_s"] = sum(SEARCHER_S.values())
    box["ask_s"] = SEARCHER_S["suggest"]
    lines = (out / "trials.csv").read_text().splitlines()
    assert len(lines) == n + 1, len(lines)
    return box


def overhead(n: int, tmp: Path) -> None:
    emit(f"(b) per-trial wall overhead: {n} trials each side, 4 epochs, no early stopping, 4 at a time x "
         "0.5 CPU, same trivial trainable; order A-B-B-A")
    emit("    'run' = wall minus ray.init, ray.shutdown and (ssam-tune) the exports: the Tune loop itself")
    runs: dict[str, list[dict]] = {"bare": [], "ssam": []}
    names = {"bare": "bare tune.Tuner (FIFO, no searcher)", "ssam": "ssam-tune run_search (TPE, journal)"}
    for i, order in enumerate((("bare", "ssam"), ("ssam", "bare"))):
        for side in order:
            box = bare_run(n, tmp, f"bare{i}") if side == "bare" else ssam_run(n, tmp, f"ssam{i}")
            box["run_s"] = box["wall_s"] - box.get("init_s", 0) - box.get("shutdown_s", 0) - box.get("export_s", 0)
            runs[side].append(box)
            emit(f"    {names[side]} #{i + 1}: wall {box['wall_s']:6.1f} s = {box['wall_s'] / n:.3f} s/trial; "
                 f"init {box.get('init_s', 0):4.1f} s, shutdown {box.get('shutdown_s', 0):4.1f} s, "
                 f"exports {box.get('export_s', 0):4.1f} s, run {box['run_s'] / n:.3f} s/trial"
                 + (f" (searcher {1000 * box['searcher_s'] / n:.0f} ms/trial, of which ask "
                    f"{1000 * box['ask_s'] / n:.0f})" if "searcher_s" in box else ""))

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
    emit(f"# whole benchmark: {time.perf_counter() - t0:.0f} s wall; 1-min load average at end "
         f"{os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
