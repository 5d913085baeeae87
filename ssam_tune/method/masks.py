"""Sparse-perturbation masks for SSAM (Mi et al., NeurIPS 2022, Section 4 and Algorithm 2).

Everything here is a pure function of tensors (plus an explicit torch.Generator), so each
piece is testable without training:

- :func:`fisher_scores` (from :mod:`ssam_tune.method.fisher`): the scores of SSAM-F, Eq. 5.
- :func:`topk_mask`: SSAM-F's global top-k (Eq. 6): exactly floor((1 - s) * d) ones.
- :func:`random_mask`, :func:`dynamic_mask_update`, :func:`f_decay`: SSAM-D (Eq. 7-9) and the
  random-mask ablation of Table 7.
- :class:`MaskSchedule`: when masks are refreshed (every T_m epochs, Algorithm 1 line 6).
- :func:`mask_stats`: density, per-layer density and overlap with the previous mask.
- Tensor granularity (``method.granularity: tensor``): :func:`tensor_topk_mask`,
  :func:`tensor_random_mask` and :func:`tensor_dynamic_update` perturb whole parameter
  tensors, so the pass at w needs only the perturbed tensors' gradients
  (:meth:`ssam_tune.method.optim.SSAM.first_pass`); :func:`norm_mask` is SAM-ON's (Mueller et al.,
  NeurIPS 2023: only the normalization layers).

Masks are lists of bool tensors, one per parameter, on the parameter's device; a tensor mask
is all True or all False per tensor, so optimizers, checkpoints and exports treat both alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ssam_tune.method.fisher import BN_MODES, fisher_scores
from ssam_tune.method.methods import TENSOR_SCORES

__all__ = [
    "BN_MODES", "DROP_STRATEGIES", "GRANULARITIES", "NORM_LAYERS", "TENSOR_SCORES", "MaskSchedule",
    "check_sparsity", "dynamic_mask_update", "f_decay", "fisher_scores", "mask_stats", "norm_mask", "num_perturbed",
    "random_mask", "tensor_dynamic_update", "tensor_random_mask", "tensor_topk_mask", "topk_mask",
]

DROP_STRATEGIES = ("flattest", "random", "sharpest")
GRANULARITIES = ("element", "tensor")
# per_flop widens its pool of cheap tensors until the perturbed fraction is within this of 1 - s.
TENSOR_TOLERANCE = 0.025
# Modules whose parameters SAM-ON perturbs.
NORM_LAYERS = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)
SCHEDULE_UNITS = ("epoch", "step")


def check_sparsity(sparsity: float) -> float:
    """``sparsity`` (the fraction of weights NOT perturbed) as a float in [0, 1); ValueError
    otherwise. The one check for the masks, the optimizers and the FLOPs counts."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got sparsity={sparsity!r}")
    return float(sparsity)


def num_perturbed(d: int, sparsity: float) -> int:
    """floor((1 - s) * d), the exact number of ones in a mask of sparsity s.

    Rounded to 9 decimals before the floor, so that binary round-off such as
    (1 - 0.9) * 100 = 9.999999999999998 still gives 10.
    """
    return int(math.floor(round((1.0 - check_sparsity(sparsity)) * d, 9)))


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


def _drop_count(d: int, sparsity: float, t: float, total: float, alpha: float) -> int:
    """SSAM-D's N_drop (Eq. 8-9), capped at d - floor((1 - s) d) so that the growth stays
    possible when s is small (below alpha / (1 + alpha))."""
    return min(int(math.floor(f_decay(t, total, alpha) * (1.0 - sparsity) * d)), d - num_perturbed(d, sparsity))


def _randperm(n: int, generator: torch.Generator | None, device) -> list[int]:
    """A random order of n items from ``generator`` (on the generator's device)."""
    device = generator.device if generator is not None else device
    return torch.randperm(n, generator=generator, device=device).tolist()


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
    n_drop = _drop_count(d, sparsity, t, total, alpha)
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
# Tensor granularity: whole tensors in or out
# --------------------------------------------------------------------------------------
def _take_towards(sizes: Sequence[int], order: Sequence[int], target: int, start: int = 0) -> list[int]:
    """Walk tensors in ``order`` and take each one that brings the running count (from
    ``start``) closer to ``target``: the best-ranked tensors first, a tensor that would
    overshoot by more than it helps is passed over for smaller ones further down."""
    taken, count = [], start
    for i in order:
        n = sizes[i]
        if abs(count + n - target) < abs(count - target):
            taken.append(i)
            count += n
    return taken


def _whole(like: Sequence[torch.Tensor], chosen) -> list[torch.Tensor]:
    chosen = set(chosen)
    return [torch.full(t.shape, i in chosen, dtype=torch.bool, device=t.device) for i, t in enumerate(like)]


def _host(values: Sequence[torch.Tensor]) -> list[float]:
    """Per-tensor scalars to the host in one transfer."""
    if not values:
        return []
    device = values[0].device
    return torch.stack([v.to(device) for v in values]).tolist()


