"""Does SAM-family training beat SGD at the quickstart's CPU scale? Measured without Ray.

Trains SGD, SAM and SSAM-F (50% and 90% sparsity) with :class:`ssam_tune.training.trainer.Trainer` on the
embedded data, for one candidate setting (the fixed part of a search space plus ``--set``
overrides) over several training seeds, one run at a time, and appends one CSV row per run::

    python scripts/measure_quickstart.py --setting base --seeds 0-4 \\
        --csv results/quickstart_seeds/methods_raw.csv
    python scripts/measure_quickstart.py --setting noise20 --set data.label_noise=0.2 ...
    python scripts/measure_quickstart.py --summary --csv results/quickstart_seeds/methods_raw.csv
    python scripts/measure_quickstart.py --searches --space SPACE.yaml --tune-seeds 0-4

``--searches`` runs ``python -m ssam_tune.run`` on copies of the space with ``tune.seed`` set to
each of ``--tune-seeds``, one after the other, and appends the wall time and the exported front
(``pareto.csv``) of each, next to the SGD anchor, to ``--search-csv``.

The seed is the config's ``seed``: it fixes the validation split, the label noise, the
initialisation and the data order, the same for every method (paired runs). ``--summary``
prints, per setting and method, the mean and sample standard deviation over seeds of the
final-epoch validation and test accuracy, the paired difference to SGD (mean, standard error,
and in how many seeds the method beat SGD) and the seconds per run.
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SPACE = ROOT / "search_spaces" / "quickstart.yaml"
# The anchors of the quickstart search (README: Baselines) plus SSAM-F at 90% sparsity.
METHODS = {
    "sgd": {"name": "sgd"},
    "sam": {"name": "sam"},
    "ssam_f50": {"name": "ssam_f", "sparsity": 0.5, "N_F": 128, "T_m": 1},
    "ssam_f90": {"name": "ssam_f", "sparsity": 0.9, "N_F": 128, "T_m": 1},
}
COLUMNS = ["setting", "method", "seed", "val_acc", "test_acc", "best_val_acc", "test_acc_at_best",
           "train_acc", "train_loss", "flops_theoretical", "train_seconds", "wall_seconds",
           "status", "overrides", "threads", "date", "host"]


def _seeds(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    return out


def base_config(space: Path) -> dict:
    """The fixed training part of a search space (its seed, model, data, train, method)."""
    data = yaml.safe_load(space.read_text())
    return {k: copy.deepcopy(data[k]) for k in ("seed", "model", "data", "train", "method") if k in data}


def _set(cfg: dict, dotted: str, value) -> None:
    node = cfg
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def run_one(cfg_dict: dict, data_cache: dict, verbose: bool = False) -> dict:
    """Train one config to the end on the CPU; the final metrics plus the wall time."""
    from ssam_tune.training.config import config_from_dict
    from ssam_tune.training.data import load_dataset
    from ssam_tune.training.trainer import Trainer

    cfg = config_from_dict(cfg_dict)
    d = cfg.data
    key = repr((d, cfg.seed))
    if key not in data_cache:
        data_cache.clear()
        # As ssam_tune.training.trainer.load_data, plus the training-split label noise.
        data_cache[key] = load_dataset(d.name, root=d.root, download=d.download,
                                       val_fraction=d.val_fraction, seed=cfg.seed,
                                       augment=None if d.augment in (None, "none") else d.augment,
                                       label_noise=getattr(d, "label_noise", 0.0))
    start = time.perf_counter()
    trainer = Trainer(cfg, data=data_cache[key], device="cpu", log=print if verbose else None)
    history = list(trainer.epochs())
    final = dict(history[-1]) if history else {}
    final["wall_seconds"] = time.perf_counter() - start
    final["status"] = trainer.tracker["status"]
    return final


def measure(args) -> None:
    import torch

    torch.set_num_threads(args.threads)  # a Ray trial with resources {cpu: 1} gets one thread
    base = base_config(Path(args.space))
    overrides = {}
    for item in args.set:
        key, _, raw = item.partition("=")
        overrides[key.strip()] = yaml.safe_load(raw)
    path = Path(args.csv)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    cache: dict = {}
    host = f"{platform.node()} ({os.cpu_count()} cores)"
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, COLUMNS)
        if new:
            writer.writeheader()
        for seed in _seeds(args.seeds):
            for name in args.methods.split(","):
                cfg = copy.deepcopy(base)
                cfg["seed"] = seed
                for key, value in overrides.items():
                    _set(cfg, key, value)
                cfg["method"] = {**cfg.get("method", {}), **METHODS[name]}
                m = run_one(cfg, cache, args.verbose)
                row = {"setting": args.setting, "method": name, "seed": seed,
                       "overrides": " ".join(args.set), "threads": args.threads,
                       "date": datetime.date.today().isoformat(), "host": host}
                row |= {k: m.get(k) for k in COLUMNS if k in m}
                writer.writerow(row)
                fh.flush()
                print(f"{args.setting} {name:9s} seed {seed}: val {m['val_acc']:.4f} test {m['test_acc']:.4f} "
                      f"train {m['train_acc']:.3f} {m['wall_seconds']:.1f} s ({m['status']})", flush=True)


def _ms(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{100 * mean:.1f} ± {100 * sd:.1f}"


def summarize(path: Path, settings: list[str] | None = None) -> str:
    """A Markdown table: per setting and method, accuracies (mean ± sd over seeds, %), the
    paired difference to SGD (mean ± standard error, %; wins = seeds where the method is
    strictly better than SGD), and the mean seconds per run."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    by: dict = {}
    for r in rows:
        by.setdefault(r["setting"], {}).setdefault(r["method"], {})[int(r["seed"])] = r
    lines = ["| setting | method | seeds | val acc % | test acc % | val - SGD % (wins) | "
             "test - SGD % (wins) | s/run |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for setting, methods in by.items():
        if settings and setting not in settings:
            continue
        sgd = methods.get("sgd", {})
        for name, per_seed in methods.items():
            seeds = sorted(per_seed)
            val = [float(per_seed[s]["val_acc"]) for s in seeds]
            test = [float(per_seed[s]["test_acc"]) for s in seeds]
            secs = statistics.fmean(float(per_seed[s]["wall_seconds"]) for s in seeds)
            cells = []
            for metric in ("val_acc", "test_acc"):
                paired = [float(per_seed[s][metric]) - float(sgd[s][metric]) for s in seeds if s in sgd]
                if name == "sgd" or not paired:
                    cells.append("-")
                    continue
                mean = statistics.fmean(paired)
                se = statistics.stdev(paired) / math.sqrt(len(paired)) if len(paired) > 1 else float("nan")
                wins = sum(p > 0 for p in paired)
                cells.append(f"{100 * mean:+.1f} ± {100 * se:.1f} ({wins}/{len(paired)})")
            lines.append(f"| {setting} | {name} | {len(seeds)} | {_ms(val)} | {_ms(test)} | {cells[0]} | "
                         f"{cells[1]} | {secs:.1f} |")
    return "\n".join(lines)


# -- the real search, several sampler seeds --------------------------------------------------------
SEARCH_COLUMNS = ["tune_seed", "name", "wall_seconds", "exit_code", "trials", "completed", "pruned", "other",
                  "front_size", "front_completed", "front_labels", "front_val_acc", "front_test_acc",
                  "front_flops_rel", "sgd_val_acc", "sgd_test_acc", "load_before", "date", "host"]


def _read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def front_summary(export: Path) -> dict:
    """Counts of an exported search (trials.csv) and its front (pareto.csv, joined to the
    trials for their status), next to the SGD anchor's accuracies."""
    trials = _read_csv(export / "trials.csv")
    front = _read_csv(export / "pareto.csv")
    status = {r["trial_id"]: r.get("status") for r in trials}
    sgd = next((r for r in trials if r.get("label") == "sgd"), {})
    counts = list(status.values())

    def col(key: str) -> str:
        return ";".join(str(r.get(key, "")) for r in front)

    return {"trials": len(trials), "completed": counts.count("completed"), "pruned": counts.count("pruned"),
            "other": len(counts) - counts.count("completed") - counts.count("pruned"),
            "front_size": len(front),
            "front_completed": sum(status.get(r["trial_id"]) == "completed" for r in front),
            "front_labels": col("label"), "front_val_acc": col("val_acc"), "front_test_acc": col("test_acc"),
            "front_flops_rel": col("flops_rel"), "sgd_val_acc": sgd.get("val_acc"),
            "sgd_test_acc": sgd.get("test_acc")}


def rescan(args) -> None:
    """Recompute the front columns of --search-csv from the exports (keeps the wall times)."""
    path = Path(args.search_csv)
    rows = _read_csv(path)
    for row in rows:
        row |= front_summary(Path(args.results) / row["name"])
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, SEARCH_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def run_searches(args) -> None:
    """``python -m ssam_tune.run`` once per sampler seed (a copy of the space with tune.seed
    changed), each with its wall time, then the exported front against the SGD anchor."""
    import subprocess

    space = yaml.safe_load(Path(args.space).read_text())
    results, storage = Path(args.results), Path(args.storage)
    out = Path(args.search_csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    new = not out.exists()
    host = f"{platform.node()} ({os.cpu_count()} cores)"
    with open(out, "a", newline="") as fh:
        writer = csv.DictWriter(fh, SEARCH_COLUMNS)
        if new:
            writer.writeheader()
        for seed in _seeds(args.tune_seeds):
            name = f"{args.prefix}{seed}"
            copy_ = copy.deepcopy(space)
            copy_["tune"]["seed"] = seed
            tmp = results / f"{name}.yaml"
            tmp.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(yaml.safe_dump(copy_, sort_keys=False))
            load = os.getloadavg()[0]
            start = time.perf_counter()
            with open(results / f"{name}.log", "w") as log:
                code = subprocess.call([sys.executable, "-m", "ssam_tune.run", str(tmp), "--name", name,
                                        "--results", str(results), "--storage", str(storage)],
                                       stdout=log, stderr=subprocess.STDOUT, cwd=args.cwd)
            wall = time.perf_counter() - start
            row = {"tune_seed": seed, "name": name, "wall_seconds": round(wall, 1), "exit_code": code,
                   "load_before": round(load, 2), "date": datetime.datetime.now().isoformat(timespec="seconds"),
                   "host": host} | front_summary(results / name)
            writer.writerow(row)
            fh.flush()
            print(f"{name}: {wall:.0f} s, exit {code}, front {row['front_completed']} completed "
                  f"({row['front_labels']}), val {row['front_val_acc']}, test {row['front_test_acc']}; "
                  f"SGD val {row['sgd_val_acc']} test {row['sgd_test_acc']}", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--space", default=str(SPACE), help="search space whose fixed part is the base config")
    p.add_argument("--setting", default="base", help="a name for this setting (a CSV column)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a training key, e.g. data.label_noise=0.2 (repeatable)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--seeds", default="0-4", help="e.g. 0-4 or 0,2,5")
    p.add_argument("--threads", type=int, default=1, help="torch threads (a Ray trial with cpu: 1 has 1)")
    p.add_argument("--csv", default=str(ROOT / "results" / "quickstart_seeds" / "methods_raw.csv"))
    p.add_argument("--verbose", action="store_true", help="print every epoch")
    p.add_argument("--summary", action="store_true", help="only print the table of the CSV")
    p.add_argument("--only", action="append", default=None, metavar="SETTING", help="with --summary")
    p.add_argument("--searches", action="store_true",
                   help="run the search of --space once per --tune-seeds instead (Ray; a few minutes each)")
    p.add_argument("--rescan", action="store_true", help="recompute --search-csv's front columns from the exports")
    p.add_argument("--tune-seeds", default="0-4")
    p.add_argument("--prefix", default="qs-seed", help="experiment name prefix (then the tune seed)")
    p.add_argument("--results", default="/tmp/qsres", help="export folder of the searches (--results)")
    p.add_argument("--storage", default="/tmp/qsres/ray", help="Ray storage of the searches")
    p.add_argument("--cwd", default=str(ROOT), help="working directory of the searches (its ssam_tune "
                   "package is the one imported: python -m puts it first on sys.path)")
    p.add_argument("--search-csv", default=str(ROOT / "results" / "quickstart_seeds" / "searches_raw.csv"))
    args = p.parse_args(argv)
    if args.searches:
        run_searches(args)
        return
    if args.rescan:
        rescan(args)
        return
    if args.summary:
        print(summarize(Path(args.csv), args.only))
        return
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    measure(args)


if __name__ == "__main__":
    main()
