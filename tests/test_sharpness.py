"""Sharpness diagnostics (method/sharpness.py) against the exact dense Hessian of a tiny
seeded model in float64: Lanczos' top eigenvalues to 1e-6 relative, Hutchinson's trace
within its own error bars, the model left as found."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssam_tune.method.sharpness import hessian_trace, hvp, sharpness, top_eigenvalues


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(24, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (24,))
    batches = [(x[:10], y[:10]), (x[10:], y[10:])]  # two batches: the mean over both
    return model, batches, x, y


def _dense_hessian(model, x, y) -> torch.Tensor:
    params = list(model.parameters())
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]

    def loss(flat):
        chunks = torch.split(flat, sizes)
        ws = {name: c.view(s) for (name, _), c, s in zip(model.named_parameters(), chunks, shapes, strict=True)}
        return F.cross_entropy(torch.func.functional_call(model, ws, (x,)), y)

    flat = torch.cat([p.detach().reshape(-1) for p in params])
    return torch.autograd.functional.hessian(loss, flat)


def test_hvp_and_eigenvalues_match_the_dense_hessian():
    model, batches, x, y = _setup()
    h = _dense_hessian(model, x, y)
    v = torch.randn(h.shape[0], dtype=torch.float64)
    torch.testing.assert_close(hvp(model, batches, v), h @ v, rtol=1e-10, atol=1e-12)
    exact = torch.linalg.eigvalsh(h).flip(0)
    got = top_eigenvalues(model, batches, k=5, iters=h.shape[0])
    for a, b in zip(got, exact[:5].tolist(), strict=True):
        assert abs(a - b) <= 1e-6 * abs(exact[0].item()), (got, exact[:5])


def test_hutchinson_trace_and_the_summary():
    model, batches, x, y = _setup()
    exact = torch.trace(_dense_hessian(model, x, y)).item()
    before = [p.detach().clone() for p in model.parameters()]
    model.train()
    trace, err = hessian_trace(model, batches, samples=400, seed=3)
    assert err > 0 and abs(trace - exact) <= 4 * err, (trace, err, exact)
    s = sharpness(model, batches, k=5, iters=20, trace_samples=50)
    assert s["lambda_max"] == s["eigenvalues"][0] and s["lambda_5"] == s["eigenvalues"][4]
    assert s["lambda_max_over_lambda_5"] == s["lambda_max"] / s["lambda_5"]
    assert model.training and all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
