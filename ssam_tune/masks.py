"""Sparse-perturbation masks for SSAM (Mi et al., NeurIPS 2022, Section 4 and Algorithm 2).

Everything here is a pure function of tensors (plus an explicit torch.Generator), so each
piece is testable without training:

- :func:`fisher_scores` (from :mod:`ssam_tune.fisher`): the scores of SSAM-F, Eq. 5.
- :func:`topk_mask`: SSAM-F's global top-k (Eq. 6): exactly floor((1 - s) * d) ones.
- :func:`random_mask`, :func:`dynamic_mask_update`, :func:`f_decay`: SSAM-D (Eq. 7-9) and the
  random-mask ablation of Table 7.
- :class:`MaskSchedule`: when masks are refreshed (every T_m epochs, Algorithm 1 line 6).
- :func:`mask_stats`: density, per-layer density and overlap with the previous mask.

Masks are lists of bool tensors, one per parameter, on the parameter's device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ssam_tune.fisher import BN_MODES, fisher_scores

__all__ = [
    "BN_MODES", "DROP_STRATEGIES", "MaskSchedule", "dynamic_mask_update", "f_decay",
    "fisher_scores", "mask_stats", "num_perturbed", "random_mask", "topk_mask",
]

DROP_STRATEGIES = ("flattest", "random", "sharpest")
SCHEDULE_UNITS = ("epoch", "step")


def _check_sparsity(sparsity: float) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got sparsity={sparsity!r}")
    return float(sparsity)


def num_perturbed(d: int, sparsity: float) -> int:
    """floor((1 - s) * d), the exact number of ones in a mask of sparsity s.

    Rounded to 9 decimals before the floor, so that binary round-off such as
    (1 - 0.9) * 100 = 9.999999999999998 still gives 10.
    """
    return int(math.floor(round((1.0 - _check_sparsity(sparsity)) * d, 9)))


def _flat(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    return torch.cat([t.reshape(-1).to(device) for t in tensors])


def _unflat(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    out, start = [], 0
    for t in like:
        n = t.numel()
        out.append(flat[start:start + n].view(t.shape).to(t.device))
        start += n
    return out


def _mask_from_indices(d: int, idx: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    flat = torch.zeros(d, dtype=torch.bool, device=idx.device)
    flat[idx] = True
    return _unflat(flat, like)


# --------------------------------------------------------------------------------------
# SSAM-F: Fisher scores and the global top-k (Eq. 5-6)
# --------------------------------------------------------------------------------------
def topk_mask(scores: Sequence[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """One global top-k over all tensors: the floor((1 - s) * d) largest scores get True.

    All tensors compete together (Eq. 6); the work stays on the scores' device.
    """
    scores = list(scores)
    if not scores:
        raise ValueError("topk_mask needs at least one score tensor")
    device = scores[0].device
    flat = _flat([s.detach() for s in scores], device)
    k = num_perturbed(flat.numel(), sparsity)
    idx = torch.topk(flat, k, sorted=False).indices
    return _mask_from_indices(flat.numel(), idx, scores)


# --------------------------------------------------------------------------------------
# SSAM-D: random initial mask, drop-and-grow updates with cosine decay (Eq. 7-9)
# --------------------------------------------------------------------------------------
def random_mask(like: Sequence[torch.Tensor], sparsity: float,
                generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """A uniformly random mask with exactly floor((1 - s) * d) ones (SSAM-D's start, and the
    random-mask ablation of Table 7). ``like``: the parameters (shapes and devices)."""
    like = list(like)
    device = like[0].device
    d = sum(t.numel() for t in like)
    k = num_perturbed(d, sparsity)
    idx = torch.randperm(d, generator=generator, device=device)[:k]
    return _mask_from_indices(d, idx, like)


def f_decay(t: float, total: float, alpha: float) -> float:
    """Cosine decay of the drop rate, Eq. 9: alpha / 2 * (1 + cos(pi * t / T))."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got alpha={alpha!r}")
    if total <= 0:
        raise ValueError(f"total must be > 0, got total={total!r}")
    return alpha / 2.0 * (1.0 + math.cos(math.pi * t / total))


