"""Scale to 2,000 trials: the export, the driver's memory and the per-trial overhead, side by side.

Three measurements in one run, on one machine:

(a) Export. A synthetic 2,000-trial experiment folder in the layout Ray 2.60 writes (written
    by ``_search_experiment.py``, no Ray: experiment_state-*.json with Ray's per-trial
    entries, trial_<id>/params.json, result.json with one Ray result line per epoch, the
    ``config`` included, error.txt for errored trials, space.yaml, optuna.journal with every
    trial), shaped like a paper search: 200 epochs, MO-ASHA rungs at 50 and 150 (rf 3), so
    ~89 epochs per trial on average and ~180,000 result lines. ``export_experiment`` (every
    file: trials.csv, pareto, configs, pareto.png, tensorboard/, summary.md) runs in a fresh
    subprocess, for this checkout and for the commit named by ``--before`` (its
    ``ssam_tune`` extracted with ``git archive``), alternately. Reported: wall time of the
    export call, peak RSS of the process (VmHWM), and that peak minus the peak after
    importing what the export imports (ssam_tune.export, which imports torch; matplotlib,
    tensorboard, optuna).
    Then every output file of the two exports is compared byte for byte.
    Targets: <= 20 s and <= 500 MiB peak.
(b) Driver memory. 2,000 trials (1,997 TPE-sampled + 3 baselines, 4 epochs, MO-ASHA grace 1
    rf 2, 4 at a time x 0.5 CPU) of the trivial trainable (``_search_trivial.py``) through
    ``ssam_tune.run.run_search`` on a fresh local Ray. The driver's VmRSS is read when the
    searcher is told of the 200th, 500th, ..., 2,000th finished trial (a subclass of
    ``SsamSearcher`` swapped in for the run, ``_search_common.searcher_patched``, as in
    bench_load.py). Also counted: results the scheduler saw, rung decisions, and writes of
    ``asha_rungs.json`` (written only when a rung changes). Target: RSS(2000) / RSS(200) <= 1.2.
    For reference, the same number of trials through a bare ``tune.Tuner`` (FIFO, no searcher),
    VmRSS at the same marks: Ray's own growth.
(c) Per-trial overhead. The trivial trainable, N trials, 4 epochs, 4 at a time x 0.5 CPU, by
    bare ``tune.Tuner`` (FIFO, random variants, no searcher, ``verbose=0`` as run_search; bench_load's
    bare side printed Ray's status tables, verbose=1) and by ``run_search`` with
    ``scheduler: none`` and no baselines, in A-B-B-A-A-B... order (``--pairs``). Each side
    is timed from ``ray.init`` to ``ray.shutdown`` (without run_search's exports). The ratio
    of every adjacent pair and their median are printed. Target: <= 1.1x.

Usage: python benchmarks/bench_scale.py > benchmarks/bench_scale.txt
(Ray's and the searcher's console output goes to stderr; ``--quick``: 300 / 200 / 30 trials.)
``--profile FILE``: instead, one run_search of (c) under cProfile, stats written to FILE.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
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
    bare_config,
    emit,
    emit_marks,
    fit_bare,
    footer,
    fresh_ray_env,
    quiet,
    read_trials,
    rss_mib,
    run_side,
    searcher_note,
    searcher_patched,
    ssam_run,
    timed_exports,
)
from _search_trivial import load_space_dict, trivial_trainable

NAME = Path(__file__).stem
fresh_ray_env()  # fresh local Ray instances; workers import _search_trivial by name


# --------------------------------------------------------------------------------------------
# (a) the export of a synthetic 2,000-trial experiment, in a fresh process
# --------------------------------------------------------------------------------------------
EXPORT_CHILD = r"""
import json, sys, time
def rss():  # VmHWM: this process's peak. ru_maxrss would not do: Linux carries it across exec,
    # so a child of this (large) benchmark process would start at the parent's RSS.
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024.0
import ssam_tune.export, ssam_tune.tuning.study, matplotlib.figure, matplotlib.backends.backend_agg  # noqa
import tensorboard.compat.proto.event_pb2, tensorboard.plugins.hparams.summary_v2, yaml  # noqa
import ssam_tune
base = rss()
t = time.perf_counter()
info = ssam_tune.export.export_experiment(sys.argv[1], sys.argv[2])
wall = time.perf_counter() - t
print(json.dumps({"wall_s": wall, "base_mib": base, "peak_mib": rss(), "n": info["n_trials"],
                  "counts": info["counts"], "front": len(info["front"]), "pkg": ssam_tune.__file__}))
