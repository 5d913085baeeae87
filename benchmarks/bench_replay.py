"""Search strategies replayed against a table of learning curves, through the real stack.

Each search runs ``ssam_tune.run.run_search`` (Ray Tune, the Optuna searcher and samplers,
MO-ASHA, the exports) with :func:`_search_replay.replay_trainable` in place of training: a
sampled config is snapped to the table's nearest config and one of its recorded runs is
reported epoch by epoch, so one search costs seconds and strategies can be compared over many
seeds. Any table in the format of ``benchmarks/curves/README.md`` is an input (``--table``):
the real curves of ``make_curves.py`` or the synthetic model's (``--synthetic`` writes it).

Ground truth: the table's full-fidelity front, each config's final validation accuracy averaged
over its recorded seeds (a diverged run counts as chance), its cost the theoretical FLOPs of a
full run relative to SGD's. Scores per search, from the exported ``pareto.csv`` (completed
full-fidelity trials), on **true values** (the exported configs' table means) and on the
reported ones:

- **HV/true**: hypervolume of the exported front over the true front's. Reference point:
  accuracy = SGD's true accuracy (the front's gain over SGD), cost = 1.05 x the grid's most
  expensive config.
- **epochs**: all reported epochs as a percentage of the grid's (every config once, full run).

Budgets: ``--budgets`` fractions of the grid's epochs, anchors included. One search per seed
runs to the largest; a Ray Tune stopper records which trials had completed as the reported
epochs passed each smaller one, which is what a search given that budget would have finished
(``num_samples`` is far above what a budget allows, so a search does not know its budget).
The largest budget is also scored from the exports, as a check of the recorder. Replay seed ``i`` is the search
seed and picks the recorded run each config replays; the same for every strategy, so per-seed
differences are paired. Strategies run interleaved per seed (the order rotating).

The rung table (``--rungs-only`` prints it alone, no search): for each epoch, the Spearman rank correlation
between a run's validation accuracy at that epoch and its final one, over all recorded runs and
per method family, and the share of true-front configs whose runs rank below the median at that
epoch (what an accuracy-only rung with reduction factor 2 would stop).

    .venv/bin/python benchmarks/bench_replay.py --table benchmarks/curves/label_noise.csv \\
        --seeds 20 | tee benchmarks/bench_replay_label_noise.txt
    .venv/bin/python benchmarks/bench_replay.py --synthetic /tmp/syn.csv --seeds 20
    .venv/bin/python benchmarks/bench_replay.py --rungs-only --table benchmarks/curves/label_noise.csv
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _search_replay as rp
from _common import header
from _search_common import emit, fmt_ci, footer, fresh_ray_env, mean_ci, quiet

NAME = Path(__file__).stem
HERE = Path(__file__).resolve().parent
COST_MARGIN = 1.05  # reference point's cost: this x the grid's most expensive config
BASELINES = ["sgd", "sam", "ssam"]

# The paper's settings (Mi et al. 2022: N_F 128, T_m 1, alpha 0.5, sparsity 50-98% in Tables 1
# and 5-6; rho 0.05 for VGG, Table 4), as tune.enqueue entries. The 50% SSAM-F one is the
# "ssam" anchor already.
PAPER = [
    {"method.name": "ssam_f", "method.granularity": "element", "method.sparsity": 0.9, "method.rho": 0.05,
     "method.N_F": 128, "method.T_m": 1},
    {"method.name": "ssam_f", "method.granularity": "element", "method.sparsity": 0.98, "method.rho": 0.05,
     "method.N_F": 128, "method.T_m": 1},
    {"method.name": "ssam_d", "method.granularity": "element", "method.sparsity": 0.5, "method.rho": 0.05,
     "method.alpha": 0.5},
    {"method.name": "ssam_d", "method.granularity": "element", "method.sparsity": 0.9, "method.rho": 0.05,
     "method.alpha": 0.5},
]

# Strategies: the tune: section each search runs with (on top of the common part below).
# "today" is the default of ssam-tune before this benchmark (TPE, 10 random start-up trials,
# MO-ASHA with the grace period at a quarter of the epochs and reduction factor 3).
# "_tpe" gives TPESampler's options for one strategy (applied by patching make_sampler for the
# run); INDEPENDENT is Optuna's plain TPE, which ssam-tune used before this benchmark.
INDEPENDENT = {"multivariate": False, "group": False}
STRATEGIES: dict[str, dict] = {
    "random": {"sampler": "random", "scheduler": "none"},
    # ssam-tune's default as it is now: what search_spaces/ and a tune: section that sets
    # nothing give (TPE per conditional group, no early stopping), with the paper's settings
    # enqueued as the shipped spaces do
    "default": {"enqueue": PAPER},
    "tpe": {"sampler": "tpe", "n_startup_trials": 10, "scheduler": "none", "_tpe": INDEPENDENT},
    "today": {"sampler": "tpe", "n_startup_trials": 10, "scheduler": {"type": "mo_asha", "reduction_factor": 3,
                                                                        "grace_period": "1/4"},
              "_tpe": INDEPENDENT},
    # candidates: rungs where the rung table says accuracy predicts the final one
    "tpe+late": {"sampler": "tpe", "n_startup_trials": 10, "_tpe": INDEPENDENT,
                 "scheduler": {"type": "mo_asha", "grace_period": "2/3", "reduction_factor": 3}},
    "tpe+late2": {"sampler": "tpe", "n_startup_trials": 10, "_tpe": INDEPENDENT,
                  "scheduler": {"type": "mo_asha", "grace_period": "1/2", "reduction_factor": 2}},
    "tpe+paper": {"sampler": "tpe", "n_startup_trials": 10, "scheduler": "none", "enqueue": PAPER,
                  "_tpe": INDEPENDENT},
    "tpe+late+paper": {"sampler": "tpe", "n_startup_trials": 10, "enqueue": PAPER, "_tpe": INDEPENDENT,
                       "scheduler": {"type": "mo_asha", "grace_period": "2/3", "reduction_factor": 3}},
    # TPE modelling the parameters jointly, per conditional group (Optuna's multivariate and
    # group options; ssam-tune's TPE since this benchmark chose it)
    "tpe-mv": {"sampler": "tpe", "n_startup_trials": 10, "scheduler": "none",
               "_tpe": {"multivariate": True, "group": True}},
    "tpe-mv+paper": {"sampler": "tpe", "n_startup_trials": 10, "scheduler": "none", "enqueue": PAPER,
                     "_tpe": {"multivariate": True, "group": True}},
    "nsga2": {"sampler": "nsga2", "scheduler": "none"},
    "random+late": {"sampler": "random",
                    "scheduler": {"type": "mo_asha", "grace_period": "2/3", "reduction_factor": 3}},
}


# -------------------------------------------------------------------------------------------------
# the ground truth
# -------------------------------------------------------------------------------------------------
def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The non-dominated (cost min, accuracy max) points, by increasing cost."""
    out, best = [], -math.inf
    for c, a in sorted(points, key=lambda p: (p[0], -p[1])):
        if a > best:
            out.append((c, a))
            best = a
    return out