def dynamic_mask_update(
    masks: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor | None],
    *,
    sparsity: float,
    t: float,
    total: float,
    alpha: float = 0.5,
    strategy: str = "flattest",
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """One SSAM-D update (Eq. 7-8): drop N_drop perturbed entries, grow as many at random.

    N_drop = min(floor(f_decay(t; alpha) * (1 - s) * d), d - floor((1 - s) * d)): the cap keeps
    the growth possible when s is small (below alpha / (1 + alpha)), so the density stays
    exactly floor((1 - s) * d) / d. Dropped: the perturbed entries with the smallest |g|
    (``"flattest"``, the paper's), the largest (``"sharpest"``) or random ones (``"random"``),
    the last two being Table 7's ablations. Grown: uniformly among the entries that were
    unperturbed before this update. ``grads`` are the gradients at w (None counts as zero).
    Everything stays on the masks' device.
    """
    if strategy not in DROP_STRATEGIES:
        raise ValueError(f"drop strategy must be one of {DROP_STRATEGIES}, got strategy={strategy!r}")
    masks = list(masks)
    device = masks[0].device
    d = sum(m.numel() for m in masks)
    k = num_perturbed(d, sparsity)
    n_drop = min(int(math.floor(f_decay(t, total, alpha) * (1.0 - sparsity) * d)), d - k)
    flat = _flat(masks, device)
    if n_drop <= 0:
        return _unflat(flat.clone(), masks)
    neg_inf = torch.tensor(float("-inf"), device=device)
    if strategy == "random":
        key = torch.rand(d, generator=generator, device=device)
    else:
        g = _flat([torch.zeros_like(m, dtype=torch.float32) if gr is None else gr.detach().abs().float()
                   for m, gr in zip(masks, grads, strict=True)], device)
        key = -g if strategy == "flattest" else g
    drop = torch.topk(torch.where(flat, key, neg_inf), n_drop, sorted=False).indices
    grow_key = torch.where(flat, neg_inf, torch.rand(d, generator=generator, device=device))
    grow = torch.topk(grow_key, n_drop, sorted=False).indices
    new = flat.clone()
    new[drop] = False
    new[grow] = True
    return _unflat(new, masks)


# --------------------------------------------------------------------------------------
# Refresh schedule and statistics
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MaskSchedule:
    """When the mask is rebuilt (Algorithm 1, line 6: every T_m epochs).

    ``unit="epoch"`` (the paper's): at the first step of epochs 0, T_m, 2 T_m, ...;
    ``unit="step"``: every T_m optimizer steps; ``fixed=True``: only once, before the first
    step (Table 9's "fixed"). The first mask is always built before the first step.
    """

    interval: int = 1
    unit: str = "epoch"
    fixed: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"T_m (interval) must be an integer >= 1, got interval={self.interval!r}")
        if self.unit not in SCHEDULE_UNITS:
            raise ValueError(f"unit must be one of {SCHEDULE_UNITS}, got unit={self.unit!r}")

    def due(self, epoch: int, step_in_epoch: int, global_step: int) -> bool:
        """Whether the mask is rebuilt before this step."""
        if global_step == 0:
            return True
        if self.fixed:
            return False
        if self.unit == "step":
            return global_step % self.interval == 0
        return step_in_epoch == 0 and epoch % self.interval == 0

    def count(self, epochs: int, steps_per_epoch: int) -> int:
        """Number of mask builds in a run (the initial one included)."""
        total = epochs * steps_per_epoch
        if total <= 0:
            return 0
        if self.fixed:
            return 1
        if self.unit == "step":
            return (total - 1) // self.interval + 1
        return (epochs - 1) // self.interval + 1


def mask_stats(masks: Sequence[torch.Tensor], previous: Sequence[torch.Tensor] | None = None) -> dict:
    """Density, per-tensor density and overlap with ``previous`` (one host sync).

    overlap = |m AND m_prev| / |m|: the fraction of the perturbed entries that were
    perturbed before (1.0 for an unchanged mask; None without a previous mask).
    """
    masks = list(masks)
    counts = [m.sum() for m in masks]
    device = counts[0].device
    values = [c.to(device) for c in counts]
    if previous is not None:
        values.append(sum((m & p.to(m.device)).sum().to(device) for m, p in zip(masks, previous, strict=True)))
    host = torch.stack(values).tolist()
    ones = sum(host[: len(masks)])
    d = sum(m.numel() for m in masks)
    return {
        "density": ones / d,
        "per_layer": [c / m.numel() for c, m in zip(host[: len(masks)], masks, strict=True)],
        "overlap": (host[-1] / ones if ones else 1.0) if previous is not None else None,
        "ones": int(ones),
        "size": d,
    }
