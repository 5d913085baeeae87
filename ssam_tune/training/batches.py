"""Batches of an in-memory split: seeded shuffling, the CIFAR augmentation on the training
device, normalisation, and the un-augmented Fisher sample.

Every batch is augmented with vectorised tensor operations (pad-and-crop, flip, cutout) on
whatever device the split lives on, which is much faster than per-image PIL transforms in
DataLoader workers. All randomness comes from an explicit ``torch.Generator``, so a training
run checkpoints and restores its data order and augmentations with the model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ssam_tune.training.data import CIFAR10_MEAN, CIFAR10_STD, Split

__all__ = ["Batches", "augment_batch", "iterate_batches", "normalize_batch", "sample_for_fisher"]


# --------------------------------------------------------------------------- augmentation

def _norm_constants(mean: Sequence[float], std: Sequence[float], device: torch.device,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # (x / 255 - mean) / std == x * scale - shift: one multiply and one subtract.
    mean_t = torch.tensor(mean, dtype=torch.float64)
    std_t = torch.tensor(std, dtype=torch.float64)
    scale = (1.0 / (255.0 * std_t)).to(device=device, dtype=dtype).view(1, -1, 1, 1)
    shift = (mean_t / std_t).to(device=device, dtype=dtype).view(1, -1, 1, 1)
    return scale, shift


def _to_float(images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
              normalize: bool, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    if images.is_floating_point():  # a user's samples (training/user_code.py): used as given
        return images.to(dtype=dtype, copy=True)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    # The dtype cast and the layout change happen in a single copy.
    x = images.to(dtype=dtype, memory_format=fmt)
    if normalize:
        scale, shift = _norm_constants(mean, std, x.device, dtype)
        x.mul_(scale).sub_(shift)
    else:
        x.div_(255.0)
    return x


def normalize_batch(images: torch.Tensor, mean: Sequence[float], std: Sequence[float], *,
                    dtype: torch.dtype = torch.float32,
                    channels_last: bool = False) -> torch.Tensor:
    """uint8 ``N x C x H x W`` -> normalised float ``(x / 255 - mean) / std`` (evaluation);
    floating-point samples are only cast to ``dtype``."""
    return _to_float(images, mean, std, True, dtype, channels_last)


def augment_batch(images: torch.Tensor, generator: torch.Generator, *,
                  mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD,
                  padding: int = 4, flip: bool = True, cutout: int = 16,
                  normalize: bool = True, dtype: torch.dtype = torch.float32,
                  channels_last: bool = False) -> torch.Tensor:
    """The CIFAR training augmentation of the SAM/SSAM papers, for a whole uint8 batch.

    Per image, in this order: random crop of the original size from the image zero-padded
    by ``padding`` pixels (torchvision ``RandomCrop(32, padding=4)``), horizontal flip
    with probability 0.5, ``(x / 255 - mean) / std``, and cutout (DeVries & Taylor, 2017):
    a ``cutout x cutout`` square whose centre is uniform over the image, clipped at the
    borders, set to 0 after normalisation. ``normalize=False`` gives ``x / 255`` instead
    (cutout still writes 0), which tests use to see raw pixels.

    Works on the images' device, with no Python loop over images. All random numbers are
    drawn from ``generator`` in one call (on its own device, then moved), so one
    checkpointed generator state reproduces the batch exactly. Returns a new ``dtype``
    tensor.
    """
    n, c, h, w = images.shape
    dev = images.device
    # All random numbers of the batch in one draw and one host-to-device copy (the
    # generator may live on the CPU while the images are on the GPU). float64 keeps
    # floor(u * high) strictly below high.
    u = torch.rand(5, n, generator=generator, device=generator.device,
                   dtype=torch.float64).to(dev)

    def draw(row: int, high: int) -> torch.Tensor:
        return (u[row] * high).long()

    dy, dx = draw(0, 2 * padding + 1), draw(1, 2 * padding + 1)
    padded = F.pad(images, (padding,) * 4) if padding else images
    wp = w + 2 * padding
    cols = torch.arange(w, device=dev).expand(n, w)
    if flip:
        # Flipping the crop equals reading its columns right to left, so the flip costs
        # nothing extra: it is folded into the gather index below.
        flipped = draw(2, 2).bool()
        cols = torch.where(flipped[:, None], w - 1 - cols, cols)
    rows = dy[:, None] + torch.arange(h, device=dev)
    cols = dx[:, None] + cols
    # One gather over flattened pixels (index = row * padded width + col), shared by the
    # channels; several times faster than 4-d advanced indexing.
    index = (rows[:, :, None] * wp + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    crops = padded.reshape(n, c, -1).gather(2, index).view(n, c, h, w)

    x = _to_float(crops, mean, std, normalize, dtype, channels_last)
    if cutout > 0:
        top = draw(3, h) - cutout // 2
        left = draw(4, w) - cutout // 2
        r = torch.arange(h, device=dev)
        q = torch.arange(w, device=dev)
        in_rows = (r >= top[:, None]) & (r < top[:, None] + cutout)     # N x H
        in_cols = (q >= left[:, None]) & (q < left[:, None] + cutout)   # N x W
        x.masked_fill_((in_rows[:, :, None] & in_cols[:, None, :])[:, None], 0.0)
    return x


# --------------------------------------------------------------------------- batches

def _num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)


class Batches:
    """Re-iterable batches ``(x, y)`` over an in-memory split; see ``iterate_batches``.

    Every ``iter()`` is one epoch: it draws a fresh permutation (if ``shuffle``) and fresh
    augmentations from the generator. ``len()`` is the number of batches per epoch.
    """

    def __init__(self, split: Split, batch_size: int, *, shuffle: bool = False,
                 generator: torch.Generator | None = None, augment: bool = False,
                 drop_last: bool = False, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32, channels_last: bool = False,
                 padding: int = 4, cutout: int = 16) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if (shuffle or augment) and generator is None:
            # No hidden global RNG: the caller owns (and checkpoints) the generator.
            raise ValueError("shuffle/augment need an explicit torch.Generator")
        self.split, self.batch_size = split, batch_size
        self.shuffle, self.generator, self.augment = shuffle, generator, augment
        self.drop_last, self.device = drop_last, device
        self.dtype, self.channels_last = dtype, channels_last
        self.padding, self.cutout = padding, cutout

    def __len__(self) -> int:
        return _num_batches(len(self.split), self.batch_size, self.drop_last)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        split, bs = self.split, self.batch_size
        n = len(split)
        order = None
        if self.shuffle:
            gen = self.generator
            order = torch.randperm(n, generator=gen, device=gen.device).to(split.device)
        for b in range(len(self)):
            lo, hi = b * bs, min(n, (b + 1) * bs)
            if order is None:
                x, y = split.images[lo:hi], split.labels[lo:hi]
            else:
                idx = order[lo:hi]
                x, y = split.images[idx], split.labels[idx]
            if self.device is not None:
                # Only the uint8 batch crosses to the device; augmenting there is cheap.
                x = x.to(self.device, non_blocking=True)
                y = y.to(self.device, non_blocking=True)
            if self.augment:
                x = augment_batch(x, self.generator, mean=split.mean, std=split.std,
                                  padding=self.padding, cutout=self.cutout,
                                  dtype=self.dtype, channels_last=self.channels_last)
            else:
                x = normalize_batch(x, split.mean, split.std, dtype=self.dtype,
                                    channels_last=self.channels_last)
            yield x, y


def iterate_batches(split: Split, batch_size: int, *, shuffle: bool = False,
                    generator: torch.Generator | None = None, augment: bool = False,
                    drop_last: bool = False, device: torch.device | str | None = None,
                    **kwargs: Any) -> Batches:
    """Batches ``(x, y)`` of a split: float ``x`` (augmented if ``augment``, else only
    normalised) and int64 ``y``.

    The order is shuffled from ``generator`` when ``shuffle``; ``generator`` is required
    for ``shuffle`` or ``augment``. ``device`` moves each uint8 batch there before
    augmenting; faster still is ``split.to(device)`` once and ``device=None``. Extra
    keywords (``dtype``, ``channels_last``, ``padding``, ``cutout``) go to ``Batches``.
    """
    return Batches(split, batch_size, shuffle=shuffle, generator=generator,
                   augment=augment, drop_last=drop_last, device=device, **kwargs)


def sample_for_fisher(train_split: Split, n: int, generator: torch.Generator, *,
                      dtype: torch.dtype = torch.float32
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` distinct training samples (all of them if fewer), normalised, not augmented.

    Used by SSAM-F to estimate Fisher information; the seeded generator makes the sample
    reproducible. Returns ``(x, y)`` on the split's device.
    """
    size = len(train_split)
    perm = torch.randperm(size, generator=generator, device=generator.device)
    idx = perm[:min(n, size)].to(train_split.device)
    x = normalize_batch(train_split.images[idx], train_split.mean, train_split.std,
                        dtype=dtype)
    return x, train_split.labels[idx]
