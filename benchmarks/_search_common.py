"""What the search benchmarks share: Ray set-up, report output, and the instruments around
``ssam_tune.run.run_search`` and a bare ``tune.Tuner``.

Used by ``bench_load.py`` and ``bench_scale.py`` (most of it), ``bench_disk.py``
(:func:`fresh_ray_env`, :func:`quiet`) and ``bench_replay.py`` (those two, :func:`emit`,
:func:`footer` and the statistics at the end). The trainables the Ray workers run live in
their own modules, which import only what a worker needs: ``_search_trivial.py`` (load,
scale, disk) and ``_search_replay.py`` (replay).

- :func:`fresh_ray_env`: every experiment on a fresh local Ray (``RAY_ADDRESS`` dropped), whose
  workers can import this folder's modules by name. Ray pickles a function trainable of an
  importable module by reference (module and name), so a worker imports ``_search_trivial``
  or ``_search_replay`` itself; workers inherit ``PYTHONPATH`` from the driver's
  environment, not its ``sys.path``. Call it before the first ``ray.init``.
- :func:`emit` and :func:`quiet`: the report goes to the real stdout, while Ray Tune's tables,
  the workers' logs and the searcher's console lines go to stderr.
- :func:`searcher_patched`: ``run_search`` looks ``SsamSearcher`` up in
  ``ssam_tune.tuning.search`` when it is called, so for the run it gets a subclass that counts
  finished trials, reads the driver's VmRSS at given counts (:data:`COUNTER`) and adds up the
  driver time spent in the searcher's own calls (:data:`SEARCHER_S`: Optuna ask and tell,
  the journal file). Nothing else of the search changes.
- :func:`timed_exports`, :func:`timed_ray`: the seconds spent in ``export_experiment`` and in
  ``ray.init`` / ``ray.shutdown``, so that a side's "run" time is the Tune loop alone.
- :func:`bare_run` and :func:`ssam_run`: the two sides of the per-trial overhead comparison,
  the same trivial trainable, trials, epochs and concurrency (4 at a time x 0.5 CPU).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

from _common import quiet_stdout

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# The two sides of the overhead comparison, as the reports name them.
SIDES = {"bare": "bare tune.Tuner (FIFO, no searcher)", "ssam": "ssam-tune run_search (TPE, journal)"}


# ----------------------------------------------------------------------------- Ray set-up
def worker_pythonpath(environ: dict) -> str:
    """PYTHONPATH that lets Ray workers started from ``environ`` import this folder's modules."""
    here = str(HERE)
    parts = [here] + [p for p in environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != here]
    return os.pathsep.join(parts)


def fresh_ray_env() -> None:
    """Always a fresh local Ray instance (no ``RAY_ADDRESS``), its workers able to import the
    trainables of ``_search_trivial`` and ``_search_replay`` by name."""
    os.environ.pop("RAY_ADDRESS", None)
    os.environ["PYTHONPATH"] = worker_pythonpath(os.environ)


# ----------------------------------------------------------------------------- output
OUT = sys.stdout


def emit(line: str = "") -> None:
    """One line of the report, on the real stdout also inside :func:`quiet`."""
    print(line, file=OUT, flush=True)


@contextlib.contextmanager
def quiet():
    """Send fd 1 (Ray Tune's tables, worker logs, the searcher's console lines) to stderr while
    the block runs; :func:`emit` keeps writing to the real stdout."""
    global OUT
    with quiet_stdout() as real:
        OUT = real
        try:
            yield
        finally:
            OUT = sys.stdout


def footer(t0: float) -> None:
    """The report's last line: the whole run's wall time since ``t0`` (``time.perf_counter()``)."""
    emit(f"# whole benchmark: {time.perf_counter() - t0:.0f} s wall; 1-min load average at end "
         f"{os.getloadavg()[0]:.1f}")


