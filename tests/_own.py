"""A user's own models and data sets, as the tests of tests/test_own.py name them by import
string (``_own:mlp``): what the project did not write. Bad ones too, for the error messages."""

from __future__ import annotations

import torch
from torch import nn


# -- models: function(num_classes=..., input_shape=..., **kwargs) -> nn.Module ---------------------
def mlp(num_classes, input_shape, hidden=16):
    """LayerNorm, no BatchNorm (per-layer Fisher does not know LayerNorm: the vmap path)."""
    d = int(torch.tensor(input_shape).prod())
    return nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.LayerNorm(hidden), nn.Tanh(),
                         nn.Linear(hidden, num_classes))


class _Scale(nn.Module):
    """A layer of its own: a learned per-channel scale (a parameter outside Linear/Conv2d/BN)."""

    def __init__(self, channels):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels, 1, 1))

    def forward(self, x):
        return x * self.weight


def gn_cnn(num_classes, input_shape, channels=8):
    """Images: a conv net with GroupNorm and a layer of its own."""
    c = input_shape[0]
    return nn.Sequential(nn.Conv2d(c, channels, 3, padding=1), nn.GroupNorm(2, channels), _Scale(channels), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * channels, num_classes))


def no_norm(num_classes, input_shape):
    return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(input_shape).prod()), num_classes))


def no_input_shape(num_classes):  # the wrong signature
    return nn.Linear(8, num_classes)


def wrong_columns(num_classes, input_shape):
    return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(input_shape).prod()), num_classes + 1))


def not_a_module(num_classes, input_shape):
    return "a string"


NOT_CALLABLE = 3


# -- data: function(**kwargs) -> (train, test) ---------------------------------------------------------
def blobs(n=240, dim=8, k=3, seed=0):
    """Float features: k Gaussian clusters in ``dim`` dimensions."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, dim, generator=g) * 3
    y = torch.arange(n) % k
    x = centers[y] + torch.randn(n, dim, generator=g)
    cut = n * 4 // 5
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


def images(n=200, seed=0):
    """uint8 3 x 8 x 8 images of 4 classes (a class is a bright quadrant), as a mapping."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = torch.randint(0, 100, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
    for i, c in enumerate(y.tolist()):
        r, s = divmod(c, 2)
        x[i, :, 4 * r:4 * r + 4, 4 * s:4 * s + 4] += 120
    return {"train": (x[:160], y[:160]), "test": (x[160:], y[160:]), "classes": ["nw", "ne", "sw", "se"]}


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def blobs_datasets(**kw):
    """The blobs as torch Datasets of (x, y) samples."""
    (x, y), (xt, yt) = blobs(**kw)
    return _Pairs(x, y), _Pairs(xt, yt)


def wrong_type():
    return "not data"


def bad_labels():
    x = torch.randn(10, 4)
    return {"train": (x, torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 1])), "test": (x, torch.zeros(10, dtype=torch.long)),
            "classes": ["a", "b", "c"]}


def raises():
    raise RuntimeError("no data here: mount /data first")
