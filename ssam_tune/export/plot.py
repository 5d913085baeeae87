"""The accuracy-versus-cost picture, ``pareto.png`` (matplotlib, imported when drawing)."""

from __future__ import annotations

import io
import os
from pathlib import Path

from ssam_tune.export.read import BASELINE_ORDER, STATUSES
from ssam_tune.export.write import cost_words
from ssam_tune.storage.files import atomic_write


def plotted_cost(row: dict, cost_metric: str, sgd_cost: float | None) -> float | None:
    """Where a trial sits on the cost axis: its cost (a multiple of SGD's when ``sgd_cost`` is
    given); a pruned trial at the cost of its full run (what it spent, scaled from the epochs
    it reached to ``train.epochs``), which is what it would have cost to know its accuracy."""
    c = row.get(cost_metric)
    if c is not None and row["status"] == "pruned":
        reached, epochs = row.get("epochs_reached"), row.get("train.epochs")
        c = c * epochs / reached if reached and epochs else None
    return None if c is None else (c / sgd_cost if sgd_cost else c)


def plot_front(rows: list[dict], front: list[dict], path: str | os.PathLike, *, title: str,
               cost_metric: str = "flops_theoretical", flops_kind: str = "theoretical",
               sgd_cost: float | None = None) -> tuple[list[float], list[float]]:
    """Draw validation accuracy against cost to ``path`` (PNG) and return the (x, y) of the
    front as drawn (x: cost as a multiple of SGD's when ``sgd_cost`` is given, else the
    cost itself; y: val_acc), so callers can check them against pareto.csv.

    Completed trials are points (by method), the front a step line through exactly the
    ``front`` rows, the anchors (SGD 1x, SAM ~2x, the default SSAM) marked and named in the
    legend, and pruned trials faint crosses at their last accuracy, drawn at the cost their
    full run would have had (their cost so far scaled to ``train.epochs``, the cost MO-ASHA
    ranks them by), so a trial stopped early never looks cheaper than it is. Uses the Agg
    canvas directly: no pyplot, no global backend change.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    def xval(r):
        return plotted_cost(r, cost_metric, sgd_cost)

    fig = Figure(figsize=(11, 5.8), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    completed = [r for r in rows if r["status"] == "completed" and r.get("val_acc") is not None and xval(r) is not None]
    pruned = [r for r in rows if r["status"] == "pruned" and r.get("val_acc") is not None and xval(r) is not None]
    xs_all = [xval(r) for r in completed + pruned]
    methods = sorted({str(r.get("method.name")) for r in completed})
    palette = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
    colors = {m: palette[i % len(palette)] for i, m in enumerate(methods)}
    if pruned:
        ax.scatter([xval(r) for r in pruned], [r["val_acc"] for r in pruned], marker="x", s=22, color="0.6",
                   alpha=0.5, linewidths=1, label="pruned: accuracy when stopped, at its full run's cost", zorder=1)
    for m in methods:
        pts = [r for r in completed if str(r.get("method.name")) == m]
        ax.scatter([xval(r) for r in pts], [r["val_acc"] for r in pts], s=36, color=colors[m], alpha=0.8,
                   edgecolors="none", label=f"completed: {m}", zorder=2)
    front = sorted(front, key=xval)  # a step line runs left to right (stable: ties keep their order)
    fx = [xval(r) for r in front]
    fy = [r["val_acc"] for r in front]
    if front:
        ax.step(fx, fy, where="post", color="black", linewidth=1.6, zorder=3,
                label=f"Pareto front ({len(front)} completed trial{'s' if len(front) != 1 else ''})")
        ax.scatter(fx, fy, s=70, facecolors="none", edgecolors="black", linewidths=1.3, zorder=4)  # method shows
    # Labels: the front's first, then (few points) the dominated ones; a label whose point lies
    # close to a point already labelled, or to an anchor, goes to the other side, and a
    # dominated one that still collides is left out (the legend and trials.csv name it).
    xs_pts = [xval(r) for r in completed] or [0.0, 1.0]
    ys_pts = [r["val_acc"] for r in completed] or [0.0, 1.0]
    span = (max(xs_pts) - min(xs_pts) or 1.0, max(ys_pts) - min(ys_pts) or 1.0)
    anchors = [(xval(r), r["val_acc"]) for r in completed if r["kind"] == "baseline" and r["label"] in BASELINE_ORDER]
    placed: list[tuple[float, float, int]] = []  # (x, y, side) of the labels drawn

    def label(r, x, y, color, optional: bool) -> None:
        def near(px, py):
            return abs(px - x) / span[0] < 0.1 and abs(py - y) / span[1] < 0.05

        blocked = {side for px, py, side in placed if near(px, py)}
        if any(near(px, py) for px, py in anchors):
            blocked.add(0)  # the anchor's marker: write on the other side
        free = [side for side in (0, 1) if side not in blocked]
        if not free or (optional and blocked):
            return
        side = free[0]
        offset, align = ((5, -11), "left") if side == 0 else ((-7, 5), "right")
        ax.annotate(r["label"], (x, y), textcoords="offset points", xytext=offset, ha=align, fontsize=7, color=color)
        placed.append((x, y, side))

    for x, y, r in zip(fx, fy, front, strict=True):
        if not (r["kind"] == "baseline" and r["label"] in BASELINE_ORDER):  # anchors: the legend names them
            label(r, x, y, "0.15", optional=False)
    if len(completed) <= 15:  # few points: name the dominated ones too
        on_front = {id(r) for r in front}
        for r in completed:
            if id(r) not in on_front and not (r["kind"] == "baseline" and r["label"] in BASELINE_ORDER):
                label(r, xval(r), r["val_acc"], "0.5", optional=True)
    names = {"sgd": "SGD", "sam": "SAM", "ssam": "SSAM-F default"}
    marks = {"sgd": ("s", "black"), "sam": ("D", "black"), "ssam": ("^", "black")}
    for r in completed:
        if r["kind"] == "baseline" and r["label"] in names:
            shape, color = marks[r["label"]]
            x = xval(r)
            text = f"{names[r['label']]} ({x:.2f}x)" if sgd_cost else names[r["label"]]
            if sgd_cost and r["label"] == "sgd":
                text = "SGD (1x)"
            # named in the legend by its marker: labels next to anchors ran into each other
            ax.scatter([x], [r["val_acc"]], marker=shape, s=110, facecolors="none", edgecolors=color,
                       linewidths=2, zorder=5, label=f"anchor: {text}")
    what, unit = cost_words(flops_kind)
    if sgd_cost:
        ax.set_xlabel(f"{what}, multiple of SGD's (1x = {sgd_cost:.3g} {unit})")
    else:
        ax.set_xlabel(f"{what} ({unit})")
    if xs_all and min(xs_all) > 0 and max(xs_all) / min(xs_all) > 20:
        ax.set_xscale("log")
    ax.set_ylabel("validation accuracy, final epoch (%)")
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    ax.grid(True, alpha=0.3)
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    ax.set_title(f"{title}: validation accuracy vs {what}\n"
                 f"{counts['completed']} completed, {counts['pruned']} pruned, {counts['diverged']} diverged, "
                 f"{counts['errored']} errored; front over completed trials only", fontsize=10)
    if not completed:
        ax.text(0.5, 0.5, "no completed trials yet", transform=ax.transAxes, ha="center", va="center")
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False, markerscale=0.7)
    ax.margins(x=0.1, y=0.08)
    fig.subplots_adjust(left=0.08, right=0.69, top=0.88, bottom=0.11)  # the legend sits right of the axes
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    atomic_write(Path(path), buf.getvalue())
    return fx, fy