def hypervolume(points: list[tuple[float, float]], floor: float, ceiling: float) -> float:
    """Area dominated by the points above accuracy ``floor`` and below cost ``ceiling``."""
    front = [(c, a) for c, a in pareto(points) if a > floor and c < ceiling]
    area = 0.0
    for i, (c, a) in enumerate(front):
        nxt = front[i + 1][0] if i + 1 < len(front) else ceiling
        area += (nxt - c) * (a - floor)
    return area


class Truth:
    """The table's true front and the scoring against it."""

    def __init__(self, table: rp.Table) -> None:
        self.table = table
        sgd = [c for c, p in table.params.items() if p["name"] == "sgd"]
        if not sgd:
            raise SystemExit(f"{table.path}: the table needs the SGD run (costs are relative to it)")
        self.unit = table.cost(sgd[0])
        self.floor = table.final(sgd[0])
        self.points = {c: (table.cost(c) / self.unit, table.final(c)) for c in table.params}
        self.ceiling = COST_MARGIN * max(c for c, _ in self.points.values())
        self.front = pareto(list(self.points.values()))
        self.front_configs = {c for c, p in self.points.items() if p in self.front}
        self.hv = hypervolume(list(self.points.values()), self.floor, self.ceiling)

    def hv_ratio(self, points: list[tuple[float, float]]) -> float:
        return hypervolume(points, self.floor, self.ceiling) / self.hv if points and self.hv > 0 else 0.0