"""


def export_once(exp: Path, out: Path, pythonpath: str | None) -> dict:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", EXPORT_CHILD, str(exp), str(out)], env=env, cwd=str(out.parent),
                       capture_output=True, text=True, timeout=1800, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"export failed ({r.returncode}): {r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def compare_outputs(a: Path, b: Path) -> list[str]:
    """Files that differ between two export folders (and one-line notes on how)."""
    files_a = {p.relative_to(a) for p in a.rglob("*") if p.is_file()}
    files_b = {p.relative_to(b) for p in b.rglob("*") if p.is_file()}
    notes = [f"only in {'before' if f in files_b else 'after'}: {f}" for f in sorted(files_a ^ files_b)]
    for f in sorted(files_a & files_b):
        x, y = (a / f).read_bytes(), (b / f).read_bytes()
        if x == y:
            continue
        if f.suffix in (".md", ".csv", ".json", ".yaml"):
            lx, ly = x.decode().splitlines(), y.decode().splitlines()
            diff = [(i, p, q) for i, (p, q) in enumerate(zip(lx, ly, strict=False)) if p != q]
            shown = "; ".join(f"line {i + 1}: {p[:70]!r} vs {q[:70]!r}" for i, p, q in diff[:2])
            notes.append(f"{f}: {len(diff)} line(s) differ ({len(lx)} vs {len(ly)} lines): {shown}")
        else:
            notes.append(f"{f}: bytes differ ({len(x)} vs {len(y)})")
    return notes


def export_part(n_trials: int, epochs: int, tmp: Path, before: str, rounds: int) -> None:
    from _search_experiment import write_experiment

    exp = tmp / "ray" / "scale"
    t0 = time.perf_counter()
    truth = write_experiment(exp, n_trials, epochs=epochs, grace=epochs // 4, rf=3)
    gen_s = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in exp.rglob("*") if p.is_file())
    lines = sum(truth["epochs_reached"].values())
    old = tmp / "before_pkg"
    old.mkdir()
    subprocess.run(f"git -C {REPO} archive {before} ssam_tune | tar -x -C {old}", shell=True, check=True)
    counts = {}
    for s in truth["status"].values():
        counts[s] = counts.get(s, 0) + 1
    emit(f"(a) export of a synthetic {n_trials}-trial experiment (Ray 2.60 layout, no Ray; written in "
         f"{gen_s:.0f} s): {epochs} epochs, MO-ASHA-shaped rungs at {epochs // 4} and {3 * epochs // 4}, "
         f"{lines} result lines, {size / 2**20:.0f} MiB on disk; statuses {counts}")
    emit(f"    each export in a fresh process; 'after' = this checkout, 'before' = ssam_tune of {before} "
         "(git archive); peak = VmHWM, import = VmHWM after importing what the export imports")
    res: dict[str, list[dict]] = {"before": [], "after": []}
    for r in range(rounds):
        for side in (("after", "before") if r % 2 == 0 else ("before", "after")):
            out = tmp / f"out_{side}"
            info = export_once(exp, out, str(old) if side == "before" else None)
            res[side].append(info)
            emit(f"    {side:<6} #{r + 1}: {info['wall_s']:6.1f} s   peak RSS {info['peak_mib']:6.0f} MiB   "
                 f"import {info['base_mib']:4.0f} MiB   peak - import {info['peak_mib'] - info['base_mib']:6.0f} MiB"
                 f"   ({info['n']} trials, front {info['front']})")
            assert (side == "before") == (str(old) in info["pkg"]), info["pkg"]
    med = {s: {k: statistics.median(i[k] for i in v) for k in ("wall_s", "peak_mib", "base_mib")}
           for s, v in res.items()}
    a, b = med["after"], med["before"]
    emit(f"    median: after {a['wall_s']:.1f} s, peak {a['peak_mib']:.0f} MiB ({a['peak_mib'] - a['base_mib']:.0f} "
         f"over import); before {b['wall_s']:.1f} s, peak {b['peak_mib']:.0f} MiB "
         f"({b['peak_mib'] - b['base_mib']:.0f} over import); {b['wall_s'] / a['wall_s']:.1f}x faster, "
         f"{(b['peak_mib'] - b['base_mib']) / max(a['peak_mib'] - a['base_mib'], 1):.1f}x less memory over import")
    ok_t, ok_m = a["wall_s"] <= 20, a["peak_mib"] <= 500
    emit(f"    targets: <= 20 s: {'PASS' if ok_t else 'FAIL'}; <= 500 MiB peak (whole process): "
         f"{'PASS' if ok_m else 'FAIL'}; <= 500 MiB over import: "
         f"{'PASS' if a['peak_mib'] - a['base_mib'] <= 500 else 'FAIL'}")
    notes = compare_outputs(tmp / "out_before", tmp / "out_after")
    n_files = sum(1 for p in (tmp / "out_after").rglob("*") if p.is_file())
    emit(f"    outputs compared byte for byte ({n_files} files): "
         + ("all identical" if not notes else f"{len(notes)} differ:"))
    for note in notes:
        emit(f"      {note}")


# --------------------------------------------------------------------------------------------
# (b) the driver's memory over 2,000 trials
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def rung_writes_counted(box: dict):
    """Count the scheduler's results and decisions and the writes of asha_rungs.json."""
    from ssam_tune.storage.experiment import RUNGS_FILE, Experiment
    from ssam_tune.tuning import schedulers

    real_write, real_result = Experiment.write_text, schedulers.MOASHA.on_trial_result

    def write_text(self, rel, text):
        if rel == RUNGS_FILE:
            box["rung_writes"] = box.get("rung_writes", 0) + 1
        return real_write(self, rel, text)

    def on_trial_result(self, tune_controller, trial, result):
        box["results"] = box.get("results", 0) + 1
        t = time.perf_counter()
        try:
            return real_result(self, tune_controller, trial, result)
        finally:
            box["scheduler_s"] = box.get("scheduler_s", 0.0) + time.perf_counter() - t

    Experiment.write_text, schedulers.MOASHA.on_trial_result = write_text, on_trial_result
    try:
        yield
    finally:
        Experiment.write_text, schedulers.MOASHA.on_trial_result = real_write, real_result


