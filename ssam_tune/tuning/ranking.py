"""MO-ASHA's ranking rule at a rung: pure Python, no Ray (tested against brute force in
tests/test_schedulers.py and tests/test_scale.py; the scheduler is in schedulers.py).

MO-ASHA (``tune.scheduler.type: mo_asha``, the default under ``objective: multi``) keeps the
asynchronous successive-halving schedule of ASHA (rungs at ``grace_period * rf**k`` epochs)
but changes who goes on at a rung. Ranking on accuracy alone prunes a cheap trial (high
sparsity, small N_F) that is a little less accurate even when nothing dominates it; the
front then loses its cheap end. Here a newcomer at a rung is ranked together with the
trials already recorded there:

1. non-dominated sorting on (validation accuracy at the rung, max; the trial's cost for the
   full run, min). The cost is the reported cost so far scaled to ``max_t`` epochs, which is
   exact for the theoretical cost (constant per epoch) and an estimate for wall time;
2. within a front, by crowding distance computed on values min-max normalised over the
   rung, so that neither unit (accuracy ~1, FLOPs ~1e15) swamps the other and rescaling an
   objective changes nothing. Tied values get the same distance (no order dependence), and
   two distances within a relative 1e-9 of each other count as equal: distances that are
   equal in exact arithmetic (equal gaps, common when sparsity is searched on a grid and
   theoretical FLOPs are linear in it) would otherwise be ordered by how the normalisation
   rounds, which rescaling an objective or shifting it by a constant changes;
3. the newcomer goes on iff at most ``n / rf`` of the ``n`` points (itself included) rank
   strictly ahead of it: a better front, or the same front and a larger crowding distance.

A point's rank is compared, never its index in a sorted permutation, so a newcomer that
dominates every recorded point always goes on.

**One objective** (``objective: single`` with ``scheduler: mo_asha``): the decision is Ray
Tune's ``ASHAScheduler`` cutoff, the same arithmetic: the newcomer goes on iff its value is
at least ``numpy.nanpercentile(recorded, 100 * (1 - 1 / rf))`` (linear interpolation; no
recorded value: it goes on). This is not the rank rule above restricted to one dimension:
with recorded [0.84] and rf 2, "at most n/rf strictly better" would let 0.52 go on (1 of 2
ahead), while the cutoff is 0.84 and stops it; the interpolated cutoff depends on values,
not only on their order, so no rank rule reproduces it. tests/test_schedulers.py checks the
decisions against ``ASHAScheduler`` itself on random rungs.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

import numpy as np

__all__ = ["asha_cutoff", "crowding_distances", "nondominated_ranks", "promote"]

# Crowding distances within this relative tolerance are equal (see the module doc, 2.).
_CROWDING_RTOL = 1e-9


def _further(a: float, b: float) -> bool:
    """Crowding distance ``a`` strictly larger than ``b``, beyond rounding."""
    return a > b and not math.isclose(a, b, rel_tol=_CROWDING_RTOL, abs_tol=0.0)


def asha_cutoff(recorded: Sequence[float], reduction_factor: float) -> float | None:
    """Ray Tune's ASHA cutoff at a rung: the ``1 - 1/rf`` quantile of the recorded values
    (linear interpolation, NaN ignored); None when nothing is recorded."""
    if not recorded:
        return None
    return float(np.nanpercentile(np.asarray(recorded, dtype=float), (1 - 1 / reduction_factor) * 100))


# points are tuples to MAXIMISE
def _dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(x >= y for x, y in zip(a, b, strict=True)) and any(x > y for x, y in zip(a, b, strict=True))


def nondominated_ranks(points: Sequence[Sequence[float]]) -> list[int]:
    """Front index of each point (0: not dominated by any point; 1: only by front 0; ...)."""
    n = len(points)
    dominated_by = [sum(_dominates(points[j], points[i]) for j in range(n)) for i in range(n)]
    dominates = [[j for j in range(n) if _dominates(points[i], points[j])] for i in range(n)]
    ranks = [-1] * n
    front = [i for i in range(n) if dominated_by[i] == 0]
    level = 0
    while front:
        nxt = []
        for i in front:
            ranks[i] = level
            for j in dominates[i]:
                dominated_by[j] -= 1
                if dominated_by[j] == 0:
                    nxt.append(j)
        front, level = nxt, level + 1
    return ranks


def crowding_distances(points: Sequence[Sequence[float]], ranks: Sequence[int]) -> list[float]:
    """Crowding distance of each point within its front, on values min-max normalised over
    all ``points`` (scale-free). A point at the low or high end of its front in some objective
    gets infinity; the others sum, per objective, the gap between the nearest distinct values
    below and above theirs. Equal values get equal distances whatever the order."""
    n = len(points)
    dims = len(points[0]) if n else 0
    out = [0.0] * n
    for m in range(dims):
        column = [p[m] for p in points]
        lo, hi = min(column), max(column)
        span = hi - lo
        for level in set(ranks):
            members = [i for i in range(n) if ranks[i] == level]
            values = sorted({column[i] for i in members})
            for i in members:
                v = column[i]
                k = values.index(v)
                if k == 0 or k == len(values) - 1:
                    out[i] = math.inf
                elif span > 0:
                    out[i] += (values[k + 1] - values[k - 1]) / span
    return out


def promote(recorded: Sequence[Sequence[float]], newcomer: Sequence[float], reduction_factor: float) -> bool:
    """Whether ``newcomer`` goes on from a rung where ``recorded`` points already stand:
    at most ``n / reduction_factor`` of the ``n`` points (newcomer included) rank ahead.

    The same rule as :func:`nondominated_ranks` and :func:`crowding_distances` (the reference,
    O(n^2) per call), computed in O(n log n) for one or two objectives: a rung of a
    2,000-trial search holds ~2,000 points, and the reference took ~6 s per decision there.
    The crowding distance is needed only within the newcomer's front."""
    points = [tuple(p) for p in recorded] + [tuple(newcomer)]
    me = len(points) - 1
    if len(points[me]) == 1:  # one objective: Ray's ASHA (module doc)
        cutoff = asha_cutoff([p[0] for p in points[:me]], reduction_factor)
        return cutoff is None or points[me][0] >= cutoff
    if len(points[me]) > 2:
        ranks = nondominated_ranks(points)
        crowd = crowding_distances(points, ranks)
        ahead = sum(1 for j in range(me)
                    if ranks[j] < ranks[me] or (ranks[j] == ranks[me] and _further(crowd[j], crowd[me])))
        return ahead <= len(points) / reduction_factor
    ranks = _ranks_2d(points)
    level = ranks[me]
    members = [i for i in range(len(points)) if ranks[i] == level]
    crowd = _crowding_of(points, members)
    ahead = sum(1 for j in range(me) if ranks[j] < level) + \
        sum(1 for i in members if i != me and _further(crowd[i], crowd[me]))
    return ahead <= len(points) / reduction_factor


