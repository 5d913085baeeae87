"""Search efficiency against a known answer: five strategies on a synthetic accuracy-versus-FLOPs
problem, each through the real ``ssam_tune.run.run_search`` (Ray Tune, the Optuna searcher,
the schedulers, the exports), over several seeds, scored against the true Pareto front.

The problem is :mod:`_search_synthetic` (its docstring lists the model's assumptions): a
trainable that reports, every epoch, a noisy learning curve whose final accuracy and cost
depend on the method (SGD, SAM, SSAM-F, SSAM-D), rho, sparsity, N_F, T_m and alpha. Its
noise-free final values over a dense grid of the space give the true front.

Strategies (objective multi: validation accuracy max, theoretical FLOPs min):

1. ``grid``: a ``cases`` space, a coarse grid of the searched keys (SGD; SAM x 3 rho; SSAM-F x
   3 rho x 3 sparsity x 2 N_F x 2 T_m; SSAM-D x 3 rho x 3 sparsity x 2 alpha), every case at
   full epochs, no scheduler. Its total epochs set the others' budget.
2. ``random``: random sampler, no scheduler.
3. ``tpe+asha``: TPE with Ray's ASHA on accuracy only (``scheduler: asha``).
4. ``tpe+mo_asha``: TPE with the multi-objective ASHA (``scheduler: mo_asha``).
5. ``nsga2+mo_asha``: NSGA-II with MO-ASHA (``population_size`` 4, ``--population``).

Strategies 2-5 have the anchors (``baselines: [sgd, sam, ssam]``) and the same epoch budget,
``--budget`` (default 35%) of the grid's total epochs, anchors included, enforced by a Ray Tune
``Stopper`` whose ``stop_all()`` turns true once the reported epochs reach it; ``num_samples``
is set well above what the budget allows, so the budget is what ends them. Seed ``i`` is both the
search seed (``tune.seed``) and the noise seed (the config's ``seed``), the same for every
strategy, so per-seed differences are paired. The strategies run interleaved (seed 0: all five,
seed 1: all five, ...) so that machine load drifts hit all of them alike.

Scores, per run, from ``<results>/<name>/pareto.csv`` (completed full-fidelity trials only):

- **HV/true (reported)**: hypervolume of the exported front's reported (final val_acc, cost)
  over the true front's hypervolume. Reference point fixed for all: accuracy floor = SGD's
  true accuracy, cost ceiling = 2.05x SGD. Reported values carry the noise, and picking the
  front's maxima favours lucky draws, so this can exceed 1.
- **HV/true (true values)**: the same for the exported configs' noise-free final accuracies
  (what those configs are really worth; never above 1).
- **recall@eps**: of 21 reference points on the true front (the best true accuracy at cost
  <= c for c = 1.00, 1.05, ..., 2.00x SGD), the fraction with an exported config within eps
  (0.05 and 0.10) of it: Euclidean distance on true values, with cost and accuracy each
  scaled to [0, 1] by the true front's range (1x..2x SGD; SGD's accuracy..the best).
- **cheapest**: the cost (x SGD) of the cheapest exported front point other than SGD.
- **epochs**: epochs reported by all trials (trials.csv), as a percentage of the grid's.

Usage (Ray's progress output goes to stderr):

    python benchmarks/bench_search.py | tee benchmarks/bench_search.txt
    python benchmarks/bench_search.py --quick        # 2 seeds, 9 epochs: a check that it works
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _search_synthetic as syn
from _common import header
from _search_common import emit, footer, fresh_ray_env, quiet

NAME = Path(__file__).stem
fresh_ray_env()  # a fresh local Ray for every run; workers import _search_synthetic by name

STRATEGIES = ("grid", "random", "tpe+asha", "tpe+mo_asha", "nsga2+mo_asha")
COST_CEILING = 2.05  # x SGD: the reference point's cost
RECALL_EPS = (0.05, 0.10)
RECALL_POINTS = 21
BASELINES = ["sgd", "sam", "ssam"]
# two-sided 95% Student t quantiles, by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
       20: 2.086, 25: 2.060, 30: 2.042}


# -------------------------------------------------------------------------------------------------
# spaces
# -------------------------------------------------------------------------------------------------
def base_dict(name: str, seed: int, epochs: int) -> dict:
    """The fixed training config: the synthetic trainable reads only epochs, seed and method."""
    return {
        "name": name, "seed": seed,
        "model": {"name": "resnet18", "width": 0.0625},
        "data": {"name": "embedded", "train_size": 256, "val_fraction": 0.1},
        "train": {"epochs": epochs, "batch_size": 64},
        # the anchors' settings: SAM and SSAM at rho 0.1, SSAM-F 50% / N_F 128 / T_m 1 (Table 1)
        "method": {"name": "ssam_f", "rho": 0.1, "sparsity": 0.5, "N_F": 128, "T_m": 1, "alpha": 0.5},
    }


GRID = {"rho": [0.05, 0.1, 0.2], "sparsity": [0.5, 0.9, 0.99], "N_F": [16, 128], "T_m": [1, 10],
        "alpha": [0.3, 0.7]}


def grid_cases() -> list[dict]:
    cases = [{"label": "sgd", "method.name": "sgd"}]
    cases += [{"label": f"sam_r{r}", "method.name": "sam", "method.rho": r} for r in GRID["rho"]]
    for r, s, n, t in itertools.product(GRID["rho"], GRID["sparsity"], GRID["N_F"], GRID["T_m"]):
        cases.append({"label": f"f_r{r}_s{s}_n{n}_t{t}", "method.name": "ssam_f", "method.rho": r,
                      "method.sparsity": s, "method.N_F": n, "method.T_m": t})
    for r, s, a in itertools.product(GRID["rho"], GRID["sparsity"], GRID["alpha"]):
        cases.append({"label": f"d_r{r}_s{s}_a{a}", "method.name": "ssam_d", "method.rho": r,
                      "method.sparsity": s, "method.alpha": a})
    return cases


def space_dict(strategy: str, name: str, seed: int, epochs: int, grace: int, num_samples: int,
               population: int = 4) -> dict:
    common_tune = {"objective": "multi", "flops": "theoretical", "resources": {"cpu": 1},
                   "max_concurrent_trials": 2, "max_failures": 0}
    d = base_dict(name, seed, epochs)
    if strategy == "grid":
        d["cases"] = grid_cases()
        d["seeds"] = [seed]
        d["tune"] = {**common_tune, "scheduler": "none"}
        return d
    S = syn.SPACE
    d["search"] = {
        "method.name": {"type": "choice", "values": list(S["method.name"])},
        "method.rho": {"type": "loguniform", "low": S["method.rho"][0], "high": S["method.rho"][1]},
        "method.sparsity": {"type": "uniform", "low": S["method.sparsity"][0], "high": S["method.sparsity"][1]},
        "method.N_F": {"type": "choice", "values": list(S["method.N_F"])},
        "method.T_m": {"type": "choice", "values": list(S["method.T_m"])},
        "method.alpha": {"type": "uniform", "low": S["method.alpha"][0], "high": S["method.alpha"][1]},
    }
    sampler, scheduler = {"random": ("random", "none"), "tpe+asha": ("tpe", "asha"),
                          "tpe+mo_asha": ("tpe", "mo_asha"), "nsga2+mo_asha": ("nsga2", "mo_asha")}[strategy]
    d["tune"] = {**common_tune, "num_samples": num_samples, "sampler": sampler, "seed": seed,
                 **({"population_size": population} if sampler == "nsga2" else {}),
                 "baselines": list(BASELINES),
                 "scheduler": "none" if scheduler == "none" else
                 {"type": scheduler, "grace_period": grace, "reduction_factor": 3}}
    return d


# -------------------------------------------------------------------------------------------------
# the epoch budget
# -------------------------------------------------------------------------------------------------
def epoch_budget_stopper(budget: int):
    from ray.tune.stopper import Stopper

    class EpochBudget(Stopper):
        """Stops the whole experiment once its trials have reported ``budget`` epochs in all."""

        def __init__(self) -> None:
            self.budget, self.seen = budget, set()

        @property
        def used(self) -> int:
            return len(self.seen)

        def __call__(self, trial_id, result) -> bool:
            # distinct (trial, epoch): Ray passes a function trainable's last result twice (the
            # report, then again with done=True when the function returns)
            if result.get("epoch") is not None:
                self.seen.add((trial_id, result["epoch"]))
            return False

        def stop_all(self) -> bool:
            return self.used >= self.budget

    return EpochBudget()


# -------------------------------------------------------------------------------------------------
# one run
# -------------------------------------------------------------------------------------------------
def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def num(value: str | None) -> float | None:
    return float(value) if value not in (None, "") else None


class Truth:
    """The true front and the scoring against it."""

    def __init__(self) -> None:
        self.cost, self.acc = syn.true_front()
        self.floor = syn.SGD_ACC
        self.top = float(self.acc.max())
        self.hv = syn.hypervolume(self.cost, self.acc, self.floor, COST_CEILING)
        self.refs = []
        for c in [1.0 + k / (RECALL_POINTS - 1) for k in range(RECALL_POINTS)]:
            i = int((self.cost <= c + 1e-12).nonzero()[0].max())
            self.refs.append((float(self.cost[i]), float(self.acc[i])))

    def norm(self, cost: float, acc: float) -> tuple[float, float]:
        return cost - 1.0, (acc - self.floor) / (self.top - self.floor)

    def recall(self, points: list[tuple[float, float]], eps: float) -> float:
        hit = 0
        normed = [self.norm(*p) for p in points]
        for ref in self.refs:
            rc, ra = self.norm(*ref)
            if any(math.hypot(rc - pc, ra - pa) <= eps for pc, pa in normed):
                hit += 1
        return hit / len(self.refs)

    def hv_ratio(self, points: list[tuple[float, float]]) -> float:
        if not points:
            return 0.0
        costs, accs = zip(*points, strict=True)
        return syn.hypervolume(costs, accs, self.floor, COST_CEILING) / self.hv


def score(out: Path, truth: Truth, epochs: int) -> dict:
    trials = read_csv(out / "trials.csv")
    by_id = {t["trial_id"]: t for t in trials}
    front = [p for p in read_csv(out / "pareto.csv") if int(p["epochs"]) >= epochs]
    unit = syn.FLOPS_PER_EPOCH * epochs
    reported, true = [], []
    for p in front:
        cost = float(p["flops_theoretical"]) / unit
        reported.append((cost, float(p["val_acc"])))
        true.append((cost, float(by_id[p["trial_id"]]["true_final_acc"])))
    sparse = [c for (c, _), p in zip(reported, front, strict=True) if p["method"] != "sgd"]
    statuses: dict[str, int] = {}
    for t in trials:
        statuses[t["status"]] = statuses.get(t["status"], 0) + 1
    # checks on the machinery: a trial below full fidelity is never "completed", and the
    # journal agrees with the trial folders on what completed
    short_completed = sum(t["status"] == "completed" and int(t["epochs_reached"] or 0) < epochs for t in trials)
    journal: dict[str, int] = {}  # "folder status -> journal status" where they differ (searches only)
    for t in trials:
        if t["kind"] != "case" and t["optuna_status"] != t["status"]:
            key = f"{t['status']}->{t['optuna_status'] or 'none'}"
            journal[key] = journal.get(key, 0) + 1
    stopped_at: dict[int, int] = {}
    for t in trials:
        if t["status"] == "pruned":
            e = int(t["epochs_reached"] or 0)
            stopped_at[e] = stopped_at.get(e, 0) + 1
    return {
        "hv_rep": truth.hv_ratio(reported), "hv_true": truth.hv_ratio(true),
        "recall": truth.recall(true, RECALL_EPS[0]), "recall2": truth.recall(true, RECALL_EPS[1]),
        "cheapest": min(sparse) if sparse else float("nan"),
        "epochs": sum(int(t["epochs_reached"] or 0) for t in trials), "trials": len(trials),
        "completed": statuses.get("completed", 0), "front": len(front), "statuses": statuses,
        "short_completed": short_completed, "journal": journal, "stopped_at": stopped_at,
    }


def run_one(strategy: str, seed: int, args, budget: int, truth: Truth, tmp: Path) -> dict:
    from ssam_tune.run import run_search
    from ssam_tune.tuning.space import load_space

    name = f"{strategy.replace('+', '-')}-s{seed}"
    space = load_space(tmp / f"{name}.yaml", data=space_dict(strategy, name, seed, args.epochs, args.grace,
                                                            args.num_samples, args.population))
    stopper = None if strategy == "grid" else epoch_budget_stopper(budget)
    t0 = time.perf_counter()
    with quiet():
        out = run_search(space, storage=str(tmp / "ray"), resume=False, results=str(tmp / "results"),
                         trainable=syn.synthetic_trainable, stop=stopper)
    wall = time.perf_counter() - t0
    res = score(out, truth, args.epochs)
    res["wall"] = wall
    res["stopper_used"] = stopper.used if stopper is not None else None
    res["population"] = space.tune.population_size if space.tune.sampler == "nsga2" else None
    shutil.rmtree(tmp / "ray" / name, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    return res


# -------------------------------------------------------------------------------------------------
# statistics and the table
# -------------------------------------------------------------------------------------------------
def mean_ci(values: list[float]) -> tuple[float, float, float]:
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
    if math.isnan(lo):
        return f"{m:{spec}}"
    return f"{m:{spec}} [{lo:{spec}}, {hi:{spec}}]"


def table(results: dict[str, list[dict]], grid_epochs: int) -> None:
    cols = [("strategy", 14), ("HV/true reported", 22), ("HV/true true values", 22),
            (f"recall@{RECALL_EPS[0]:.2f}", 19), (f"recall@{RECALL_EPS[1]:.2f}", 19), ("cheapest xSGD", 22),
            ("epochs % grid", 17), ("trials (compl.)", 16), ("wall s", 6)]
    emit("  ".join(f"{c:<{w}}" for c, w in cols))
    for strategy, runs in results.items():
        if not runs:
            continue
        ep = [100.0 * r["epochs"] / grid_epochs for r in runs]
        cells = [strategy, fmt_ci([r["hv_rep"] for r in runs]), fmt_ci([r["hv_true"] for r in runs]),
                 fmt_ci([r["recall"] for r in runs], ".2f"), fmt_ci([r["recall2"] for r in runs], ".2f"),
                 fmt_ci([r["cheapest"] for r in runs]),
                 f"{statistics.fmean(ep):.1f} ({min(ep):.1f}-{max(ep):.1f})",
                 f"{statistics.fmean(r['trials'] for r in runs):.0f} "
                 f"({statistics.fmean(r['completed'] for r in runs):.0f})",
                 f"{statistics.fmean(r['wall'] for r in runs):.0f}"]
        emit("  ".join(f"{c:<{w}}" for c, (_, w) in zip(cells, cols, strict=True)))


def checks(results: dict[str, list[dict]], budget: int, epochs: int) -> None:
    emit("")
    emit("checks on the machinery (over all seeds):")
    for strategy, runs in results.items():
        if not runs:
            continue
        statuses: dict[str, int] = {}
        stopped: dict[int, int] = {}
        journal: dict[str, int] = {}
        for r in runs:
            for total, part in ((statuses, r["statuses"]), (stopped, r["stopped_at"]), (journal, r["journal"])):
                for k, v in part.items():
                    total[k] = total.get(k, 0) + v
        over = [r["epochs"] - budget for r in runs]
        line = (f"  {strategy:<14} statuses {dict(sorted(statuses.items()))}; pruned trials by epochs reached "
                f"{dict(sorted(stopped.items()))}; completed below {epochs} epochs: "
                f"{sum(r['short_completed'] for r in runs)}; folder status -> Optuna journal status where "
                f"they differ: {dict(sorted(journal.items())) if journal else 'none'}")
        if strategy != "grid":
            line += (f"; epochs over budget: {min(over):+d}..{max(over):+d} (stopper counted "
                     f"{min(r['stopper_used'] for r in runs)}-{max(r['stopper_used'] for r in runs)})")
        if runs[0]["population"]:
            line += f"; NSGA-II population {runs[0]['population']}"
        emit(line)


def paired(results: dict[str, list[dict]], ref: str = "tpe+mo_asha") -> None:
    if not results.get(ref):
        return
    emit("")
    emit(f"paired differences, {ref} minus each other strategy (same seed: same search seed and noise), "
         "mean [95% interval]:")
    for strategy, runs in results.items():
        if strategy == ref or not runs:
            continue
        n = min(len(runs), len(results[ref]))
        cells = []
        for key, what in (("hv_rep", "HV/true reported"), ("hv_true", "HV/true true values"),
                          ("recall2", f"recall@{RECALL_EPS[1]:.2f}"), ("cheapest", "cheapest")):
            diffs = [results[ref][i][key] - runs[i][key] for i in range(n)]
            cells.append(f"{what} {fmt_ci(diffs, '+.3f')}")
        emit(f"  vs {strategy:<14} " + "; ".join(cells))


def goals(results: dict[str, list[dict]], grid_epochs: int) -> None:
    emit("")
    emit("goals:")
    mo, asha = results.get("tpe+mo_asha", []), results.get("tpe+asha", [])
    for key, what in (("hv_rep", "reported values"), ("hv_true", "true values")):
        if mo:
            m, lo, hi = mean_ci([r[key] for r in mo])
            frac = max(r["epochs"] for r in mo) / grid_epochs
            ok = m >= 0.90 and frac <= 0.35
            gap = "" if ok else f"; gap: {max(0.0, 0.90 - m):.3f} of the true HV" + \
                (f", {100 * (frac - 0.35):.1f} points of epochs over" if frac > 0.35 else "")
            emit(f"  (a) [{what}] TPE+MO-ASHA reaches >= 90% of the true front's HV with <= 35% of the grid's "
                 f"epochs: mean HV/true {m:.3f} [{lo:.3f}, {hi:.3f}], at most {100 * frac:.1f}% of the grid's "
                 f"epochs -> {'MET' if ok else 'NOT MET'}{gap}")
        if mo and asha:
            n = min(len(mo), len(asha))
            diffs = [mo[i][key] - asha[i][key] for i in range(n)]
            m, lo, hi = mean_ci(diffs)
            wins = sum(d > 0 for d in diffs)
            ok = not math.isnan(lo) and lo > 0
            gap = "" if ok else f"; gap: the interval's lower end is {lo:+.4f} (needs > 0)"
            emit(f"  (b) [{what}] MO-ASHA beats ASHA(accuracy) on HV, paired over {n} seeds: mean difference "
                 f"{m:+.4f} [{lo:+.4f}, {hi:+.4f}], MO-ASHA ahead in {wins}/{n} -> "
                 f"{'MET' if ok else 'NOT MET'}{gap}")
    emit("  (goals (a) and (b) are judged on the reported values, as the exports show them; the true-value "
         "lines say whether they hold for what the exported configs are really worth)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 seeds, 9 epochs (grace 1), fewer samples: a check")
    p.add_argument("--seeds", type=int, default=None, help="seeds per strategy (default 10; --quick 2)")
    p.add_argument("--epochs", type=int, default=None, help="epochs of a full run (default 27; --quick 9)")
    p.add_argument("--grace", type=int, default=None, help="ASHA grace period (default 3; --quick 1); rf 3")
    p.add_argument("--budget", type=float, default=0.35, help="epoch budget of the searches, a fraction of "
                   "the grid's total epochs (default 0.35)")
    p.add_argument("--num-samples", type=int, default=None, help="tune.num_samples of the searches (default "
                   "400; --quick 150): far more than the budget allows")
    p.add_argument("--population", type=int, default=4, help="NSGA-II population_size (default 4: the ~8 "
                   "sampled trials that complete within the budget make two generations; ssam_tune's default, "
                   "from num_samples, would be one generation, i.e. random search)")
    p.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated subset to run")
    args = p.parse_args()
    args.seeds = args.seeds or (2 if args.quick else 10)
    args.epochs = args.epochs or (9 if args.quick else 27)
    args.grace = args.grace or (1 if args.quick else 3)
    args.num_samples = args.num_samples or (150 if args.quick else 400)
    strategies = [s for s in args.strategies.split(",") if s]
    unknown = set(strategies) - set(STRATEGIES)
    if unknown:
        p.error(f"unknown strategies {sorted(unknown)}; choose from {', '.join(STRATEGIES)}")

    header(emit, NAME, packages=("ray", "optuna", "numpy"))
    truth = Truth()
    n_cases = len(grid_cases())
    grid_epochs = n_cases * args.epochs
    budget = int(args.budget * grid_epochs)
    from ssam_tune.tuning.space import milestones

    emit(f"# synthetic search benchmark{' (--quick)' if args.quick else ''}: {args.seeds} seeds x "
         f"{len(strategies)} strategies, {args.epochs} epochs per full run, 2 trials at a time x 1 CPU")
    emit(f"# grid: {n_cases} cases x {args.epochs} epochs = {grid_epochs} epochs; searches: budget {budget} epochs "
         f"({100 * args.budget:.0f}%, anchors included), num_samples {args.num_samples}; ASHA/MO-ASHA rungs at "
         f"epochs {milestones(args.grace, 3, args.epochs)}, reduction factor 3")
    emit(f"# true front: {len(truth.cost)} non-dominated points of a dense grid; reference point: accuracy "
         f"{truth.floor:.4f} (SGD), cost {COST_CEILING}x SGD; true HV {truth.hv:.6f}; accuracy range "
         f"{truth.floor:.4f}..{truth.top:.4f}")
    emit("# true front at the recall reference costs (x SGD: accuracy): " +
         ", ".join(f"{c:.2f}: {a:.4f}" for c, a in truth.refs[::4]))
    emit("")

    results: dict[str, list[dict]] = {s: [] for s in strategies}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bsearch_") as d:
        tmp = Path(d)
        os.environ["RAY_TMPDIR"] = str(tmp / "rt")  # Ray's session folders, removed with the rest
        (tmp / "rt").mkdir()
        for seed in range(args.seeds):
            k = seed % len(strategies)
            for strategy in strategies[k:] + strategies[:k]:  # rotate the order per seed
                res = run_one(strategy, seed, args, budget, truth, tmp)
                results[strategy].append(res)
                print(f"[{time.perf_counter() - t_start:6.0f} s] seed {seed} {strategy}: HV/true reported "
                      f"{res['hv_rep']:.3f}, true {res['hv_true']:.3f}, recall {res['recall']:.2f}, cheapest "
                      f"{res['cheapest']:.3f}x, {res['epochs']} epochs, {res['trials']} trials "
                      f"({res['completed']} completed), {res['wall']:.0f} s", file=sys.stderr, flush=True)
                shutil.rmtree(tmp / "rt", ignore_errors=True)
                (tmp / "rt").mkdir()
    emit(f"per strategy: mean [95% interval over {args.seeds} seeds]. HV/true: hypervolume of the exported front "
         "(pareto.csv) / the true front's, on the reported val_acc or on the same configs' noise-free accuracy; "
         "recall@eps: share of 21 true-front reference points with an exported config within eps (normalised, "
         "true values); cheapest: cheapest exported front point other than SGD (x SGD's FLOPs); epochs: all "
         "reported epochs (min-max); trials: started (completed at full fidelity); wall: per run_search call")
    table(results, grid_epochs)
    paired(results)
    checks(results, budget, args.epochs)
    goals(results, grid_epochs)
    emit("")
    footer(t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
