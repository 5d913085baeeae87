"""A trainable that replays recorded learning curves instead of training, for ``bench_replay.py``.

The table is a CSV in the format of ``benchmarks/curves/README.md`` (one row per epoch of one
run of one config with one seed): the real curves ``make_curves.py`` trains, or the synthetic
model's (``_search_synthetic.write_table``). :func:`replay_trainable` stands in for
:func:`ssam_tune.tuning.trainable.train_trial`: it receives ``{"ssam_tune": bookkeeping,
"config": full training config}``, finds the table's config nearest to the sampled one
(:meth:`Table.snap`), picks one of its recorded seeds (fixed by the config's ``seed``, the
replay seed, and the config: paired across strategies) and reports that run's epochs as the
Trainer would have. It also reports ``true_final_acc``, the config's final validation accuracy
averaged over the table's seeds (the benchmark's ground truth; nothing in ssam_tune reads it).

The table path comes from the environment (:data:`TABLE_ENV`), which Ray's workers inherit from
the driver; workers import this module by name (``_search_common.fresh_ray_env``), so it
imports only the standard library at the top.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
from functools import lru_cache

TABLE_ENV = "SSAM_TUNE_REPLAY_TABLE"
# The searched keys the table's columns hold (make_curves.KEYS without the section), and how a
# distance between two values is measured when a sampled value is snapped to the table.
KEYS = ("rho", "sparsity", "N_F", "T_m", "alpha")
LOG_KEYS = ("rho", "N_F", "T_m")
DIVERGED_ACC = 0.1  # a diverged run is worth chance accuracy (10 classes) in the ground truth


def _num(text: str) -> float | None:
    return float(text) if text not in ("", None) else None


class Table:
    """The curves of one table: ``runs[config][seed]`` is that run's rows, by epoch."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.runs: dict[str, dict[int, list[dict]]] = {}
        self.params: dict[str, dict] = {}  # config -> {"name", "granularity", key: value or None}
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                cid = row["config"]
                self.runs.setdefault(cid, {}).setdefault(int(row["seed"]), []).append(row)
                if cid not in self.params:
                    self.params[cid] = {"name": row["name"], "granularity": row["granularity"] or None,
                                        **{k: _num(row[k]) for k in KEYS}}
        for seeds in self.runs.values():
            for rows in seeds.values():
                rows.sort(key=lambda r: int(r["epoch"]))
        self.epochs = max(int(r["epochs"]) for seeds in self.runs.values() for rows in seeds.values()
                          for r in rows)
        self.seeds = sorted({s for seeds in self.runs.values() for s in seeds})
        # the snapping ranges: per (method, granularity) family, each key's span of values
        values: dict[tuple[str, str | None, str], list[float]] = {}
        for p in self.params.values():
            for k in KEYS:
                if p[k] is not None:
                    values.setdefault((p["name"], p["granularity"], k), []).append(_t(k, p[k]))
        self._span = {fam: max(max(v) - min(v), 1e-12) for fam, v in values.items()}

    # -- the config a sampled one replays ------------------------------------------------------
    def snap(self, method: dict) -> str:
        """The table's config nearest to a sampled ``method`` section: the same method (and
        granularity, where the table has several), then the smallest sum over the keys the
        table's config sets of |difference| / the key's span in that family (log scale for
        rho, N_F and T_m). Ties go to the first in sorted order."""
        name = method["name"]
        family = [c for c, p in self.params.items() if p["name"] == name]
        if not family:
            raise ValueError(f"{self.path}: no runs of method {name!r}; the table has "
                             f"{sorted({p['name'] for p in self.params.values()})}")
        grains = {self.params[c]["granularity"] for c in family}
        if len(grains) > 1:
            family = [c for c in family if self.params[c]["granularity"] == method.get("granularity", "element")]

        def distance(cid: str) -> float:
            p = self.params[cid]
            return sum(abs(_t(k, float(method[k])) - _t(k, p[k])) / self._span[(p["name"], p["granularity"], k)]
                       for k in KEYS if p[k] is not None and method.get(k) is not None)

        return min(sorted(family), key=distance)

    def run_of(self, cid: str, replay_seed: int) -> list[dict]:
        """The recorded run a replay seed sees for a config: one of its seeds, fixed by
        (replay seed, config) so that every strategy meets the same draw."""
        seeds = sorted(self.runs[cid])
        digest = hashlib.sha256(f"{replay_seed}/{cid}".encode()).digest()
        return self.runs[cid][seeds[int.from_bytes(digest[:8], "little") % len(seeds)]]

    # -- the ground truth ---------------------------------------------------------------------
    def final(self, cid: str, metric: str = "val_acc") -> float:
        """A config's final ``metric`` averaged over its seeds; a diverged or short run counts as
        chance accuracy."""
        vals = []
        for rows in self.runs[cid].values():
            last = rows[-1]
            ok = last["status"] == "completed" and int(last["epoch"]) == int(last["epochs"])
            vals.append(float(last[metric]) if ok else DIVERGED_ACC)
        return sum(vals) / len(vals)

    def cost(self, cid: str, metric: str = "flops_theoretical") -> float:
        """A config's cost of a full run (mean over its completed seeds)."""
        vals = [float(rows[-1][metric]) for rows in self.runs[cid].values()
                if rows[-1]["status"] == "completed" and rows[-1][metric] != ""]
        if not vals:  # every seed diverged: the cost the epochs would have had
            rows = next(iter(self.runs[cid].values()))
            per = float(rows[-1][metric]) / max(int(rows[-1]["epoch"]), 1) if rows[-1][metric] else math.nan
            return per * self.epochs
        return sum(vals) / len(vals)


def _t(key: str, value: float) -> float:
    return math.log(value) if key in LOG_KEYS else value


@lru_cache(maxsize=2)
def load_table(path: str) -> Table:
    return Table(path)


def replay_trainable(config: dict) -> None:
    """Report a recorded run epoch by epoch, as ``train_trial`` reports a real one."""
    from ray import tune

    meta = config.get("ssam_tune", {})
    cfg = config["config"]
    table = load_table(os.environ[TABLE_ENV])
    cid = table.snap(cfg["method"])
    rows = table.run_of(cid, int(cfg["seed"]))
    truth = table.final(cid)
    best, best_epoch, test_at_best = -1.0, 0, None
    for r in rows:
        epoch = int(r["epoch"])
        done = r["status"] == "completed" and epoch == int(r["epochs"])
        if r["status"] == "diverged" or epoch == 0:
            tune.report({"epoch": epoch, "status": "diverged", "label": meta.get("label", ""),
                         "table_config": cid, "true_final_acc": truth})
            return
        val, test = float(r["val_acc"]), _num(r["test_acc"])
        if val > best:
            best, best_epoch, test_at_best = val, epoch, test
        tune.report({
            "epoch": epoch, "val_acc": val, "test_acc": test if test is not None else float("nan"),
            "flops_theoretical": float(r["flops_theoretical"]), "flops_executed": float(r["flops_executed"]),
            "flops_mask": float(r["flops_mask"] or 0.0), "train_seconds": float(r["train_seconds"]),
            "status": "completed" if done else "running",
            "best_val_acc": best, "best_epoch": best_epoch,
            "test_acc_at_best": test_at_best if test_at_best is not None else float("nan"),
            "label": meta.get("label", ""), "table_config": cid, "true_final_acc": truth,
        })
