"""The sharpness of a trained model: the top eigenvalues and the trace of the Hessian of the
training loss, from Hessian-vector products (the paper's argument is through the Hessian
spectrum: SSAM reaches a flatter minimum than SGD, comparable to SAM).

- :func:`top_eigenvalues`: Lanczos with full re-orthogonalisation on Hessian-vector
  products; the largest ``k`` eigenvalues (``lambda_max`` first).
- :func:`hessian_trace`: Hutchinson's estimator, the mean of ``v' H v`` over seeded
  Rademacher vectors ``v``.

The loss is the mean cross-entropy over ``batches`` (a fixed list of ``(x, y)``, so every
product sees the same function). The model should be in eval mode (BatchNorm with its
running statistics: a fixed function of the weights); it is not changed. :class:`Hessian`
builds each batch's forward pass and gradient graph once (``create_graph``) and keeps them, so
each product is one backward through those graphs (double backward) and nothing more; the
price is holding every batch's graph at once (a few GB for 1,000 CIFAR images on ResNet-18 at
width 0.25; pass fewer samples where memory is short).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Hessian", "hessian_trace", "hvp", "sharpness", "top_eigenvalues"]


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


class Hessian:
    """``v -> H v`` for the mean cross-entropy over ``batches`` (``v`` and the result flat, in
    ``model.parameters()`` order of the parameters that require gradients). The gradient g of
    each batch is computed once with its graph kept; a product is then d(g . v)/dw, one
    backward through that graph per batch (module doc: the memory this holds)."""

    def __init__(self, model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.params = _params(model)
        n = sum(int(y.shape[0]) for _, y in batches)
        self.grads = []
        for x, y in batches:
            loss = F.cross_entropy(model(x), y, reduction="sum") / n
            grads = torch.autograd.grad(loss, self.params, create_graph=True)
            self.grads.append(torch.cat([g.reshape(-1) for g in grads]))

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(v)
        for flat in self.grads:
            hv = torch.autograd.grad(flat, self.params, grad_outputs=v, retain_graph=True, allow_unused=True)
            out += torch.cat([(h if h is not None else torch.zeros_like(p)).reshape(-1)
                              for h, p in zip(hv, self.params, strict=True)])
        return out


def hvp(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], v: torch.Tensor) -> torch.Tensor:
    """H v once (:class:`Hessian` keeps the graphs for many products)."""
    return Hessian(model, batches)(v)


def top_eigenvalues(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], k: int = 5,
                    iters: int = 30, seed: int = 0, hessian: Hessian | None = None) -> list[float]:
    """The ``k`` largest eigenvalues of the Hessian, largest first: Lanczos for ``iters``
    steps (at most the number of parameters) with full re-orthogonalisation, from a seeded
    random start; the Ritz values of the tridiagonal matrix. ``hessian``: the operator of
    ``model`` and ``batches`` if built already."""
    hessian = hessian or Hessian(model, batches)
    params = hessian.params
    d = sum(p.numel() for p in params)
    dtype, device = params[0].dtype, params[0].device
    steps = max(k, min(iters, d))
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(d, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    q /= q.norm()
    basis = [q]
    alphas, betas = [], []
    for j in range(steps):
        w = hessian(basis[j])
        alpha = torch.dot(w, basis[j])
        alphas.append(float(alpha))
        w = w - alpha * basis[j] - (betas[-1] * basis[j - 1] if j else 0)
        for b in basis:  # full re-orthogonalisation (twice is enough): no ghost eigenvalues
            w = w - torch.dot(w, b) * b
        for b in basis:
            w = w - torch.dot(w, b) * b
        beta = float(w.norm())
        if j == steps - 1 or beta < 1e-10 * max(1.0, abs(alphas[-1])):
            break
        betas.append(beta)
        basis.append(w / beta)
    m = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    for i, b in enumerate(betas[:m - 1]):
        t[i, i + 1] = t[i + 1, i] = b
    ritz = torch.linalg.eigvalsh(t).flip(0)
    return [float(v) for v in ritz[:k]]


def hessian_trace(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], samples: int = 100,
                  seed: int = 0, hessian: Hessian | None = None) -> tuple[float, float]:
    """Hutchinson's estimate of tr(H) and its standard error: the mean and the standard error
    of ``v' H v`` over ``samples`` seeded Rademacher vectors."""
    hessian = hessian or Hessian(model, batches)
    params = hessian.params
    d = sum(p.numel() for p in params)
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(samples):
        v = (torch.randint(0, 2, (d,), generator=gen) * 2 - 1).to(device=params[0].device, dtype=params[0].dtype)
        values.append(float(torch.dot(v, hessian(v))))
    mean = sum(values) / len(values)
    var = sum((x - mean) ** 2 for x in values) / max(1, len(values) - 1)
    return mean, math.sqrt(var / len(values))


def sharpness(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], *, k: int = 5,
              iters: int = 30, trace_samples: int = 30, seed: int = 0) -> dict:
    """``lambda_max``, ``lambda_k`` (the k-th largest), their ratio, and Hutchinson's trace
    (with its standard error) of the model in eval mode (restored afterwards)."""
    was = model.training
    model.eval()
    try:
        hessian = Hessian(model, batches)  # one set of graphs for every product
        eig = top_eigenvalues(model, batches, k=k, iters=iters, seed=seed, hessian=hessian)
        trace, err = hessian_trace(model, batches, samples=trace_samples, seed=seed + 1, hessian=hessian)
        del hessian
    finally:
        model.train(was)
    return {"lambda_max": eig[0], f"lambda_{k}": eig[-1],
            f"lambda_max_over_lambda_{k}": eig[0] / eig[-1] if eig[-1] else math.inf,
            "eigenvalues": eig, "trace": trace, "trace_stderr": err}
