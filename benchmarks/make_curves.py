"""Real learning curves: train a grid of configurations and record every epoch.

The table this writes is the ground truth of ``bench_replay.py``: a search replayed against it
costs seconds, and the front it finds is judged on what these runs measured, not on a model of
learning curves. One CSV per setting under ``benchmarks/curves/`` (the format is in
``benchmarks/curves/README.md``); each finished run appends its rows at once, so the script
resumes where it stopped: run the same command again and it trains only the (config, seed)
pairs the table lacks. A run cut short leaves nothing and is trained again.

    .venv/bin/python benchmarks/make_curves.py label_noise --jobs 2            # the full grid
    .venv/bin/python benchmarks/make_curves.py label_noise --limit 4 --out /tmp/t.csv  # a try
    .venv/bin/python benchmarks/make_curves.py cifar10 --data-root /tmp/cifar10 --jobs 2

Settings (``SETTINGS``): ``label_noise`` is the quickstart's (VGG-11-BN width 0.125, 2,048
embedded CIFAR-10 images, 30% of the training labels flipped, 12 epochs); ``cifar10`` trains
on clean real CIFAR-10 (``../shared/data/cifar10-jpeg.tar.gz`` extracted, image-folder layout).
Both grids (``GRIDS``) cover every method and the searched keys, product grids per method
family, so that a sampled value snaps to one grid point per key (``bench_replay.py``).

Each job is one process with ``--threads`` torch threads (1 by default, so ``--jobs 2`` fills
a 2-core machine the way two concurrent trials of a search do); the wall seconds in the table
are measured under that load and say so in the datasheet.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import fcntl
import itertools
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

HERE = Path(__file__).resolve().parent
CURVES = HERE / "curves"

# -- the settings --------------------------------------------------------------------------------
# The fixed part of each setting's training config (ssam_tune's YAML sections).
SETTINGS: dict[str, dict] = {
    # search_spaces/quickstart.yaml's training set-up, where SAM-family methods resist the
    # flipped labels SGD memorises (results/quickstart_seeds/).
    "label_noise": {
        "model": {"name": "vgg11_bn", "width": 0.125},
        "data": {"name": "embedded", "train_size": 2048, "val_fraction": 0.2, "augment": "none",
                 "label_noise": 0.3},
        "train": {"epochs": 12, "batch_size": 64, "lr": 0.05, "weight_decay": 1.0e-3, "device": "cpu"},
    },
    # Clean real CIFAR-10 at CPU scale: a 5,000-image class-balanced subset of the training
    # part (5,000 validation images carved from the rest), ResNet-18 width 0.125, standard
    # augmentation, 10 epochs: about 2 minutes a run on one core.
    "cifar10": {
        "model": {"name": "resnet18", "width": 0.125},
        "data": {"name": "imagefolder", "root": None, "train_size": 5000, "val_fraction": 0.1,
                 "augment": "cifar"},
        "train": {"epochs": 10, "batch_size": 128, "lr": 0.05, "weight_decay": 5.0e-4, "device": "cpu",
                  "test_every": 1},
    },
}

# -- the grids -------------------------------------------------------------------------------------
# Per method family, the values of each searched key; a family's configs are the product of its
# lists. Keys a family leaves out keep the Trainer's defaults (N_F 128, T_m 1, alpha 0.5).
RHO = [0.02, 0.05, 0.1, 0.2]
SPARSITY = [0.5, 0.75, 0.9, 0.98]
GRIDS: dict[str, list[dict]] = {
    "label_noise": [
        {"method.name": ["sgd"]},
        {"method.name": ["sam"], "method.rho": RHO},
        # SAM-ON normalises e over the normalization layers only, so it needs a larger radius
        # (Mueller et al. 2023 use rho up to 1 and beyond for SAM-ON).
        {"method.name": ["sam_on"], "method.rho": [0.05, 0.2, 0.5, 1.0]},
        {"method.name": ["ssam_random"], "method.rho": RHO, "method.sparsity": SPARSITY},
        {"method.name": ["ssam_d"], "method.rho": RHO, "method.sparsity": SPARSITY,
         "method.alpha": [0.2, 0.5, 0.8]},
        {"method.name": ["ssam_f"], "method.granularity": ["element"], "method.rho": RHO,
         "method.sparsity": SPARSITY, "method.N_F": [16, 128], "method.T_m": [1, 5]},
        {"method.name": ["ssam_f"], "method.granularity": ["tensor"], "method.rho": RHO,
         "method.sparsity": SPARSITY},
    ],
}
# Clean CIFAR-10 costs about 2 minutes a run on one core, 8x the label-noise setting, so its
# grid keeps every method and searched key at two values each (26 configs): about half an
# hour of 2-core time per seed.
GRIDS["cifar10"] = [
    {"method.name": ["sgd"]},
    {"method.name": ["sam"], "method.rho": [0.05, 0.1, 0.2]},
    {"method.name": ["sam_on"], "method.rho": [0.2, 1.0]},
    {"method.name": ["ssam_random"], "method.rho": [0.05, 0.1], "method.sparsity": [0.5, 0.9]},
    {"method.name": ["ssam_d"], "method.rho": [0.05, 0.1], "method.sparsity": [0.5, 0.9], "method.alpha": [0.5]},
    {"method.name": ["ssam_f"], "method.granularity": ["element"], "method.rho": [0.05, 0.1],
     "method.sparsity": [0.5, 0.9], "method.N_F": [128], "method.T_m": [1, 5]},
    {"method.name": ["ssam_f"], "method.granularity": ["tensor"], "method.rho": [0.05, 0.1],
     "method.sparsity": [0.5, 0.9]},
]
SEEDS = (0, 1, 2)

# The searched keys, in the table's column order; a config's id names the ones it sets.
KEYS = ("method.name", "method.granularity", "method.rho", "method.sparsity", "method.N_F", "method.T_m",
        "method.alpha")
METRICS = ("val_acc", "val_loss", "test_acc", "test_loss", "train_acc", "train_loss", "flops_theoretical",
           "flops_executed", "flops_mask", "epoch_seconds", "train_seconds")
# load1: the machine's 1-minute load average when the run ended (its wall seconds are only
# comparable between runs under similar load)
COLUMNS = ("config", "seed", "epoch", "epochs", "status", *(k.split(".")[1] for k in KEYS), *METRICS, "load1")


def grid(setting: str) -> list[dict]:
    """Every configuration of a setting's grid, as dotted params, in a fixed order."""
    out = []
    for family in GRIDS[setting]:
        keys = list(family)
        for values in itertools.product(*(family[k] for k in keys)):
            out.append(dict(zip(keys, values, strict=True)))
    return out