# -------------------------------------------------------------------------------------------------
# the searches
# -------------------------------------------------------------------------------------------------
def search_block(table: rp.Table) -> dict:
    """The searched space: every method of the table, each key over the table's range."""
    params = list(table.params.values())

    def values(key):
        return sorted({p[key] for p in params if p[key] is not None})

    methods = sorted({p["name"] for p in params} - {"sgd"})  # SGD is an anchor of every search
    block = {"method.name": {"type": "choice", "values": methods}}
    rho, sparsity, alpha = values("rho"), values("sparsity"), values("alpha")
    if rho:
        block["method.rho"] = {"type": "loguniform", "low": rho[0], "high": rho[-1]}
    if sparsity:
        block["method.sparsity"] = {"type": "uniform", "low": sparsity[0], "high": sparsity[-1]}
    for key in ("N_F", "T_m"):
        if values(key):
            block[f"method.{key}"] = {"type": "choice", "values": [int(v) for v in values(key)]}
    if alpha:
        block["method.alpha"] = {"type": "uniform", "low": alpha[0], "high": alpha[-1]}
    grains = sorted({p["granularity"] for p in params if p["granularity"]})
    if len(grains) > 1:
        block["method.granularity"] = {"type": "choice", "values": grains}
    return block


def _tune(strategy: str, epochs: int) -> dict:
    """A strategy's tune: settings, a grace period given as a fraction ("2/3") resolved to epochs."""
    tune = {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v)
            for k, v in STRATEGIES[strategy].items() if not k.startswith("_")}
    sched = tune.get("scheduler")
    if isinstance(sched, dict) and isinstance(sched.get("grace_period"), str):
        num, den = sched["grace_period"].split("/")
        sched["grace_period"] = max(1, math.ceil(epochs * int(num) / int(den)))
    return tune


def _inside(dist: dict, value) -> bool:
    """Whether a searched key's distribution holds ``value`` (an enqueued setting outside a
    table's grid, like sparsity 0.98 on a grid that stops at 0.9, is left out)."""
    if dist["type"] == "choice":
        return value in dist["values"]
    return dist["low"] <= value <= dist["high"]


def space_dict(strategy: str, name: str, seed: int, table: rp.Table, num_samples: int) -> dict:
    block = search_block(table)
    tune = _tune(strategy, table.epochs)
    if "enqueue" in tune:  # only the keys this table's space searches (the synthetic one has no granularity)
        tune["enqueue"] = [e for e in ({k: v for k, v in e.items() if k in block} for e in tune["enqueue"])
                           if all(_inside(block[k], v) for k, v in e.items())]
    return {
        "name": name, "seed": seed,
        # the replay reads only the method section, the epochs and the seed; the rest is valid filler
        "model": {"name": "resnet18", "width": 0.0625},
        "data": {"name": "embedded", "train_size": 256, "val_fraction": 0.1},
        "train": {"epochs": table.epochs, "batch_size": 64},
        # the anchors' settings: SAM and SSAM at the quickstart's rho 0.05, SSAM-F 50% / N_F 128 / T_m 1
        "method": {"name": "ssam_f", "rho": 0.05, "sparsity": 0.5, "N_F": 128, "T_m": 1, "alpha": 0.5},
        "search": block,
        "tune": {"objective": "multi", "flops": "theoretical", "resources": {"cpu": 1}, "max_concurrent_trials": 2,
                 "max_failures": 0, "num_samples": num_samples, "seed": seed, "baselines": list(BASELINES),
                 **tune},
    }