def _ranks_2d(points: Sequence[tuple[float, ...]]) -> list[int]:
    """:func:`nondominated_ranks` of points with one or two objectives, in O(n log n).

    Points are taken in decreasing (x, y) order, identical points together (they do not
    dominate each other). ``tops[k]`` is the highest y among front k's points so far; a point
    is dominated by a member of front k iff ``tops[k] >= y`` (every earlier point has x at
    least as high), and ``tops`` never increases with k (each member of front k + 1 is
    dominated by a member of front k), so the point's front is the first k with
    ``tops[k] < y``: a bisection. One objective is the case y = 0 for every point."""
    pts = [p if len(p) == 2 else (p[0], 0.0) for p in points]
    order = sorted(range(len(pts)), key=lambda i: (-pts[i][0], -pts[i][1]))
    neg_tops: list[float] = []  # -tops[k]: non-decreasing, for bisect
    ranks = [0] * len(pts)
    j = 0
    while j < len(order):
        p = pts[order[j]]
        k = j
        while k < len(order) and pts[order[k]] == p:
            k += 1
        level = bisect.bisect_right(neg_tops, -p[1])
        for i in order[j:k]:
            ranks[i] = level
        if level == len(neg_tops):
            neg_tops.append(-p[1])
        else:
            neg_tops[level] = -p[1]
        j = k
    return ranks


def _crowding_of(points: Sequence[Sequence[float]], members: list[int]) -> dict[int, float]:
    """:func:`crowding_distances` of the ``members`` of one front (same arithmetic, same order)."""
    out = dict.fromkeys(members, 0.0)
    for m in range(len(points[0])):
        lo = min(p[m] for p in points)
        span = max(p[m] for p in points) - lo
        values = sorted({points[i][m] for i in members})
        where = {v: k for k, v in enumerate(values)}
        for i in members:
            k = where[points[i][m]]
            if k == 0 or k == len(values) - 1:
                out[i] = math.inf
            elif span > 0:
                out[i] += (values[k + 1] - values[k - 1]) / span
    return out
