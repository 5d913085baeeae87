"""Throughput of the in-memory tensor augmentation versus a PIL DataLoader, on CPU.

Both pipelines apply the same CIFAR recipe to the same images (the embedded train set,
5,000 images, val_fraction 0): random crop 32 with 4-pixel zero padding, horizontal flip,
normalisation, 16 px cutout; one epoch in shuffled batches of 128. The tensor pipeline
is ``ssam_tune.training.data.iterate_batches(..., augment=True)``; the baseline is a torchvision
``DataLoader`` with PIL transforms in worker processes, the usual CIFAR training setup.

Usage: python benchmarks/bench_data.py [--epochs 5] [--workers 2] > benchmarks/bench_data.txt
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _common import header
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from ssam_tune.training import batches as B
from ssam_tune.training import data as D

NAME = Path(__file__).stem
BATCH = 128


class Cutout:
    """Zero a 16x16 square (centre uniform, clipped) of a normalised C x H x W tensor."""

    def __init__(self, length: int = 16) -> None:
        self.length = length

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[1:]
        cy, cx = torch.randint(h, ()).item(), torch.randint(w, ()).item()
        half = self.length // 2
        x[:, max(0, cy - half):min(h, cy + half), max(0, cx - half):min(w, cx + half)] = 0
        return x


class PILImages(Dataset):
    """Images as N x H x W x C numpy, converted to PIL per item (as torchvision's CIFAR10)."""

    def __init__(self, split: D.Split, transform: T.Compose) -> None:
        self.images = split.images.permute(0, 2, 3, 1).contiguous().numpy()
        self.labels = split.labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def time_epochs(make_epoch, epochs: int) -> list[float]:
    """Images/s of each timed epoch, after one untimed warm-up epoch."""
    rates = []
    for e in range(epochs + 1):
        start = time.perf_counter()
        n = sum(len(y) for _, y in make_epoch())
        if e:
            rates.append(n / (time.perf_counter() - start))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    header(print, NAME)
    train = D.load_dataset("embedded", val_fraction=0.0).train
    print(f"# CIFAR augmentation throughput, CPU only, batch {BATCH}, "
          f"{len(train)} embedded train images per epoch, median of {args.epochs} epochs "
          f"after 1 warm-up")

    gen = torch.Generator().manual_seed(0)
    results = {}
    threads = torch.get_num_threads()
    for n_threads in sorted({1, threads}):
        torch.set_num_threads(n_threads)
        rates = time_epochs(lambda: B.iterate_batches(train, BATCH, shuffle=True,
                                                      generator=gen, augment=True),
                            args.epochs)
        results[f"tensor pipeline, {n_threads} torch thread(s)"] = statistics.median(rates)
    torch.set_num_threads(threads)

    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(),
                           T.ToTensor(), T.Normalize(D.CIFAR10_MEAN, D.CIFAR10_STD),
                           Cutout(16)])
    loader = DataLoader(PILImages(train, transform), batch_size=BATCH, shuffle=True,
                        num_workers=args.workers, persistent_workers=args.workers > 0,
                        generator=torch.Generator().manual_seed(0))
    baseline_name = f"PIL DataLoader, num_workers={args.workers}"
    results[baseline_name] = statistics.median(time_epochs(lambda: loader, args.epochs))

    baseline = results[baseline_name]
    for name, rate in results.items():
        print(f"{name:<40s} {rate:>10,.0f} images/s   {rate / baseline:5.1f}x")
    best = max(v for k, v in results.items() if k.startswith("tensor"))
    print(f"ratio (best tensor pipeline / PIL DataLoader): {best / baseline:.1f}x "
          f"(target >= 3x)")


if __name__ == "__main__":
    main()
