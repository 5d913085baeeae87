"""The sharpness of a trained model: the top eigenvalues and the trace of the Hessian of the
training loss, from Hessian-vector products (the paper's argument is through the Hessian
spectrum: SSAM reaches a flatter minimum than SGD, comparable to SAM).

- :func:`top_eigenvalues`: Lanczos with full re-orthogonalisation on Hessian-vector
  products; the largest ``k`` eigenvalues (``lambda_max`` first).
- :func:`hessian_trace`: Hutchinson's estimator, the mean of ``v' H v`` over seeded
  Rademacher vectors ``v``.

The loss is the mean cross-entropy over ``batches`` (a fixed list of ``(x, y)``, so every
product sees the same function). The model should be in eval mode (BatchNorm with its
running statistics: a fixed function of the weights); it is not changed. Each product is one
double backward through the batches (``torch.autograd.grad`` with ``create_graph``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["hessian_trace", "hvp", "sharpness", "top_eigenvalues"]


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def hvp(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], v: torch.Tensor) -> torch.Tensor:
    """H v for the mean cross-entropy over ``batches`` (``v`` and the result flat, in
    ``model.parameters()`` order of the parameters that require gradients)."""
    params = _params(model)
    n = sum(int(y.shape[0]) for _, y in batches)
    out = torch.zeros_like(v)
    for x, y in batches:
        loss = F.cross_entropy(model(x), y, reduction="sum") / n
        grads = torch.autograd.grad(loss, params, create_graph=True)
        flat = torch.cat([g.reshape(-1) for g in grads])
        hv = torch.autograd.grad((flat * v).sum(), params, allow_unused=True)  # d(g . v)/dw = H v
        out += torch.cat([(h if h is not None else torch.zeros_like(p)).reshape(-1)
                          for h, p in zip(hv, params, strict=True)])
    return out


def top_eigenvalues(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], k: int = 5,
                    iters: int = 30, seed: int = 0) -> list[float]:
    """The ``k`` largest eigenvalues of the Hessian, largest first: Lanczos for ``iters``
    steps (at most the number of parameters) with full re-orthogonalisation, from a seeded
    random start; the Ritz values of the tridiagonal matrix."""
    params = _params(model)
    d = sum(p.numel() for p in params)
    dtype, device = params[0].dtype, params[0].device
    steps = max(k, min(iters, d))
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(d, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    q /= q.norm()
    basis = [q]
    alphas, betas = [], []
    for j in range(steps):
        w = hvp(model, batches, basis[j])
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
                  seed: int = 0) -> tuple[float, float]:
    """Hutchinson's estimate of tr(H) and its standard error: the mean and the standard error
    of ``v' H v`` over ``samples`` seeded Rademacher vectors."""
    params = _params(model)
    d = sum(p.numel() for p in params)
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(samples):
        v = (torch.randint(0, 2, (d,), generator=gen) * 2 - 1).to(device=params[0].device, dtype=params[0].dtype)
        values.append(float(torch.dot(v, hvp(model, batches, v))))
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
        eig = top_eigenvalues(model, batches, k=k, iters=iters, seed=seed)
        trace, err = hessian_trace(model, batches, samples=trace_samples, seed=seed + 1)
    finally:
        model.train(was)
    return {"lambda_max": eig[0], f"lambda_{k}": eig[-1],
            f"lambda_max_over_lambda_{k}": eig[0] / eig[-1] if eig[-1] else math.inf,
            "eigenvalues": eig, "trace": trace, "trace_stderr": err}