def config_id(params: dict) -> str:
    """A config's name in the table: the method, then ``key=value`` for each key it sets."""
    parts = [params["method.name"]]
    parts += [f"{k.split('.')[1]}={params[k]}" for k in KEYS[1:] if k in params]
    return "/".join(parts)


# -- one run -----------------------------------------------------------------------------------------
_DATA: dict = {}  # (setting, seed) -> Data, per worker process (decoding 60,000 JPEGs takes a while)


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def run_one(setting: str, params: dict, seed: int, data_root: str | None, out: str | None = None) -> list[dict]:
    """Train one config with one seed; one row per epoch (a diverged run stops early). Nothing
    (an empty list) when the table ``out`` holds the run already: another process sharing the
    table (``--reverse``) trained it since this one started."""
    if out is not None and (config_id(params), seed) in done_runs(Path(out)):
        return []
    from ssam_tune.training.config import config_from_dict
    from ssam_tune.training.trainer import Trainer, load_data
    from ssam_tune.tuning.space import resolve_config

    base = {"seed": seed, **{k: dict(v) for k, v in SETTINGS[setting].items()}}
    if base["data"].get("root", "") is None:
        base["data"]["root"] = data_root
    cfg = config_from_dict(resolve_config(base, params))
    key = (setting, seed)
    if key not in _DATA:
        _DATA.clear()  # one data set per process at a time
        _DATA[key] = load_data(cfg)
    rows = []
    ident = config_id(params)
    # Every metrics dict the Trainer yields is a row: a diverged run ends with its last good
    # epoch repeated with status "diverged" (epoch 0 and no metrics if epoch 1 diverged).
    for m in Trainer(cfg, data=_DATA[key], device="cpu").epochs():
        row = {"config": ident, "seed": seed, "epoch": m["epoch"], "epochs": cfg.train.epochs,
               "status": m["status"]}
        row.update({k.split(".")[1]: params.get(k, "") for k in KEYS})
        row.update({k: m.get(k, "") for k in METRICS})
        rows.append(row)
    load1 = round(os.getloadavg()[0], 2)
    for row in rows:
        row["load1"] = load1
    return rows


# -- the table -------------------------------------------------------------------------------------
def done_runs(path: Path) -> set[tuple[str, int]]:
    """The (config, seed) pairs whose rows the table holds."""
    if not path.exists():
        return set()
    with open(path, newline="") as f:
        return {(r["config"], int(r["seed"])) for r in csv.DictReader(f)}


