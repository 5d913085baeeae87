"""The Pareto front and the best trial: the non-dominated completed trials on (val_acc: max,
cost: min), each row's front marks, the best row, and the key hyper-parameter columns with
the values that apply to each row's method.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ssam_tune.export.read import finite_number

# Method keys shown as "key hyper-parameters" besides the searched ones.
KEY_PARAMS = ("method.rho", "method.sparsity", "method.T_m", "method.N_F", "method.alpha")


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated ``(accuracy, cost)`` points, accuracy maximised and cost
    minimised, sorted by cost (then index).

    q dominates p when q's accuracy >= p's and q's cost <= p's with at least one strict.
    Identical points do not dominate each other, so all copies of a front point are on it.
    Points with a missing or non-finite value are never on the front. O(n log n).
    """
    valid = [i for i, (acc, cost) in enumerate(points)
             if finite_number(acc) is not None and finite_number(cost) is not None]
    valid.sort(key=lambda i: (float(points[i][1]), i))
    front: list[int] = []
    best_before = -math.inf  # the best accuracy among strictly cheaper points
    j = 0
    while j < len(valid):
        k = j
        cost = float(points[valid[j]][1])
        while k < len(valid) and float(points[valid[k]][1]) == cost:
            k += 1
        group = valid[j:k]
        top = max(float(points[i][0]) for i in group)
        if top > best_before:
            front.extend(i for i in group if float(points[i][0]) == top)
        best_before = max(best_before, top)
        j = k
    return front


def front_rows(rows: list[dict], cost_metric: str) -> list[dict]:
    """The front over the COMPLETED trials (full fidelity only), sorted by cost; marks every
    row's ``on_front`` and ``dominated`` (true/false for completed trials, None otherwise)."""
    cand = [r for r in rows if r["status"] == "completed" and r.get("val_acc") is not None
            and r.get(cost_metric) is not None]
    idx = pareto_front([(r["val_acc"], r[cost_metric]) for r in cand])
    on = {id(cand[i]) for i in idx}
    candidates = {id(c) for c in cand}
    for r in rows:
        r["on_front"] = id(r) in on
        r["dominated"] = (id(r) not in on) if id(r) in candidates else None
    return [cand[i] for i in idx]


def best_row(rows: list[dict], cost_metric: str) -> dict | None:
    """The completed trial with the highest val_acc; ties: lower cost, then trial id."""
    cand = [r for r in rows if r["status"] == "completed" and r.get("val_acc") is not None]
    if not cand:
        return None
    inf = float("inf")
    return min(cand, key=lambda r: (-r["val_acc"], r.get(cost_metric) if r.get(cost_metric) is not None else inf,
                                    r["trial_id"]))


def hp_keys(space, rows: list[dict]) -> list[str]:
    """The key hyper-parameters: the searched keys (or the keys the cases set) and the method's
    usual ones, without method.name (shown as ``method``)."""
    keys: list[str] = []
    if space is not None:
        keys += [d.key for d in space.search]
        for case in space.cases:
            keys += [k for k in case if k not in ("label", "seed")]
    keys += list(KEY_PARAMS)
    keys = [k for k in dict.fromkeys(keys) if k != "method.name"]
    return [k for k in keys if any(k in r for r in rows)] or keys


def hp_values(row: dict, keys: list[str]) -> dict:
    """The row's values of ``keys``; None where the key does not apply (training/config.key_applies)."""
    from ssam_tune.training.config import key_applies

    return {k: (row.get(k) if key_applies(row, k) else None) for k in keys}