def tensor_topk_mask(scores: Sequence[torch.Tensor], sparsity: float, reduce: str = "per_flop",
                     costs: Sequence[float] | None = None) -> list[torch.Tensor]:
    """SSAM-F at tensor granularity: rank tensors by their Fisher information and perturb the
    best-ranked ones until the perturbed fraction of weights is closest to 1 - s (walking the
    ranking, a tensor that would overshoot by more than it helps is passed over).

    - ``reduce="per_flop"`` (default): ``costs[i]`` is the backward FLOPs of a pass at w in
      which only tensor i is perturbed (:func:`ssam_tune.method.flops.backward_flops_per_tensor`: its
      weight gradient and every input gradient between it and the loss). Only the cheapest
      tensors that can hold the budget compete: the pool grows by cost until the walk over it
      (ranked by total score over cost) lands within 2.5% of d of floor((1 - s) d), or the
      closest any pool gets. One
      informative early tensor would otherwise pull backward all the way to the input: with
      the ranking alone, ResNet-18 at 50% took the first convolution and executed 0.86x a SAM
      step instead of about 0.7x.
    - ``"cost"``: as ``per_flop`` with every weight's score set to 1, i.e. the ranking is the
      tensor's weights per backward FLOP and the scores are not read. It is the control that
      asks what the Fisher adds at tensor granularity (results/structured/README.md).
    - ``"mean"``: the mean score per weight; ``"total"``: the sum (the tensor's share of Eq. 5's
      trace), over all tensors. Both put the first convolution near the top on CIFAR
      ResNet-18, so the pass at w saves little (0.95-0.98x a SAM step).

    Ties keep parameter order.
    """
    if reduce not in TENSOR_SCORES:
        raise ValueError(f"reduce must be one of {TENSOR_SCORES}, got reduce={reduce!r}")
    scores = list(scores)
    if not scores:
        raise ValueError("tensor_topk_mask needs at least one score tensor")
    if reduce in ("per_flop", "cost") and (costs is None or len(costs) != len(scores)):
        raise ValueError(f"reduce={reduce!r} needs costs: one backward-FLOPs figure per score tensor")
    sizes = [s.numel() for s in scores]
    k = num_perturbed(sum(sizes), sparsity)
    if reduce == "cost":
        agg = [float(n) for n in sizes]
    else:
        agg = _host([s.detach().float().mean() if reduce == "mean" else s.detach().float().sum() for s in scores])
    if reduce not in ("per_flop", "cost"):
        order = sorted(range(len(scores)), key=lambda i: -agg[i])
        return _whole(scores, _take_towards(sizes, order, k))
    agg = [a / max(float(c), 1.0) for a, c in zip(agg, costs, strict=True)]
    by_cost = sorted(range(len(scores)), key=lambda i: costs[i])
    best, held = None, 0
    for n, i in enumerate(by_cost, 1):  # widen the pool, cheapest tensors first
        held += sizes[i]
        if held < k and n < len(by_cost):
            continue
        taken = _take_towards(sizes, sorted(by_cost[:n], key=lambda j: -agg[j]), k)
        miss = abs(sum(sizes[j] for j in taken) - k)
        if best is None or miss < best[0]:
            best = (miss, taken)
        if miss <= TENSOR_TOLERANCE * sum(sizes):
            break
    return _whole(scores, best[1])


def tensor_random_mask(like: Sequence[torch.Tensor], sparsity: float,
                       generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Whole tensors in a uniformly random order until the perturbed fraction is closest to
    1 - s (the random-mask ablation and SSAM-D's start, at tensor granularity)."""
    like = list(like)
    sizes = [t.numel() for t in like]
    order = _randperm(len(like), generator, like[0].device)
    return _whole(like, _take_towards(sizes, order, num_perturbed(sum(sizes), sparsity)))


def tensor_dynamic_update(
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
    """SSAM-D's drop-and-grow (Eq. 7-9) on whole tensors.

    Drop: perturbed tensors, flattest first (smallest mean |g|; ``"sharpest"``: largest;
    ``"random"``: random order), until about N_drop = f_decay(t) (1 - s) d weights are
    dropped. Grow: tensors unperturbed before this update, in random order, until the
    perturbed fraction is closest to 1 - s again. Only the perturbed tensors' gradients are
    read (the others may be None), so the pass at w can skip the rest.
    """
    if strategy not in DROP_STRATEGIES:
        raise ValueError(f"drop strategy must be one of {DROP_STRATEGIES}, got strategy={strategy!r}")
    masks = list(masks)
    sizes = [m.numel() for m in masks]
    d = sum(sizes)
    k = num_perturbed(d, sparsity)
    on = [bool(v) for v in _host([m.any() for m in masks])]
    inside = [i for i in range(len(masks)) if on[i]]
    outside = [i for i in range(len(masks)) if not on[i]]
    n_drop = _drop_count(d, sparsity, t, total, alpha)
    if n_drop <= 0 or not inside:
        return [m.clone() for m in masks]
    if strategy == "random":
        drop_order = [inside[j] for j in _randperm(len(inside), generator, "cpu")]
    else:
        flat = _host([torch.zeros((), device=masks[i].device) if grads[i] is None
                      else grads[i].detach().abs().float().mean() for i in inside])
        sign = 1.0 if strategy == "flattest" else -1.0
        drop_order = [inside[j] for j in sorted(range(len(inside)), key=lambda j: sign * flat[j])]
    dropped = set(_take_towards(sizes, drop_order, n_drop))
    kept = [i for i in inside if i not in dropped]
    grow_order = [outside[j] for j in _randperm(len(outside), generator, "cpu")]
    grown = _take_towards(sizes, grow_order, k, start=sum(sizes[i] for i in kept))
    return _whole(masks, kept + grown)


def norm_mask(model: torch.nn.Module, params: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """SAM-ON's mask: True for the parameters of normalization layers (BatchNorm, GroupNorm,
    LayerNorm, InstanceNorm), False elsewhere. One mask per tensor of ``params`` (default:
    ``model.parameters()``; matched by identity, so an optimizer's order works too)."""
    norm = {id(p) for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)}
    params = list(model.parameters()) if params is None else list(params)
    if not any(id(p) in norm for p in params):
        raise ValueError("the model has no normalization-layer parameters, so SAM-ON would perturb nothing")
    return [torch.full(p.shape, id(p) in norm, dtype=torch.bool, device=p.device) for p in params]


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