def append_rows(path: Path, rows: list[dict]) -> bool:
    """Append one run's rows in one write, under a lock, flushed to disk (a kill between runs
    loses nothing; the header is written with the first run). False, and nothing written, if
    the table holds that run already (two processes finished the same run)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", newline="") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            if (rows[0]["config"], int(rows[0]["seed"])) in done_runs(path):
                return False
            writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
            if f.tell() == 0:
                writer.writeheader()
            for row in rows:
                writer.writerow({k: _fmt(v) for k, v in row.items()})
            f.flush()
            os.fsync(f.fileno())
            return True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _fmt(value):
    if isinstance(value, float):
        return "" if value != value else f"{value:.6g}"  # NaN (test skipped) -> empty
    return value


def log_sitting(path: Path, **fields) -> None:
    """One line per sitting in ``<table>.sittings.csv``: when, where, how many runs, how long.
    A sitting's line (its ``started_utc`` and ``pid``) is rewritten after every finished run,
    so a sitting that is killed leaves its line as of its last run; processes sharing the
    table (``--reverse``) each keep their own line (the file is rewritten under a lock)."""
    log = path.with_suffix(".sittings.csv")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = []
        if log.exists():
            with open(log, newline="") as f:
                rows = list(csv.DictReader(f))
        mine = [i for i, r in enumerate(rows) if (r.get("started_utc"), r.get("pid")) ==
                (str(fields["started_utc"]), str(fields["pid"]))]
        if mine:
            rows[mine[0]] = fields
        else:
            rows.append(fields)
        tmp = log.with_suffix(".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(fields), lineterminator="\n")
            writer.writeheader()
            writer.writerows({k: r.get(k, "") for k in fields} for r in rows)
        os.replace(tmp, log)


# -- the datasheet -------------------------------------------------------------------------------
def datasheet(settings: list[str]) -> str:
    """``benchmarks/curves/DATASHEET.md``: for each table, how it was made (the command, the
    machine, the sittings and their time) and what it holds (per method family: runs,
    diverged runs, final validation accuracy of the best config, its cost)."""
    import statistics

    lines = ["# Datasheet of the learning-curve tables", "",
             "Written by `benchmarks/make_curves.py --datasheet` from the tables and their sittings logs; "
             "the format is in `README.md`.", ""]
    for setting in settings:
        path = CURVES / f"{setting}.csv"
        if not path.exists():
            continue
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        runs: dict[tuple[str, int], list[dict]] = {}
        for r in rows:
            runs.setdefault((r["config"], int(r["seed"])), []).append(r)
        configs = sorted({c for c, _ in runs})
        seeds = sorted({s for _, s in runs})
        expected = len(grid(setting)) * len(SEEDS)
        fixed = SETTINGS[setting]
        lines += [f"## `{setting}.csv`", "",
                  f"- **Setting**: model {fixed['model']}, data {fixed['data']}, training {fixed['train']}; the "
                  "other keys at ssam_tune's defaults (SGD momentum 0.9, cosine learning rate, BatchNorm statistics "
                  "updated in the second pass).",
                  f"- **Grid**: {len(grid(setting))} configs (`GRIDS['{setting}']` in make_curves.py) x seeds "
                  f"{list(SEEDS)}; the table holds {len(runs)} of {expected} runs ({len(configs)} configs, seeds "
                  f"{seeds}), {len(rows)} rows, {path.stat().st_size / 1e6:.2f} MB.",
                  f"- **Command**: `.venv/bin/python benchmarks/make_curves.py {setting} --jobs 2"
                  + (" --data-root DIR`, DIR holding `../shared/data/cifar10-jpeg.tar.gz` extracted"
                     if fixed["data"].get("root", "") is None else "`") +
                  " (run again to resume or extend: it trains only the runs the table lacks; `--seeds` splits the "
                  "work between processes).",
                  ]
        log = path.with_suffix(".sittings.csv")
        if log.exists():
            with open(log, newline="") as f:
                sittings = list(csv.DictReader(f))
            total = sum(float(x["wall_seconds"]) for x in sittings)
            lines.append(f"- **Sittings** ({len(sittings)}; {total / 3600:.2f} h of wall time in all):")
            for x in sittings:
                lines.append(f"  - {x['started_utc']} UTC: {x['runs']} runs in {float(x['wall_seconds']) / 60:.1f} "
                             f"min, {x['jobs']} jobs x {x['threads']} torch threads, host {x['host']} "
                             f"({x['cpus']} CPUs), Python {x['python']}; `{x['argv']}`")
        loads = [float(r["load1"]) for r in rows if r.get("load1")]
        if loads:
            lines.append(f"- **Load**: 1-minute load average at the end of a run: median "
                         f"{statistics.median(loads):.1f}, max {max(loads):.1f} (2 jobs keep it near 2; more means "
                         "other work ran too).")
        lines += ["", "Per method family (final epoch; a config's value is its mean over seeds):", "",
                  "| family | configs | runs | diverged | best config | its val_acc | its test_acc | "
                  "theoretical FLOPs x SGD | executed x SGD | train s (mean) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        final: dict[str, list[dict]] = {}
        for (cid, _), rs in runs.items():
            final.setdefault(cid, []).append(rs[-1])
        sgd = final.get("sgd")
        unit_t = statistics.fmean(float(r["flops_theoretical"]) for r in sgd) if sgd else float("nan")
        unit_e = statistics.fmean(float(r["flops_executed"]) for r in sgd) if sgd else float("nan")
        families: dict[str, list[str]] = {}
        for cid in final:
            fam = cid.split("/")[0] + (" tensor" if "granularity=tensor" in cid else
                                       " element" if "granularity=element" in cid else "")
            families.setdefault(fam, []).append(cid)
        def mean(cid, key, final=final):
            vals = [float(r[key]) for r in final[cid] if r["status"] == "completed" and r[key] != ""]
            return statistics.fmean(vals) if vals else float("nan")

        for fam, cids in sorted(families.items()):
            best = max(cids, key=lambda c: mean(c, "val_acc"))
            n_runs = sum(len(final[c]) for c in cids)
            diverged = sum(r["status"] != "completed" for c in cids for r in final[c])
            secs = [float(r["train_seconds"]) for c in cids for r in final[c] if r["status"] == "completed"]
            lines.append(f"| {fam} | {len(cids)} | {n_runs} | {diverged} | `{best}` | {mean(best, 'val_acc'):.4f} | "
                         f"{mean(best, 'test_acc'):.4f} | {mean(best, 'flops_theoretical') / unit_t:.2f} | "
                         f"{mean(best, 'flops_executed') / unit_e:.2f} | "
                         f"{statistics.fmean(secs) if secs else float('nan'):.1f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("setting", choices=sorted(SETTINGS) + ["datasheet"],
                    help="the setting to train, or 'datasheet' to write curves/DATASHEET.md from the tables")
    ap.add_argument("--out", type=Path, help="the table (default benchmarks/curves/<setting>.csv)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (processes)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    ap.add_argument("--limit", type=int, help="train at most this many missing runs, then stop")
    ap.add_argument("--data-root", help="the image folder of the cifar10 setting (train/, test/)")
    ap.add_argument("--reverse", action="store_true", help="the grid's configs in reverse order within each seed: "
                    "a second process on the same table meets the first in the middle (each skips what the table "
                    "holds when it comes to a run)")
    args = ap.parse_args(argv)
    if args.setting == "datasheet":
        (CURVES / "DATASHEET.md").write_text(datasheet(sorted(SETTINGS)))
        print(f"written {CURVES / 'DATASHEET.md'}")
        return 0
    out = args.out or CURVES / f"{args.setting}.csv"
    if SETTINGS[args.setting]["data"].get("root", "") is None and not args.data_root:
        ap.error(f"{args.setting} needs --data-root: extract ../shared/data/cifar10-jpeg.tar.gz "
                 "(tar xzf ... -C DIR) and pass DIR/ (the folder holding train/ and test/)")
    done = done_runs(out)
    order = grid(args.setting)[::-1] if args.reverse else grid(args.setting)
    todo = [(p, s) for s in args.seeds for p in order if (config_id(p), s) not in done]
    if args.limit is not None:
        todo = todo[:args.limit]
    total = len(grid(args.setting)) * len(args.seeds)
    print(f"{args.setting}: {len(grid(args.setting))} configs x {len(args.seeds)} seeds = {total} runs; "
          f"{total - len(todo) if args.limit is None else len(done)} in {out}, training {len(todo)} "
          f"({args.jobs} jobs x {args.threads} threads)", flush=True)
    start, finished = time.time(), 0
    started_at = datetime.datetime.now(datetime.timezone.utc)

    def sitting() -> None:
        log_sitting(out, started_utc=f"{started_at:%Y-%m-%d %H:%M}", pid=os.getpid(),
                    wall_seconds=round(time.time() - start), runs=finished, jobs=args.jobs, threads=args.threads,
                    host=platform.node(), cpus=os.cpu_count(), python=platform.python_version(),
                    argv=" ".join(sys.argv[1:]))

    sitting()
    with ProcessPoolExecutor(args.jobs, initializer=_init_worker, initargs=(args.threads,)) as pool:
        futures = {pool.submit(run_one, args.setting, p, s, args.data_root, str(out)): (p, s) for p, s in todo}
        for fut in as_completed(futures):
            params, seed = futures[fut]
            rows = fut.result()
            if not rows or not append_rows(out, rows):  # another process trained it
                continue
            finished += 1
            sitting()
            last = rows[-1]
            print(f"[{finished}/{len(todo)} {time.time() - start:6.0f}s] {config_id(params)} seed {seed}: "
                  f"val {last['val_acc']:.4f} test {last['test_acc']:.4f} {last['status']} "
                  f"{last['train_seconds']:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