def read_csv(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def table_config(trial: dict, table: rp.Table) -> str | None:
    """The table config a trial replayed, from its config columns in trials.csv (the replay's
    own ``table_config`` report is a string, which the exports leave out)."""
    if not trial.get("method.name"):
        return None  # a trial that never started has no config
    method = {"name": trial["method.name"], "granularity": trial.get("method.granularity") or "element"}
    method.update({k: float(trial[f"method.{k}"]) for k in rp.KEYS if trial.get(f"method.{k}")})
    return table.snap(method)


def score(out: Path, truth: Truth, epochs: int) -> dict:
    """The exported front scored as :func:`score_snapshot` scores a recorded one, plus what only
    the exports hold: every trial's epochs and status."""
    trials = read_csv(out / "trials.csv")
    for t in trials:
        t["table_config"] = table_config(t, truth.table)
    by_id = {t["trial_id"]: t for t in trials}
    front = [p for p in read_csv(out / "pareto.csv") if int(p["epochs"]) >= epochs]
    res = score_snapshot({p["trial_id"]: (by_id[p["trial_id"]]["table_config"], float(p["val_acc"]),
                                          float(p["flops_theoretical"])) for p in front}, truth)
    pruned: dict[int, int] = {}
    front_pruned: dict[int, int] = {}
    for t in trials:
        if t["status"] == "pruned":
            e = int(t["epochs_reached"] or 0)
            pruned[e] = pruned.get(e, 0) + 1
            if t["table_config"] in truth.front_configs:
                front_pruned[e] = front_pruned.get(e, 0) + 1
    res.update(epochs=sum(int(t["epochs_reached"] or 0) for t in trials), trials=len(trials),
               completed=sum(t["status"] == "completed" for t in trials), pruned=pruned, front_pruned=front_pruned)
    return res


def budget_recorder(budgets: list[int], epochs: int):
    """A Ray Tune ``Stopper`` that ends the search at the largest budget (distinct (trial, epoch)
    pairs reported: Ray passes a function trainable's last result twice) and, as the count
    passes each smaller one, records the trials completed at full fidelity so far. A search does not know its
    budget (``num_samples`` is far above it), so that record is what a search given the smaller
    budget would have finished: one search scores every budget."""
    from ray.tune.stopper import Stopper

    class BudgetRecorder(Stopper):
        def __init__(self) -> None:
            self.seen: set = set()
            self.done: dict[str, tuple[str, float, float]] = {}  # trial -> (table config, val_acc, flops)
            self.snapshots: dict[int, dict] = {}

        def __call__(self, trial_id, result) -> bool:
            epoch = result.get("epoch")
            if epoch is not None:
                self.seen.add((trial_id, epoch))
            # a trial's last epoch, reported before the count passed the budget: the search
            # given that budget ends with it completed
            if epoch == epochs and result.get("status") == "completed":
                self.done[trial_id] = (result["table_config"], float(result["val_acc"]),
                                       float(result["flops_theoretical"]))
            for b in budgets:
                if b not in self.snapshots and len(self.seen) >= b:
                    self.snapshots[b] = dict(self.done)
            return False

        def stop_all(self) -> bool:
            return len(self.seen) >= max(budgets)

    return BudgetRecorder()


def score_snapshot(done: dict, truth: Truth) -> dict:
    """Scores of the front the trials completed within a budget make, as ``score`` scores the
    exported one: HV of its reported values, and of its configs' true values."""
    reported = [(flops / truth.unit, acc) for _, acc, flops in done.values()]
    on_front = set(pareto(reported))
    front = {cid for (cid, acc, flops) in done.values() if (flops / truth.unit, acc) in on_front}
    return {"hv_rep": truth.hv_ratio(reported), "hv_true": truth.hv_ratio([truth.points[c] for c in front]),
            "front_found": len(front & truth.front_configs), "completed": len(done)}


@contextlib.contextmanager
def tpe_options(options: dict | None):
    """For one search, TPE built with further ``TPESampler`` options (the searcher runs in this
    process and looks ``make_sampler`` up in ssam_tune.tuning.search when it opens the study)."""
    if options is None:
        yield
        return
    import optuna

    from ssam_tune.tuning import search

    plain = search.make_sampler

    def make(kind, seed, n_startup, population_size=None):
        if kind != "tpe":
            return plain(kind, seed, n_startup, population_size)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup, constant_liar=True, **options)

    search.make_sampler = make
    try:
        yield
    finally:
        search.make_sampler = plain


