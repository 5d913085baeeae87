"""Sparse-perturbation masks for SSAM (Mi et al., NeurIPS 2022, Section 4 and Algorithm 2).

Everything here is a pure function of tensors (plus an explicit torch.Generator), so each
piece is testable without training:

- :func:`fisher_scores`: the empirical Fisher diagonal of Eq. 5, sum over N_F samples of
  squared PER-SAMPLE gradients of the per-sample negative log-likelihood.
- :func:`topk_mask`: SSAM-F's global top-k (Eq. 6): exactly floor((1 - s) * d) ones.
- :func:`random_mask`, :func:`dynamic_mask_update`, :func:`f_decay`: SSAM-D (Eq. 7-9) and the
  random-mask ablation of Table 7.
- :class:`MaskSchedule`: when masks are refreshed (every T_m epochs, Algorithm 1 line 6).
- :func:`mask_stats`: density, per-layer density and overlap with the previous mask.

Masks are lists of bool tensors, one per parameter, on the parameter's device.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BN_MODES", "DROP_STRATEGIES", "MASK_KINDS", "MaskSchedule", "dynamic_mask_update", "f_decay",
    "fisher_scores", "mask_stats", "num_perturbed", "random_mask", "topk_mask",
]

BN_MODES = ("per_sample", "eval")
DROP_STRATEGIES = ("flattest", "random", "sharpest")
MASK_KINDS = ("fisher", "dynamic", "random")
SCHEDULE_UNITS = ("epoch", "step")


def _check_sparsity(sparsity: float) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got sparsity={sparsity!r}")
    return float(sparsity)


def check_mask_kind(kind: str) -> str:
    if kind not in MASK_KINDS:
        raise ValueError(f"mask kind must be one of {MASK_KINDS}, got kind={kind!r}")
    return kind


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


def _nll_per_sample(loss_fn: Callable | None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Per-sample negative log-likelihood, whatever ``loss_fn``'s reduction or smoothing.

    The empirical Fisher (Eq. 5) is of log p(y|x): ``None`` or any nn.CrossEntropyLoss gives
    the plain cross entropy per sample (label smoothing, class weights and reduction are
    dropped). Another callable is applied to each sample alone (a batch of one), so its
    reduction does not matter.
    """
    if loss_fn is None or isinstance(loss_fn, nn.CrossEntropyLoss):
        return lambda logits, y: F.cross_entropy(logits, y, reduction="none")

    def per_sample(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.func.vmap(lambda lo, t: loss_fn(lo.unsqueeze(0), t.unsqueeze(0)))(logits, y)

    return per_sample


class _Unsupported(Exception):
    """The per-layer path cannot handle this model; use the torch.func path."""


_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)


def _supported(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.Conv2d):
        return module.padding_mode == "zeros" and not isinstance(module.padding, str)
    if isinstance(module, _BN_TYPES):
        return module.affine
    return False


