"""A small MLP-Mixer (Tolstikhin et al., 2021): patches, then blocks that mix across patches and
across channels, each behind a LayerNorm. It has no BatchNorm, so SAM-ON perturbs its LayerNorms."""

from __future__ import annotations

from torch import nn


class _MixerBlock(nn.Module):
    def __init__(self, patches: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.tokens = nn.Sequential(nn.Linear(patches, hidden), nn.GELU(), nn.Linear(hidden, patches))
        self.norm2 = nn.LayerNorm(dim)
        self.channels = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):  # x: N x patches x dim
        x = x + self.tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channels(self.norm2(x))


class Mixer(nn.Module):
    def __init__(self, num_classes: int, input_shape: tuple[int, int, int], patch: int, dim: int, depth: int,
                 hidden: int) -> None:
        super().__init__()
        channels, height, width = input_shape
        if height % patch or width % patch:
            raise ValueError(f"patch {patch} must divide the image size {height} x {width}")
        patches = (height // patch) * (width // patch)
        self.embed = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)
        self.blocks = nn.Sequential(*(_MixerBlock(patches, dim, hidden) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)  # N x patches x dim
        return self.head(self.norm(self.blocks(x)).mean(dim=1))


def mixer(num_classes: int, input_shape: tuple[int, int, int], patch: int = 4, dim: int = 32, depth: int = 2,
          hidden: int = 64) -> nn.Module:
    """What ``model.name: own_model.mixer:mixer`` builds; ``model.kwargs`` sets the rest."""
    return Mixer(num_classes, input_shape, patch, dim, depth, hidden)