def memory_part(n_trials: int, tmp: Path) -> None:
    from ssam_tune.run import run_search
    from ssam_tune.tuning.space import load_space

    first = 200 if n_trials >= 400 else max(10, n_trials // 10)
    marks = sorted({m for m in (first, 500, 1000, 1500, n_trials) if first <= m <= n_trials})
    data = load_space_dict("scale", n_trials - 3)
    data["tune"]["scheduler"] = {"type": "mo_asha", "grace_period": 1, "reduction_factor": 2}
    space = load_space(tmp / "scale.yaml", data=data)
    assert space.budget() == n_trials
    box: dict = {}
    rss_start = rss_mib()
    with searcher_patched(set(marks)), quiet(), timed_exports(box), rung_writes_counted(box):
        out = run_search(space, storage=str(tmp / "ray"), resume=False, results=str(tmp),
                         trainable=trivial_trainable)
    wall = time.perf_counter() - COUNTER["t0"]
    rss_end = rss_mib()
    rows, statuses = read_trials(out)
    rungs = json.loads((tmp / "ray" / "scale" / "asha_rungs.json").read_text())
    decisions = sum(len(rec) for rec in rungs["rungs"].values())
    emit(f"(b) driver memory: {n_trials} trials ({n_trials - 3} TPE-sampled + 3 baselines), 4 epochs, MO-ASHA "
         "grace 1 rf 2, 4 at a time x 0.5 CPU, trivial trainable, run_search on a fresh local Ray")
    emit(f"    completed in {wall:.0f} s ({wall / n_trials:.2f} s/trial; exports in the driver "
         f"{box.get('export_s', 0):.0f} s); trials.csv: {len(rows)} rows, {len({r['trial_id'] for r in rows})} "
         f"unique, {statuses}")
    emit(f"    driver time in the searcher: suggest (Optuna ask) {SEARCHER_S['suggest']:.0f} s, on_trial_result "
         f"{SEARCHER_S['on_trial_result']:.0f} s, on_trial_complete (tell) {SEARCHER_S['on_trial_complete']:.0f} s "
         f"= {1000 * sum(SEARCHER_S.values()) / n_trials:.0f} ms/trial; in MO-ASHA "
         f"{1000 * box.get('scheduler_s', 0) / n_trials:.1f} ms/trial")
    emit(f"    asha_rungs.json: {box.get('rung_writes', 0)} writes for {box.get('results', 0)} results seen by the "
         f"scheduler and {decisions} rung records (rewritten only when a rung changes: "
         f"{'yes' if box.get('rung_writes', 0) <= decisions else 'NO'})")
    emit(f"    VmRSS before run_search: {rss_start:.0f} MiB; after it returned (Ray shut down, exports "
         f"written): {rss_end:.0f} MiB")
    emit_marks(marks)
    if first in COUNTER["marks"] and n_trials in COUNTER["marks"]:
        ratio = COUNTER["marks"][n_trials] / COUNTER["marks"][first]
        verdict = "PASS" if ratio <= 1.2 else "FAIL"
        emit(f"    RSS({n_trials}) / RSS({first}) = {ratio:.3f}  (target <= 1.2: {verdict}); "
             f"growth {COUNTER['marks'][n_trials] - COUNTER['marks'][first]:.0f} MiB = "
             f"{1024 * (COUNTER['marks'][n_trials] - COUNTER['marks'][first]) / (n_trials - first):.0f} KiB/trial")


def bare_memory(n_trials: int, tmp: Path) -> None:
    """Ray's own share: the same trainable, trials, epochs and concurrency through a bare
    tune.Tuner (FIFO, random variants, no searcher), VmRSS read at the same marks."""
    from ray import tune

    first = 200 if n_trials >= 400 else max(10, n_trials // 10)
    marks, seen = {first, n_trials}, {}

    class Marks(tune.Callback):
        done = 0

        def on_trial_complete(self, iteration, trials, trial, **info):
            Marks.done += 1
            if Marks.done in marks:
                seen[Marks.done] = rss_mib()

    cfg = bare_config(tmp, "bare_memory")
    t0 = time.perf_counter()
    with quiet():
        fit_bare(n_trials, tmp, "bare_memory", cfg, verbose=0, callbacks=[Marks()])
    if first in seen and n_trials in seen:
        emit(f"    for reference, bare tune.Tuner (FIFO, all 4 epochs), same trainable and concurrency: "
             f"{n_trials} trials in {time.perf_counter() - t0:.0f} s; VmRSS {seen[first]:.0f} MiB after {first}, "
             f"{seen[n_trials]:.0f} MiB after {n_trials}: ratio {seen[n_trials] / seen[first]:.3f}, growth "
             f"{1024 * (seen[n_trials] - seen[first]) / (n_trials - first):.0f} KiB/trial (Ray's own)")


# --------------------------------------------------------------------------------------------
# (c) per-trial overhead against bare Ray Tune
# --------------------------------------------------------------------------------------------
def overhead_part(n: int, tmp: Path, pairs: int) -> None:
    emit(f"(c) per-trial overhead: {n} trials each side, 4 epochs, no early stopping, 4 at a time x 0.5 CPU, "
         f"same trivial trainable; {pairs} pairs in A-B-B-A order")
    emit("    'run' = wall minus ray.init, ray.shutdown and (ssam-tune) the exports: the Tune loop itself")
    ratios, run_ratios, boxes = [], [], {"bare": [], "ssam": []}
    for i in range(pairs):
        pair = {}
        for side in (("bare", "ssam") if i % 2 == 0 else ("ssam", "bare")):
            box = run_side(side, n, tmp, i, bare_verbose=0)  # bare side: verbose=0, as run_search
            pair[side] = box
            boxes[side].append(box)
            emit(f"    {SIDES[side]} #{i + 1}: wall {box['wall_s']:6.1f} s; init {box.get('init_s', 0):4.1f} s, "
                 f"shutdown {box.get('shutdown_s', 0):4.1f} s, exports {box.get('export_s', 0):4.1f} s, "
                 f"run {box['run_s'] / n:.3f} s/trial" + searcher_note(box, n))
        ratios.append((pair["ssam"]["wall_s"] - pair["ssam"].get("export_s", 0)) / pair["bare"]["wall_s"])
        run_ratios.append(pair["ssam"]["run_s"] / pair["bare"]["run_s"])
        emit(f"      pair {i + 1}: ssam-tune / bare = {ratios[-1]:.2f}x (wall without exports), "
             f"{run_ratios[-1]:.2f}x (run)")
    med = statistics.median(ratios)
    br = statistics.median(b["run_s"] for b in boxes["bare"]) / n
    sr = statistics.median(b["run_s"] for b in boxes["ssam"]) / n
    emit(f"    median over pairs: {med:.2f}x wall without exports, {statistics.median(run_ratios):.2f}x run "
         f"(target <= 1.1: {'PASS' if med <= 1.1 else 'FAIL'}); median run: bare {1000 * br:.0f} ms/trial, "
         f"ssam-tune {1000 * sr:.0f} ms/trial ({1000 * (sr - br):+.0f} ms/trial); searcher "
         f"{1000 * statistics.median(b['searcher_s'] for b in boxes['ssam']) / n:.0f} ms/trial")


def profile_part(n: int, tmp: Path, path: str) -> None:
    import cProfile

    prof = cProfile.Profile()
    prof.enable()
    try:
        box = ssam_run(n, tmp, "prof")
    finally:
        prof.disable()
        prof.dump_stats(path)
    emit(f"profile: {n} trials, wall {box['wall_s']:.1f} s, stats in {path}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke mode: 300 / 200 / 30 trials, 1 pair")
    p.add_argument("--export-trials", type=int, default=None, help="(a) trials (default 2000)")
    p.add_argument("--export-epochs", type=int, default=200, help="(a) epochs of a full trial (default 200)")
    p.add_argument("--export-rounds", type=int, default=2, help="(a) exports per side (default 2)")
    # 5583d0f: before the C CRC-32C framing; older commits refuse the current space.yaml keys
    p.add_argument("--before", default="5583d0f", help="(a) commit whose ssam_tune is the 'before' export")
    p.add_argument("--trials", type=int, default=None, help="(b) trials (default 2000)")
    p.add_argument("--overhead-trials", type=int, default=None, help="(c) trials per side (default 100)")
    p.add_argument("--pairs", type=int, default=None, help="(c) bare/ssam-tune pairs (default 4)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: a, b, c")
    p.add_argument("--profile", default=None, metavar="FILE", help="only profile one run_search of (c)")
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as d:
        tmp = Path(d)
        if args.profile:
            profile_part(args.overhead_trials or 100, tmp, args.profile)
            return 0
        header(emit, NAME, packages=("ray", "optuna"))
        emit("# scale to 2,000 trials: export, driver memory, per-trial overhead"
             + (" (--quick)" if args.quick else ""))
        t0 = time.perf_counter()
        if "a" not in skip:
            (tmp / "a").mkdir()
            export_part(args.export_trials or (300 if args.quick else 2000), args.export_epochs, tmp / "a",
                        args.before, args.export_rounds)
        if "b" not in skip:
            (tmp / "b").mkdir()
            memory_part(args.trials or (200 if args.quick else 2000), tmp / "b")
            bare_memory(args.trials or (200 if args.quick else 2000), tmp / "b")
        if "c" not in skip:
            (tmp / "c").mkdir()
            overhead_part(args.overhead_trials or (30 if args.quick else 100), tmp / "c",
                          args.pairs or (1 if args.quick else 4))
        footer(t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
