"""The empirical Fisher diagonal that ranks weights for SSAM-F (Mi et al., NeurIPS 2022, Eq. 5).

:func:`fisher_scores` sums, over the N_F samples, the squared PER-SAMPLE gradients of the
per-sample negative log-likelihood (not the square of a batch gradient). It is computed in
batched chunks, never a batch-size-1 loop: layer by layer for Linear, Conv2d and BatchNorm
(one batched backward, then per-sample squares from activations and output gradients), or
with torch.func's vmap for any other model. :func:`ssam_tune.method.masks.topk_mask` turns the scores
into SSAM-F's mask (Eq. 6).
"""

from __future__ import annotations

import copy
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BN_MODES", "fisher_scores"]

BN_MODES = ("per_sample", "eval")


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


_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm)


def local_batchnorm_(module: nn.Module) -> nn.Module:
    """Run ``module``'s SyncBatchNorm layers as plain BatchNorm (this process's batch only,
    no collective), in place; for copies that score or measure a model (Fisher scores,
    FLOPs counts on the meta device), whose SyncBatchNorm would otherwise need CUDA and the
    other ranks."""
    for m in module.modules():
        if isinstance(m, nn.SyncBatchNorm):
            m.forward = types.MethodType(nn.modules.batchnorm._BatchNorm.forward, m)
    return module


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
            for m, go in zip(mods, outs, strict=True):
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
        # Fisher scores never need other ranks' statistics (each sample alone, or running
        # statistics): plain BatchNorm, no collective (data-parallel trials)
        return local_batchnorm_(work).train(bn == "per_sample")

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
    return [r.detach().to(p.device) for r, p in zip(result, originals, strict=True)]