def _per_sample_bn_forward(bn: nn.modules.batchnorm._BatchNorm):
    """Train-mode BatchNorm on each sample alone == instance norm with the BN affine."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 3:
            raise ValueError(
                "fisher_scores(bn='per_sample') needs spatial BatchNorm inputs: BatchNorm on a "
                "single (N, C) sample has one value per channel; use bn='eval'"
            )
        return F.instance_norm(x, weight=bn.weight, bias=bn.bias, eps=bn.eps)
    return forward


# CPU tuning of the Conv2d per-sample path (measured by benchmarks/bench_fisher.py): at least
# this many output positions -> per-sample weight gradients from one grouped convolution
# backward (one group per sample, oneDNN), about 2-4x faster than unfold + bmm there; fewer
# positions (late, wide layers) -> unfold + bmm. Per-sample gradients in chunks of at most
# _CPU_CHUNK_ELEMS elements.
_CPU_GROUPED_MIN_POSITIONS = 64
_CPU_CHUNK_ELEMS = 1 << 21


def _conv_sq_grads_grouped(module: nn.Conv2d, a: torch.Tensor, go: torch.Tensor,
                           max_elems: int) -> torch.Tensor:
    """sum_n (dL_n/dW)^2 for a Conv2d: the batch folded into the channels (1, N*Cin, H, W) and
    the weight gradient of a convolution with N*groups groups is every sample's own."""
    n, cin = a.shape[:2]
    cout, groups = module.out_channels, module.groups
    wshape = module.weight.shape
    step = max(1, max_elems // wshape.numel())
    acc = torch.zeros(wshape, dtype=a.dtype, device=a.device)
    for s in range(0, n, step):
        m = min(step, n - s)
        gw = torch.ops.aten.convolution_backward(
            go[s:s + m].reshape(1, m * cout, *go.shape[2:]),
            a[s:s + m].reshape(1, m * cin, *a.shape[2:]),
            a.new_empty((m * cout,) + tuple(wshape[1:])),  # only its shape is read
            None, list(module.stride), list(module.padding), list(module.dilation), False, [0, 0],
            m * groups, [False, True, False])[1]
        acc += gw.view(m, *wshape).square_().sum(0)
    return acc


def _layer_sq_grads(module: nn.Module, a: torch.Tensor, go: torch.Tensor, bn_mode: str,
                    max_elems: int) -> dict[str, torch.Tensor]:
    """Sum over samples of squared per-sample gradients of one layer's own parameters.

    ``a`` is the layer input and ``go`` the gradient of the summed per-sample losses with
    respect to the layer output; samples are independent, so go[n] is sample n's own.
    """
    out: dict[str, torch.Tensor] = {}
    n = a.shape[0]
    if isinstance(module, nn.Linear):
        if a.dim() == 2:
            # sum_n (go[n,i] a[n,j])^2 = (go^2)^T (a^2): one matmul, no per-sample tensors.
            out["weight"] = go.square().t() @ a.square()
            sums = go
        else:
            gw = torch.einsum("n...o,n...i->noi", go, a)
            out["weight"] = gw.square().sum(0)
            sums = go.reshape(n, -1, go.shape[-1]).sum(1)
        if module.bias is not None:
            out["bias"] = sums.square().sum(0)
        return out
    if isinstance(module, nn.Conv2d):
        groups, cout = module.groups, module.out_channels
        positions = go.shape[2] * go.shape[3]
        if a.device.type == "cpu":
            # Chunks that stay in cache: the per-sample gradients are written, squared and
            # summed right away (memory bound); a huge chunk only adds page faults.
            max_elems = min(max_elems, _CPU_CHUNK_ELEMS)
            if positions >= _CPU_GROUPED_MIN_POSITIONS:
                out["weight"] = _conv_sq_grads_grouped(module, a, go, max_elems)
                if module.bias is not None:
                    out["bias"] = go.flatten(2).sum(2).square().sum(0)
                return out
        cols = F.unfold(a, module.kernel_size, dilation=module.dilation, padding=module.padding,
                        stride=module.stride)  # (N, Cin*kh*kw, L)
        k = cols.shape[1] // groups
        cols = cols.view(n, groups, k, -1)
        gout = go.reshape(n, groups, cout // groups, -1)
        # Per-sample weight gradients, materialised a few samples at a time (memory bound).
        step = max(1, max_elems // (cout * k))
        acc = torch.zeros(groups, cout // groups, k, dtype=a.dtype, device=a.device)
        for s in range(0, n, step):
            gw = torch.einsum("ngol,ngkl->ngok", gout[s:s + step], cols[s:s + step])
            acc += gw.square_().sum(0)  # gw is scratch: square in place
        out["weight"] = acc.reshape(module.weight.shape)
        if module.bias is not None:
            out["bias"] = go.flatten(2).sum(2).square().sum(0)
        return out
    # BatchNorm: dL/dgamma[n,c] = sum over positions of go * x_hat, dL/dbeta = sum of go.
    if bn_mode == "eval":
        shape = (1, -1) + (1,) * (a.dim() - 2)
        xhat = (a - module.running_mean.view(shape)) * torch.rsqrt(module.running_var.view(shape) + module.eps)
    else:
        xhat = F.instance_norm(a, eps=module.eps)
    red = tuple(range(2, a.dim()))
    out["weight"] = (go * xhat).sum(red).square().sum(0)
    out["bias"] = go.sum(red).square().sum(0)
    return out


def _fisher_by_layers(work: nn.Module, nll, inputs, targets, bn: str, chunk: int) -> list[torch.Tensor]:
    """One batched forward/backward per chunk; per-sample squares per layer (no vmap)."""
    params = list(work.parameters())
    owners: dict[int, tuple[nn.Module, str]] = {}
    layers = []
    for module in work.modules():
        own = [(name, p) for name, p in module.named_parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if not _supported(module):
            raise _Unsupported(type(module).__name__)
        if bn == "eval" and isinstance(module, _BN_TYPES) and module.running_mean is None:
            raise _Unsupported("BatchNorm without running statistics")
        for name, p in own:
            if id(p) in owners:  # shared weights: per-sample grads would need summing first
                raise _Unsupported("shared parameter")
            owners[id(p)] = (module, name)
        layers.append(module)
    if bn == "per_sample":
        for module in layers:
            if isinstance(module, _BN_TYPES):
                module.forward = _per_sample_bn_forward(module)
    acc = {id(p): torch.zeros_like(p, memory_format=torch.contiguous_format) for p in params}
    record: dict[nn.Module, list] = {}

    def hook(module, args, output):
        if module in record:
            raise _Unsupported("module called twice in one forward")
        record[module] = [args[0].detach(), output]
        # Return a copy so later in-place ops (ReLU(inplace), out += x) cannot touch the
        # tensor we differentiate against.
        return output.clone()

    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        for s in range(0, inputs.shape[0], chunk):
            record.clear()
            with torch.enable_grad():
                logits = work(inputs[s:s + chunk])
                total = nll(logits, targets[s:s + chunk]).sum()
                mods = list(record)
                outs = torch.autograd.grad(total, [record[m][1] for m in mods], allow_unused=True)
            for m, go in zip(mods, outs):
                if go is None:
                    continue
                sq = _layer_sq_grads(m, record[m][0], go.detach(), bn, max_elems=1 << 26)
                for name, value in sq.items():
                    p = getattr(m, name)
                    if p is not None and p.requires_grad:
                        acc[id(p)] += value
    finally:
        for h in handles:
            h.remove()
    return [acc[id(p)] for p in params]


def _fisher_by_vmap(work: nn.Module, nll, inputs, targets, bn: str, chunk: int) -> list[torch.Tensor]:
    """torch.func path: vmap(grad) over samples; works for any functional model."""
    if bn == "per_sample":
        # BatchNorm with batch statistics and no running-stat updates, so vmap can run it
        # on each sample alone (the reference's batch-1 train-mode semantics).
        torch.func.replace_all_batch_norm_modules_(work)
    names = [n for n, p in work.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in work.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in work.named_parameters() if not p.requires_grad}
    buffers = {n: b for n, b in work.named_buffers()}

    def loss_one(ps, x, y):
        out = torch.func.functional_call(work, ({**ps, **frozen}, buffers), (x.unsqueeze(0),))
        return nll(out, y.unsqueeze(0)).sum()

    per_sample_grad = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0), randomness="different")
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    for s in range(0, inputs.shape[0], chunk):
        grads = per_sample_grad(params, inputs[s:s + chunk], targets[s:s + chunk])
        for n in names:
            acc[n] += grads[n].square().sum(0)
    return [acc[n] if p.requires_grad else torch.zeros_like(p) for n, p in work.named_parameters()]


def fisher_scores(
    model: nn.Module,
    loss_fn: Callable | None,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    bn: str = "per_sample",
    chunk_size: int | None = None,
    method: str = "auto",
) -> list[torch.Tensor]:
    """Empirical Fisher diagonal (paper Eq. 5): sum_n (d log p(y_n | x_n) / d w)^2.

    Squared PER-SAMPLE gradients of the per-sample NLL, summed over the N_F = len(inputs)
    samples (not the square of a batch gradient), one tensor per ``model.parameters()``
    entry (zeros for parameters that do not require grad).

    - ``bn="per_sample"`` (default, the reference's semantics): the model in train mode and
      each BatchNorm normalising each sample by its own statistics (the reference runs
      batch-size-1 train-mode passes). ``bn="eval"``: the model in eval mode, BatchNorm
      with its running statistics.
    - ``loss_fn``: see :func:`_nll_per_sample`; the result does not depend on its reduction.
    - Computed in chunks of ``chunk_size`` samples, never a batch-size-1 loop. ``method``:
      ``"layers"`` does one batched forward/backward per chunk and forms per-sample squares
      layer by layer (Linear, Conv2d, BatchNorm); ``"vmap"`` uses torch.func on any model;
      ``"auto"`` takes the first when every parameter sits in such a layer.
    - The model is left exactly as found: the work runs on a deep copy, so parameters,
      buffers (running stats, num_batches_tracked), ``.grad`` and the train/eval mode of
      ``model`` are untouched.

    Callers feed un-augmented training samples (never validation or test data), drawn with
    a seeded generator.
    """
    if bn not in BN_MODES:
        raise ValueError(f"bn must be one of {BN_MODES}, got bn={bn!r}")
    if method not in ("auto", "layers", "vmap"):
        raise ValueError(f"method must be 'auto', 'layers' or 'vmap', got method={method!r}")
    if inputs.shape[0] < 1 or inputs.shape[0] != targets.shape[0]:
        raise ValueError(f"need N_F >= 1 inputs with one target each, got {inputs.shape[0]} inputs "
                         f"and {targets.shape[0]} targets")
    nll = _nll_per_sample(loss_fn)
    originals = list(model.parameters())

    def fresh_copy() -> nn.Module:
        work = copy.deepcopy(model)
        for p in work.parameters():
            p.grad = None
        return work.train(bn == "per_sample")

    d = sum(p.numel() for p in originals)
    result = None
    if method in ("auto", "layers"):
        try:
            result = _fisher_by_layers(fresh_copy(), nll, inputs, targets, bn, chunk_size or 128)
        except _Unsupported:
            if method == "layers":
                raise ValueError("method='layers' supports Linear, Conv2d and BatchNorm layers "
                                 "only, each called once per forward; use method='vmap'") from None
    if result is None:
        elem = originals[0].element_size() if originals else 4
        chunk = chunk_size or max(1, (1 << 30) // max(1, d * elem))  # about 1 GiB of grads
        result = _fisher_by_vmap(fresh_copy(), nll, inputs, targets, bn, chunk)
    return [r.detach().to(p.device) for r, p in zip(result, originals)]


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
                   for m, gr in zip(masks, grads)], device)
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
        values.append(sum((m & p.to(m.device)).sum().to(device) for m, p in zip(masks, previous)))
    host = torch.stack(values).tolist()
    ones = sum(host[: len(masks)])
    d = sum(m.numel() for m in masks)
    return {
        "density": ones / d,
        "per_layer": [c / m.numel() for c, m in zip(host[: len(masks)], masks)],
        "overlap": (host[-1] / ones if ones else 1.0) if previous is not None else None,
        "ones": int(ones),
        "size": d,
    }
