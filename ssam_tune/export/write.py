"""Formatting and writing: CSV text and its cells, Markdown tables, the trial CSV's columns,
the runnable YAML config with its header, and the short number formats (``fmt_pct``, ``fmt_sci``).
"""

from __future__ import annotations

import csv
import io
import math
import re
from typing import Any

from ssam_tune.export.read import finite_number


def safe_name(label: str) -> str:
    """A label usable in a file name: ``case/seed1`` -> ``case_seed1``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("._") or "trial"


def _fmt_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ""
    return str(value)


def csv_text(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_fmt_cell(row.get(c)) for c in columns])
    return buf.getvalue()


def trial_columns(rows: list[dict], cost_metric: str) -> list[str]:
    head = ["trial_id", "label", "kind", "anchor", "status", "on_front", "dominated", "epochs_reached", "epochs",
            "val_acc", "test_acc", cost_metric, "flops_rel", "best_epoch", "best_val_acc", "test_acc_at_best",
            "flops_theoretical", "flops_executed", "flops_mask", "train_seconds", "time_total_s",
            "optuna_number", "optuna_status", "failures", "error"]
    head = list(dict.fromkeys(head))
    rest = [k for row in rows for k in row if not k.startswith("_")]
    metrics = [k for k in dict.fromkeys(rest) if k not in head and "." not in k and k != "seed"
               and k not in ("date_first", "date_last", "hostname")]
    config = [k for k in dict.fromkeys(rest) if k not in head and ("." in k or k == "seed")]
    return head + metrics + ["date_first", "date_last", "hostname"] + config


def yaml_config(row: dict, exp_name: str, cost_metric: str, why: str) -> str:
    """A training-config YAML with a comment header naming the trial it came from."""
    import yaml

    rel = f" ({row['flops_rel']:.2f}x SGD)" if row.get("flops_rel") else ""
    cost = row.get(cost_metric)
    header = [
        f"# {why}",
        (f"# From experiment {exp_name}, trial {row['trial_id']} ({row['label']}, method {row.get('method.name')}), "
         f"{row['epochs_reached']}/{row['epochs']} epochs."),
        (f"# val_acc {fmt_pct(row.get('val_acc'))}, test_acc {fmt_pct(row.get('test_acc'))} (final epoch); "
         f"{cost_metric} {fmt_sci(cost)}{rel}."),
        "# Selected on validation accuracy; the test accuracy is only reported.",
        "# Run it: python -m ssam_tune.train THIS_FILE",
    ]
    from ssam_tune.training.config import applying_config

    return "\n".join(header) + "\n" + yaml.safe_dump(applying_config(row["_config"]), sort_keys=False)


def fmt_pct(value: Any) -> str:
    return "n/a" if finite_number(value) is None else f"{100 * value:.2f}%"


def fmt_sci(value: Any) -> str:
    return "n/a" if finite_number(value) is None else f"{value:.4g}"


def cost_words(flops_kind: str) -> tuple[str, str]:
    """(description, unit) of a cost column."""
    if flops_kind == "wall":
        return "training wall time", "s"
    return f"{flops_kind} training FLOPs", "FLOPs"


def md_table(header: list[str], body: list[list[Any]]) -> list[str]:
    def cell(v):
        return _fmt_cell(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in body]
    return lines