def run_one(strategy: str, seed: int, budgets: list[int], truth: Truth, tmp: Path, num_samples: int) -> dict:
    """One search up to the largest budget; a score per budget (the largest one also from the
    exports, as a check of the recorder)."""
    from ssam_tune.run import run_search
    from ssam_tune.tuning.space import load_space

    name = f"{strategy.replace('+', '-')}-s{seed}"
    data = space_dict(strategy, name, seed, truth.table, num_samples)
    space = load_space(tmp / f"{name}.yaml", data=data)
    recorder = budget_recorder(budgets, truth.table.epochs)
    t0 = time.perf_counter()
    with quiet(), tpe_options(STRATEGIES[strategy].get("_tpe")):
        out = run_search(space, storage=str(tmp / "ray"), resume=False, results=str(tmp / "results"),
                         trainable=rp.replay_trainable, stop=recorder)
    wall = time.perf_counter() - t0
    exported = score(out, truth, truth.table.epochs)
    res = {}
    for b in budgets:
        # the record when the count passed b (the whole record if the search ended before:
        # num_samples reached). The exports of the largest budget can hold one or two trials
        # more: those whose last epoch arrived after stop_all turned true, before Tune stopped them.
        res[b] = score_snapshot(recorder.snapshots.get(b, recorder.done), truth)
        res[b]["wall"] = wall
    top = res[max(budgets)]
    top.update({k: exported[k] for k in ("epochs", "trials", "pruned", "front_pruned")})
    top["export_hv_true"] = exported["hv_true"]
    for b in budgets:
        res[b].setdefault("epochs", b)
        res[b].setdefault("trials", float("nan"))
    shutil.rmtree(tmp / "ray" / name, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    return res


# -------------------------------------------------------------------------------------------------
# the rung table
# -------------------------------------------------------------------------------------------------
def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(x: list[float], y: list[float]) -> float:
    if len(x) < 3:
        return float("nan")
    rx, ry = _ranks(x), _ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    den = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return num / den if den > 0 else float("nan")


FAMILIES = {"sgd": "sgd", "sam": "sam", "sam_on": "sam_on", "ssam_random": "ssam_random", "ssam_d": "ssam_d"}


def family(p: dict) -> str:
    return f"ssam_f {p['granularity'] or 'element'}" if p["name"] == "ssam_f" else FAMILIES.get(p["name"], p["name"])


def noise_ceiling(table: rp.Table, truth: Truth, draws: int = 200) -> list[float]:
    """HV/true of the front a search would export if it ran EVERY config of the grid once
    (100% of the grid's epochs), each on the seed a replay seed gives it (``run_of``), over
    replay seeds 0..draws-1: how far single-seed values let any strategy get."""
    scores = []
    for rs in range(draws):
        seen = {}
        for cid in table.params:
            last = table.run_of(cid, rs)[-1]
            ok = last["status"] == "completed" and int(last["epoch"]) == table.epochs
            seen[cid] = (truth.points[cid][0], float(last["val_acc"]) if ok else rp.DIVERGED_ACC)
        front = set(pareto(list(seen.values())))
        scores.append(truth.hv_ratio([truth.points[c] for c, p in seen.items() if p in front]))
    return scores


def rung_table(table: rp.Table, truth: Truth) -> None:
    """Per epoch: rank correlation of accuracy there with final accuracy (completed runs), and
    the share of true-front configs an accuracy-only rung (keep the top half) would stop."""
    runs = [(cid, rows) for cid, seeds in table.runs.items() for rows in seeds.values()
            if rows[-1]["status"] == "completed" and int(rows[-1]["epoch"]) == table.epochs]
    fams = sorted({family(table.params[c]) for c, _ in runs})
    emit(f"rung correlation: Spearman rho between val_acc at epoch e and final val_acc, over the {len(runs)} "
         f"completed runs (all) and per method family; 'front cut': share of the {len(truth.front_configs)} "
         "true-front configs' runs below the median val_acc at e (an accuracy-only rung, reduction factor 2, "
         "would stop them)")
    cols = ["epoch", "all", *fams, "front cut"]
    emit("  ".join(f"{c:>16}" if i else f"{c:>5}" for i, c in enumerate(cols)))
    for e in range(1, table.epochs):
        at = [(c, float(rows[e - 1]["val_acc"]), float(rows[-1]["val_acc"])) for c, rows in runs
              if len(rows) >= e and int(rows[e - 1]["epoch"]) == e]
        cells = [f"{e:>5}", f"{spearman([a for _, a, _ in at], [f for _, _, f in at]):>16.3f}"]
        for fam in fams:
            sub = [(a, f) for c, a, f in at if family(table.params[c]) == fam]
            cells.append(f"{spearman([a for a, _ in sub], [f for _, f in sub]):>16.3f}" if len(sub) >= 12 else
                         f"{'-':>16}")
        median = statistics.median(a for _, a, _ in at)
        on_front = [a for c, a, _ in at if c in truth.front_configs]
        cut = sum(a < median for a in on_front) / len(on_front) if on_front else float("nan")
        cells.append(f"{cut:>16.2f}")
        emit("  ".join(cells))


# -------------------------------------------------------------------------------------------------
# the report
# -------------------------------------------------------------------------------------------------
def report(results: dict, budgets: list[float], grid_epochs: int, strategies: list[str]) -> None:
    for b in budgets:
        emit("")
        emit(f"budget {100 * b:.0f}% of the grid's epochs: mean [95% interval over seeds]")
        emit(f"{'strategy':<16}{'HV/true true values':<26}{'HV/true reported':<26}{'epochs % grid':<18}"
             f"{'trials (compl.)':<17}{'front configs found':<21}wall s")
        for s in strategies:
            runs = results[(s, b)]
            if not runs:
                continue
            ep = [100.0 * r["epochs"] / grid_epochs for r in runs]
            trials = [r["trials"] for r in runs if r["trials"] == r["trials"]]
            count = (f"{statistics.fmean(trials):.0f} " if trials else "- ") + \
                f"({statistics.fmean(r['completed'] for r in runs):.0f})"
            emit(f"{s:<16}{fmt_ci([r['hv_true'] for r in runs]):<26}{fmt_ci([r['hv_rep'] for r in runs]):<26}"
                 f"{statistics.fmean(ep):<18.1f}{count:<17}"
                 f"{statistics.fmean(r['front_found'] for r in runs):<21.1f}"
                 f"{statistics.fmean(r['wall'] for r in runs):.0f}")
        for s in strategies:
            pruned: dict[int, int] = {}
            front: dict[int, int] = {}
            for r in results[(s, b)]:
                for total, part in ((pruned, r.get("pruned", {})), (front, r.get("front_pruned", {}))):
                    for k, v in part.items():
                        total[k] = total.get(k, 0) + v
            if pruned:
                emit(f"  {s}: pruned trials by epochs reached {dict(sorted(pruned.items()))}; of them true-front "
                     f"configs {dict(sorted(front.items()))}")


def paired(results: dict, budgets: list[float], strategies: list[str], ref: str) -> list[str]:
    lines = []
    for b in budgets:
        for other in strategies:
            if other == ref or not results[(ref, b)] or not results[(other, b)]:
                continue
            n = min(len(results[(ref, b)]), len(results[(other, b)]))
            diffs = [results[(ref, b)][i]["hv_true"] - results[(other, b)][i]["hv_true"] for i in range(n)]
            m, lo, hi = mean_ci(diffs)
            lines.append(f"  budget {100 * b:.0f}%: {ref} minus {other}, HV/true on true values: {m:+.4f} "
                         f"[{lo:+.4f}, {hi:+.4f}], {ref} ahead in {sum(d > 0 for d in diffs)}/{n}")
    return lines


def run_seeds(args, strategies, budgets, grid_epochs, truth, tmp, results, t_start) -> None:
    """Every strategy once per replay seed, the order rotating per seed; results appended."""
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        k = seed % len(strategies)
        for strategy in strategies[k:] + strategies[:k]:
            res = run_one(strategy, seed, [int(b * grid_epochs) for b in budgets], truth, tmp,
                          args.num_samples)
            for b in budgets:
                results[(strategy, b)].append(res[int(b * grid_epochs)])
            top = res[int(max(budgets) * grid_epochs)]
            print(f"[{time.perf_counter() - t_start:6.0f} s] seed {seed} {strategy}: HV/true " +
                  ", ".join(f"{100 * b:.0f}% {res[int(b * grid_epochs)]['hv_true']:.3f}" for b in budgets) +
                  f" (export {top['export_hv_true']:.3f}), {top['epochs']} epochs, {top['trials']} trials, "
                  f"{top['wall']:.0f} s", file=sys.stderr, flush=True)


def goals(results: dict, budgets: list[float], ref: str) -> None:
    """Issue 20's goals for ``ref``, each MET or NOT MET with its gap (true values)."""
    emit("")
    emit(f"goals ({ref}, true values):")
    for b, want in ((0.35, 0.95), (0.20, 0.90)):
        if (ref, b) not in results or not results[(ref, b)]:
            continue
        m, lo, hi = mean_ci([r["hv_true"] for r in results[(ref, b)]])
        emit(f"  HV/true >= {want:.2f} at {100 * b:.0f}% of the grid's epochs: {m:.3f} [{lo:.3f}, {hi:.3f}] -> "
             f"{'MET' if m >= want else f'NOT MET (gap {want - m:.3f})'}")
    for other in ("random", "today"):
        for b in budgets:
            if not results.get((other, b)) or not results.get((ref, b)):
                continue
            n = min(len(results[(ref, b)]), len(results[(other, b)]))
            diffs = [results[(ref, b)][i]["hv_true"] - results[(other, b)][i]["hv_true"] for i in range(n)]
            m, lo, hi = mean_ci(diffs)
            ok = lo == lo and lo > 0
            emit(f"  beats {other} at {100 * b:.0f}%, paired 95% interval above 0: {m:+.4f} [{lo:+.4f}, {hi:+.4f}] "
                 f"over {n} seeds -> {'MET' if ok else f'NOT MET (lower end {lo:+.4f})'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--table", type=Path, default=HERE / "curves" / "label_noise.csv")
    ap.add_argument("--synthetic", type=Path, help="write the synthetic model's table here and replay it")
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--first-seed", type=int, default=0, help="replay seeds first..first+seeds-1 (choose a "
                    "strategy on other seeds than those it is evaluated on)")
    ap.add_argument("--budgets", default="0.2,0.35", help="comma-separated fractions of the grid's epochs")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--ref", default=None, help="the strategy the paired differences are taken from "
                    "(default: the last of --strategies)")
    ap.add_argument("--num-samples", type=int, default=2000)
    ap.add_argument("--rungs-only", action="store_true", help="print the rung table and stop (no search)")
    args = ap.parse_args()
    if args.synthetic:
        import _search_synthetic as syn

        syn.write_table(args.synthetic)
        args.table = args.synthetic
    strategies = [s for s in args.strategies.split(",") if s]
    unknown = set(strategies) - set(STRATEGIES)
    if unknown:
        ap.error(f"unknown strategies {sorted(unknown)}; choose from {', '.join(STRATEGIES)}")
    budgets = [float(b) for b in args.budgets.split(",")]
    ref = args.ref or strategies[-1]

    table = rp.load_table(str(args.table.resolve()))
    truth = Truth(table)
    grid_epochs = len(table.params) * table.epochs
    header(emit, NAME, packages=("ray", "optuna"))
    emit(f"# table {args.table} ({len(table.params)} configs x {len(table.seeds)} seeds, {table.epochs} epochs): "
         f"grid {grid_epochs} epochs")
    emit(f"# true front ({len(truth.front)} configs; cost x SGD: mean final val_acc): " +
         ", ".join(f"{c:.2f}: {a:.4f}" for c, a in truth.front))
    emit(f"# reference point: accuracy {truth.floor:.4f} (SGD), cost {truth.ceiling:.2f}x SGD; true HV {truth.hv:.6f}")
    ceiling = noise_ceiling(table, truth)
    emit(f"# noise ceiling: running every config of the grid once (100% of its epochs) and exporting the front of "
         f"the single-seed values reaches HV/true {fmt_ci(ceiling)} (mean [95% interval] over 200 replay seeds); "
         "no strategy that runs each config once can expect more")
    emit("")
    rung_table(table, truth)
    if args.rungs_only:
        return 0
    fresh_ray_env()
    os.environ[rp.TABLE_ENV] = str(args.table.resolve())
    emit("")
    emit(f"# searches: replay seeds {args.first_seed}..{args.first_seed + args.seeds - 1}, budgets "
         f"{', '.join(f'{100 * b:.0f}% ({int(b * grid_epochs)} epochs)' for b in budgets)}, 2 trials at a time; "
         f"strategies (tune: on top of objective multi, flops theoretical, anchors {BASELINES}):")
    for s in strategies:
        shown = {k: (f"{len(v)} paper settings (PAPER)" if k == "enqueue" else v) for k, v in STRATEGIES[s].items()}
        emit(f"#   {s}: {shown}")
    results: dict = {(s, b): [] for s in strategies for b in budgets}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="breplay_") as d:
        tmp = Path(d)
        os.environ["RAY_TMPDIR"] = str(tmp / "rt")
        (tmp / "rt").mkdir()
        import ray

        # one Ray for every search (run_search runs in a Ray this process started): starting
        # Ray takes longer than a replayed search
        with quiet():
            ray.init(address="local", num_cpus=2, include_dashboard=False)
        try:
            run_seeds(args, strategies, budgets, grid_epochs, truth, tmp, results, t_start)
        except KeyboardInterrupt:  # SIGINT (e.g. timeout -s INT): report the seeds every strategy finished
            done = min(len(v) for v in results.values())
            for key in results:
                del results[key][done:]
            emit(f"# interrupted: reporting the {done} seeds every strategy finished")
        with contextlib.suppress(Exception):
            ray.shutdown()
    report(results, budgets, grid_epochs, strategies)
    emit("")
    emit("paired differences on true values, mean [95% interval]:")
    for line in paired(results, budgets, strategies, ref):
        emit(line)
    goals(results, budgets, ref)
    emit("")
    footer(t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