# ----------------------------------------------------------------------------- driver memory
def rss_mib() -> float:
    """This process's resident memory now (VmRSS), MiB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


# ----------------------------------------------------------------------------- the searcher, instrumented
# finished trials the searcher was told of; VmRSS (MiB) and seconds since the patch, at the marks
COUNTER: dict = {"done": 0, "marks": {}, "times": {}, "t0": None}
# driver seconds inside the searcher's calls, per method
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
    """run_search looks SsamSearcher up in ssam_tune.tuning.search when it is called: swap it for
    the run. Resets :data:`COUNTER` (its ``t0`` is now) and :data:`SEARCHER_S`."""
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


def emit_marks(marks: list[int]) -> None:
    """One line per mark: VmRSS when the searcher was told of that many finished trials, the time
    since the patch, and the seconds per trial since the previous mark."""
    prev_t, prev_n = 0.0, 0
    for n in marks:
        if n not in COUNTER["marks"]:
            emit(f"    after {n:>4} finished trials: not reached (searcher told of {COUNTER['done']})")
            continue
        t = COUNTER["times"][n]
        emit(f"    after {n:>4} finished trials: VmRSS {COUNTER['marks'][n]:7.0f} MiB   t = {t:6.0f} s   "
             f"({(t - prev_t) / (n - prev_n):.2f} s/trial since the previous mark)")
        prev_t, prev_n = t, n


# ----------------------------------------------------------------------------- timers
@contextlib.contextmanager
def timed_exports(box: dict):
    """Add the seconds spent in ``ssam_tune.export.export_experiment`` to ``box["export_s"]``."""
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


@contextlib.contextmanager
def timed_ray(box: dict):
    """Time ray.init and ray.shutdown (``box["init_s"]``, ``box["shutdown_s"]``): start-up and
    tear-down, the same for both sides."""
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


# ----------------------------------------------------------------------------- the two sides
def read_trials(out: Path) -> tuple[list[dict], dict[str, int]]:
    """The rows of ``out/trials.csv`` and the number of trials per status."""
    with open(out / "trials.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    return rows, statuses


def bare_config(tmp: Path, name: str) -> dict:
    """The bare side's training config: ``load_space_dict``'s base, its searched keys as Ray Tune
    domains (Ray's random variant generator samples them)."""
    from _search_trivial import load_space_dict
    from ray import tune

    from ssam_tune.tuning.space import load_space

    base = load_space(tmp / f"{name}.yaml", data=load_space_dict(name, 1)).base
    cfg = json.loads(json.dumps(base))
    cfg["method"].update(name=tune.choice(["sam", "ssam_f", "ssam_d"]), rho=tune.loguniform(0.02, 0.5),
                         sparsity=tune.uniform(0.5, 0.95), N_F=tune.choice([8, 16]))
    return cfg


def fit_bare(n: int, tmp: Path, name: str, cfg: dict, *, verbose: int, callbacks=None):
    """``n`` trials of the trivial trainable with config ``cfg`` (:func:`bare_config`) through a
    bare ``tune.Tuner`` (FIFO, random variants, no searcher, ``reuse_actors=True`` as run_search
    uses), 4 at a time x 0.5 CPU, on a fresh local Ray (``ray.init`` to ``ray.shutdown``).
    Returns Tune's ResultGrid."""
    import ray
    from _search_trivial import trivial_trainable
    from ray import tune

    ray.init(address="local", include_dashboard=False,
             runtime_env={"env_vars": {"RAY_CHDIR_TO_TRIAL_DIR": "0"}}, log_to_driver=True)
    try:
        tuner = tune.Tuner(
            tune.with_resources(trivial_trainable, {"cpu": 0.5, "gpu": 0.0}),
            param_space={"ssam_tune": {"label": "bare"}, "config": cfg},
            tune_config=tune.TuneConfig(num_samples=n, max_concurrent_trials=4, reuse_actors=True),
            run_config=tune.RunConfig(name=name, storage_path=str(tmp / "ray"), verbose=verbose,
                                      callbacks=callbacks))
        return tuner.fit()
    finally:
        ray.shutdown()


def bare_run(n: int, tmp: Path, name: str, *, verbose: int) -> dict:
    """One bare side (:func:`fit_bare`): ``wall_s`` from ``ray.init`` to ``ray.shutdown``, with
    ``init_s`` and ``shutdown_s``. ``verbose``: Tune's console output (run_search uses 0)."""
    cfg = bare_config(tmp, name)
    box: dict = {}
    t0 = time.perf_counter()
    with quiet(), timed_ray(box):
        results = fit_bare(n, tmp, name, cfg, verbose=verbose)
    box["wall_s"] = time.perf_counter() - t0
    assert len(results) == n and not results.errors, (len(results), results.errors)
    return box


def ssam_run(n: int, tmp: Path, name: str) -> dict:
    """One ssam-tune side: ``run_search`` of the same trainable, trials, epochs and concurrency,
    ``scheduler: none`` and no baselines (every trial runs to its last epoch, as the bare side's
    do). ``wall_s`` (exports included), ``init_s``, ``shutdown_s``, ``export_s``, ``searcher_s``
    (driver time in the searcher's calls) and ``ask_s`` (of which Optuna's ask)."""
    from _search_trivial import load_space_dict, trivial_trainable

    from ssam_tune.run import run_search
    from ssam_tune.tuning.space import load_space

    space = load_space(tmp / f"{name}.yaml", data=load_space_dict(name, n, scheduler="none", baselines=[]))
    assert space.budget() == n
    box: dict = {}
    t0 = time.perf_counter()
    with searcher_patched(set()), quiet(), timed_exports(box), timed_ray(box):
        out = run_search(space, storage=str(tmp / "ray"), resume=False, results=str(tmp),
                         trainable=trivial_trainable)
    box["wall_s"] = time.perf_counter() - t0
    box["searcher_s"] = sum(SEARCHER_S.values())
    box["ask_s"] = SEARCHER_S["suggest"]
    lines = (out / "trials.csv").read_text().splitlines()
    assert len(lines) == n + 1, len(lines)
    return box


def run_side(side: str, n: int, tmp: Path, i: int, *, bare_verbose: int) -> dict:
    """Side ``side`` ("bare" or "ssam") of pair ``i``, its ``run_s`` added: wall minus ray.init,
    ray.shutdown and (ssam-tune) the exports, the Tune loop itself."""
    box = bare_run(n, tmp, f"bare{i}", verbose=bare_verbose) if side == "bare" else ssam_run(n, tmp, f"ssam{i}")
    box["run_s"] = box["wall_s"] - box.get("init_s", 0) - box.get("shutdown_s", 0) - box.get("export_s", 0)
    return box


def searcher_note(box: dict, n: int) -> str:
    """The ssam-tune side's searcher time per trial, for its report line ('' for a bare side)."""
    if "searcher_s" not in box:
        return ""
    return f" (searcher {1000 * box['searcher_s'] / n:.0f} ms/trial, of which ask {1000 * box['ask_s'] / n:.0f})"


# ----------------------------------------------------------------------------- statistics
# two-sided 95% Student t quantiles, by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
       20: 2.086, 25: 2.060, 30: 2.042}


def mean_ci(values: list[float]) -> tuple[float, float, float]:
    """Mean and its two-sided 95% Student t interval (NaN values left out)."""
    vals = [v for v in values if not math.isnan(v)]
    n = len(vals)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    m = statistics.fmean(vals)
    if n == 1:
        return m, float("nan"), float("nan")
    df = n - 1
    t = 1.96 if df > 30 else T95.get(df, T95[max(k for k in T95 if k <= df)])  # missing df: the next lower
    half = t * statistics.stdev(vals) / math.sqrt(n)
    return m, m - half, m + half


def fmt_ci(values: list[float], spec: str = ".3f") -> str:
    m, lo, hi = mean_ci(values)
    if lo != lo:
        return f"{m:{spec}}"
    return f"{m:{spec}} [{lo:{spec}}, {hi:{spec}}]"
