"""A generated data set, so the example runs offline: 16 x 16 grey images of stripes in one of
four orientations (the classes), at a random phase and period, under pixel noise."""

from __future__ import annotations

import math

import torch

CLASSES = ["horizontal", "vertical", "diagonal", "anti-diagonal"]


def _images(n: int, size: int, noise: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.arange(n) % len(CLASSES)
    period = 3.0 + 3.0 * torch.rand(n, 1, 1, generator=generator, dtype=torch.float64)
    phase = 2 * math.pi * torch.rand(n, 1, 1, generator=generator, dtype=torch.float64)
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                            indexing="ij")
    # each class's stripe normal (x, y), in the order of CLASSES
    normal = {0: (0.0, 1.0), 1: (1.0, 0.0), 2: (1.0, 1.0), 3: (1.0, -1.0)}
    nx = torch.tensor([normal[int(c)][0] for c in labels], dtype=torch.float64)[:, None, None]
    ny = torch.tensor([normal[int(c)][1] for c in labels], dtype=torch.float64)[:, None, None]
    wave = torch.sin(2 * math.pi * (nx * xs + ny * ys) / period + phase)
    pixels = 0.5 + 0.35 * wave + noise * torch.randn(n, size, size, generator=generator, dtype=torch.float64)
    images = (pixels.clamp(0, 1) * 255).round().to(torch.uint8)[:, None]  # N x 1 x H x W
    return images, labels


def stripes(n_train: int = 2000, n_test: int = 500, size: int = 16, noise: float = 0.6, seed: int = 0) -> dict:
    """What ``data.name: own_model.stripes:stripes`` loads; ``data.kwargs`` sets the arguments.
    The data set is fixed by ``seed`` (the run's seed splits and shuffles it)."""
    g = torch.Generator().manual_seed(seed)
    train = _images(n_train, size, noise, g)
    test = _images(n_test, size, noise, g)
    return {"train": train, "test": test, "classes": CLASSES}
