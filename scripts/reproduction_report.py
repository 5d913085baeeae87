"""Tables and plot of the reduced-scale reproduction (results/reproduction/).

Reads the exported trial tables of the two experiments run with the suite itself:

    python scripts/reproduction_report.py --rho results/reproduce_small_rho \
        --main results/reproduce_small --out results/reproduction

and writes ``table.md`` (test accuracy at the final epoch, mean +- sample std over seeds;
paired differences against SAM and against SGD (``--refs``: other cases too) with 95%
t-intervals; FLOPs relative to SGD; the perturbed fraction of weights; seconds per epoch),
``rho_search.md``, ``accuracy_vs_flops.png`` (test accuracy against theoretical and against
executed FLOPs) and copies of both ``trials.csv`` files. Selection (rho) uses validation
accuracy only; test accuracy is only reported. The structured-sparsity check
(results/structured/) is the same report:

    python scripts/reproduction_report.py --rho results/reproduce_structured_rho \
        --main results/reproduce_structured --out results/structured --refs sam,sgd,ssam_f50

``--main`` takes several experiments (comma-separated folders, or their trials.csv files),
so new cases are paired with the runs of an earlier report (the same seeds and protocol);
``--cases`` keeps only the named cases, ``--rho`` may be left out, and only the first
experiment's trials.csv is copied (the others are in their own reports):

    python scripts/reproduction_report.py --main results/reproduce_schedules,results/structured/trials_main.csv \
        --cases sgd,sam,ssam_f50,sam_k2,sam_k4,sam_from50,ssam_f50_k2,ssam_f50_k4,ssam_f50_from50 \
        --refs sam,sgd,ssam_f50 --out results/schedules
"""

from __future__ import annotations

import argparse
import csv
import math
import shutil
import statistics
from pathlib import Path

# two-sided 95% Student t quantiles, by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def group(label: str) -> str:
    return label.split("/seed")[0]


def seed_of(row: dict) -> int:
    return int(row["seed"])


def interval(diffs: list[float]) -> str:
    n = len(diffs)
    if n < 2:
        return "n/a"
    mean = statistics.mean(diffs)
    half = T95.get(n - 1, 1.96) * statistics.stdev(diffs) / math.sqrt(n)
    return f"{100 * mean:+.2f} [{100 * (mean - half):+.2f}, {100 * (mean + half):+.2f}]"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rho", default=None)
    p.add_argument("--main", required=True, help="comma-separated experiment folders or trials.csv files")
    p.add_argument("--cases", default=None, help="only these cases (comma-separated), in this order")
    p.add_argument("--out", required=True)
    p.add_argument("--refs", default="sam,sgd", help="cases to pair every case against (comma-separated)")
    args = p.parse_args()
    refs = args.refs.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tables = [Path(m) if m.endswith(".csv") else Path(m) / "trials.csv" for m in args.main.split(",")]
    shutil.copyfile(tables[0], out / "trials_main.csv")
    if args.rho:
        shutil.copyfile(Path(args.rho) / "trials.csv", out / "trials_rho_search.csv")
        lines = ["| case | rho | val acc (final epoch) | test acc (reported only) |", "|---|---|---|---|"]
        for r in sorted(rows(Path(args.rho) / "trials.csv"), key=lambda r: r["label"]):
            lines.append(f"| {group(r['label'])} | {float(r['method.rho']):g} | {100 * float(r['val_acc']):.2f} | "
                         f"{100 * float(r['test_acc']):.2f} |")
        (out / "rho_search.md").write_text("\n".join(lines) + "\n")

    trials = [r for table in tables for r in rows(table) if r["status"] == "completed"]
    by_case: dict[str, dict[int, dict]] = {}
    for r in trials:
        by_case.setdefault(group(r["label"]), {})[seed_of(r)] = r
    if args.cases:
        by_case = {case: by_case[case] for case in args.cases.split(",")}
    sgd_flops = statistics.mean(float(r["flops_theoretical"]) for r in by_case["sgd"].values())
    header = ("| case | n | test acc % (mean +- std) | "
              + " | ".join(f"vs {ref}: diff [95% CI]" for ref in refs)
              + " | perturbed fraction | FLOPs theoretical (x SGD) | FLOPs executed (x SGD) | mask FLOPs (x SGD) "
              "| s / epoch |")
    table = [header, "|" + "---|" * (8 + len(refs))]
    points = []
    for case, seeds in by_case.items():
        accs = [float(seeds[s]["test_acc"]) for s in sorted(seeds)]
        vs = {}
        for ref in refs:
            common = sorted(set(seeds) & set(by_case.get(ref, {})))
            diffs = [float(seeds[s]["test_acc"]) - float(by_case[ref][s]["test_acc"]) for s in common]
            vs[ref] = "-" if case == ref else interval(diffs)
        theo = statistics.mean(float(r["flops_theoretical"]) for r in seeds.values()) / sgd_flops
        exe = statistics.mean(float(r["flops_executed"]) for r in seeds.values()) / sgd_flops
        mask = statistics.mean(float(r["flops_mask"] or 0) for r in seeds.values()) / sgd_flops
        sec = statistics.mean(float(r["train_seconds"]) / int(r["epochs_reached"]) for r in seeds.values())
        std = statistics.stdev(accs) if len(accs) > 1 else float("nan")
        density = statistics.mean(float(r["mask_density"] or 1) for r in seeds.values())
        table.append(f"| {case} | {len(accs)} | {100 * statistics.mean(accs):.2f} +- {100 * std:.2f} | "
                     + " | ".join(vs[ref] for ref in refs)
                     + f" | {density:.3g} | {theo:.3f} | {exe:.3f} | {mask:.3f} | {sec:.1f} |")
        points.append((case, theo, exe, 100 * statistics.mean(accs), 100 * std))
    (out / "table.md").write_text("\n".join(table) + "\n")

    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    del matplotlib
    fig = Figure(figsize=(12, 4.5))
    FigureCanvasAgg(fig)
    for k, kind in enumerate(("theoretical", "executed")):
        ax = fig.add_subplot(1, 2, k + 1)
        placed: list[tuple[float, float]] = []
        span = max(p[1 if kind == "theoretical" else 2] for p in points) - 1.0 or 1.0
        for case, theo, exe, y, e in sorted(points, key=lambda p: -p[3]):
            x = theo if kind == "theoretical" else exe
            ax.errorbar([x], [y], yerr=[0 if math.isnan(e) else e], fmt="o", capsize=4, label=case)
            # a label near an earlier one (close in x and y) goes one line lower, so none overlap
            near = sum(-0.05 * span < x - px < 0.25 * span and abs(y - py) < 0.6 for px, py in placed)
            placed.append((x, y))
            ax.annotate(case, (x, y), textcoords="offset points", xytext=(6, 4 - 11 * near), fontsize=8)
        ax.set_xlabel(f"{kind} training FLOPs, multiple of SGD's (mask costs included)")
        ax.set_ylabel("test accuracy, final epoch (%): mean +- std")
        ax.grid(alpha=0.3)
    fig.suptitle("Reduced-scale CIFAR-10 (ResNet-18 x0.25, 5k images, 10 epochs; seeds paired)")
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(out / "accuracy_vs_flops.png", dpi=120)
    print((out / "table.md").read_text())


if __name__ == "__main__":
    main()
