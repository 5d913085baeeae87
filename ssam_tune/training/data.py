"""Data sets and their train/val/test splits (batches and augmentation: :mod:`ssam_tune.training.batches`).

Small-image data sets (the packaged ``embedded`` CIFAR-10 subset, CIFAR-10/100 and
image folders of images up to 64 px) are held whole in memory as one uint8 tensor
(``Split``). They can be moved to the GPU once, and every batch is augmented there with
vectorised tensor operations (``batches.augment_batch``), which is much faster than per-image PIL
transforms in DataLoader workers. All randomness comes from an explicit
``torch.Generator`` so that a training run can checkpoint and restore its data order and
augmentations together with the model.

Large images (ImageNet layout) use the standard torchvision ``ImageFolder`` + ``DataLoader``
path with the usual ImageNet recipe (``make_dataloader``).

Protocol: hyper-parameter search and model selection read the validation split, which is
carved out of the training set with a fixed seed (``split_train_val``). The test split is
only reported, never used to choose anything.

Importing this module has no side effects; torchvision and filelock are imported when
first needed.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from ssam_tune.training.config import ConfigError
from ssam_tune.training.user_code import call, is_import_string

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Data",
    "DataError",
    "Split",
    "add_label_noise",
    "load_dataset",
    "make_dataloader",
    "split_train_val",
    "stratified_indices",
]

DATASETS = ("embedded", "cifar10", "cifar100", "imagefolder")

# Per-channel statistics of the training sets (pixel values scaled to [0, 1]).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Images up to this side length are loaded into memory and get the CIFAR recipe by default.
SMALL_IMAGE_MAX = 64
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# ssam_tune/_data/, at the package root (package data), one folder above this module
EMBEDDED_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_data",
                             "cifar10_subset.pt")

_TORCHVISION_CIFAR = {
    # name: (torchvision class name, folder the extracted python archive creates, archive)
    "cifar10": ("CIFAR10", "cifar-10-batches-py", "cifar-10-python.tar.gz"),
    "cifar100": ("CIFAR100", "cifar-100-python", "cifar-100-python.tar.gz"),
}


class DataError(ValueError):
    """A data set cannot be found, read or downloaded; the message says where it must be."""


@dataclass
class Split:
    """One whole split of a small-image data set, held in memory.

    ``images`` is uint8 ``N x 3 x H x W`` (raw pixels, so the set stays 4x smaller than
    float and can live on the GPU), ``labels`` int64 ``N``. ``mean``/``std`` are the
    normalisation statistics of the data set, carried along so that batch iterators and
    ``sample_for_fisher`` need no extra arguments.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...] = CIFAR10_MEAN
    std: tuple[float, ...] = CIFAR10_STD

    def __post_init__(self) -> None:
        # a user's data set (training/user_code.py) may hold floating-point samples of any shape
        if not (self.is_image or (self.images.is_floating_point() and self.images.dim() >= 2)):
            raise ValueError(f"images must be uint8 N x C x H x W (or floating N x ...), got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(f"labels must be int64 of shape ({self.images.shape[0]},), got "
                             f"{self.labels.dtype} {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def is_image(self) -> bool:
        """uint8 images (scaled, normalised, augmentable), not floating-point samples used as given."""
        return self.images.dtype == torch.uint8 and self.images.dim() == 4

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device: torch.device | str) -> Split:
        """Copy of the split on ``device`` (do this once, not per batch)."""
        return Split(self.images.to(device), self.labels.to(device), self.classes,
                     self.mean, self.std)

    def subset(self, index: torch.Tensor) -> Split:
        """The images at ``index`` (an index tensor), as a new split."""
        index = index.to(self.images.device)
        return Split(self.images[index], self.labels[index], self.classes, self.mean,
                     self.std)


@dataclass
class Data:
    """The result of ``load_dataset``: three splits plus what a model needs to know.

    ``train``/``val``/``test`` are ``Split`` objects when ``in_memory`` (augment
    ``"cifar"``), else torchvision data sets with their transforms attached (augment
    ``"imagenet"``; iterate them with ``make_dataloader``). ``image_size`` is the side
    length of the model input.
    """

    name: str
    train: Any
    val: Any
    test: Any
    classes: list[str]
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_memory(self) -> bool:
        return isinstance(self.train, Split)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one model input (what a model's ``input_shape`` and FLOPs counts use)."""
        if self.in_memory:
            return tuple(int(v) for v in self.train.images.shape[1:])
        return (3, self.image_size, self.image_size)


# --------------------------------------------------------------------------- splits

def stratified_indices(labels: torch.Tensor, fraction: float, seed: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded, class-stratified split of ``range(len(labels))`` into (keep, held_out).

    Each class gives ``round(fraction * count)`` of its members, chosen at random, to the
    held-out part, so validation keeps the class balance. Both index tensors are sorted;
    they are disjoint and together cover every index. Depends only on labels and seed.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {fraction}")
    labels = labels.cpu()
    n = labels.numel()
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    # A stable sort by label of a random permutation: classes in blocks, random inside.
    order = perm[torch.argsort(labels[perm], stable=True)]
    counts = torch.bincount(labels, minlength=int(labels.max()) + 1 if n else 0)
    starts = torch.cumsum(counts, 0) - counts
    sorted_labels = labels[order]
    rank = torch.arange(n) - starts[sorted_labels]
    n_held = torch.round(counts.double() * fraction).long()
    held = rank < n_held[sorted_labels]
    return order[~held].sort().values, order[held].sort().values


def split_train_val(train: Split, val_fraction: float, seed: int) -> tuple[Split, Split]:
    """Carve a seeded, stratified validation split out of ``train``.

    ``val_fraction=0`` gives an empty validation split (the model is then selected on
    nothing, e.g. for a final retrain on train+val).
    """
    keep, held = stratified_indices(train.labels, val_fraction, seed)
    return train.subset(keep), train.subset(held)


# Offset of the label-noise stream from the run seed, so that the flips are not drawn from
# the same generator state as the validation split (``stratified_indices`` uses the seed).
_LABEL_NOISE_STREAM = 7919


def add_label_noise(split: Split, fraction: float, seed: int) -> Split:
    """A copy of ``split`` with ``round(fraction * len(split))`` labels replaced by a
    uniformly random OTHER class (symmetric label noise), for training splits only.

    Which images are flipped and their new classes come from one generator seeded from
    ``seed``: the same seed gives the same flips. ``fraction=0`` returns ``split`` itself.
    Images, classes and statistics are shared with ``split``; only the labels are new.
    """
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"label_noise must be in [0, 1), got {fraction}")
    n = len(split)
    k = round(fraction * n)
    if k == 0:
        return split
    num_classes = len(split.classes)
    if num_classes < 2:
        raise DataError("label_noise needs at least 2 classes")
    gen = torch.Generator().manual_seed(seed + _LABEL_NOISE_STREAM)
    flip = torch.randperm(n, generator=gen)[:k]
    # An offset in 1 .. C-1 (mod C) is a uniform choice among the other C-1 classes.
    offset = torch.randint(1, num_classes, (k,), generator=gen)
    labels = split.labels.cpu().clone()
    labels[flip] = (labels[flip] + offset) % num_classes
    return Split(split.images, labels.to(split.labels.device), split.classes, split.mean, split.std)


# --------------------------------------------------------------------------- loading

def _default_root() -> str:
    return os.environ.get("SSAM_TUNE_DATA",
                          os.path.join(os.path.expanduser("~"), ".cache", "ssam_tune", "data"))


@contextlib.contextmanager
def _quiet_torchvision_io() -> Iterator[None]:
    # torchvision >= 0.29 warns on every decode call that its image codecs are deprecated
    # in favour of torchcodec; one warning per image floods logs and slows loading.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning,
                                message="The image decoding and encoding capabilities")
        yield


def _decode(blobs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Decode encoded images (JPEG byte tensors) into one uint8 N x 3 x H x W tensor."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not blobs:
        return torch.empty(0, 3, 0, 0, dtype=torch.uint8)
    # decode_jpeg takes a list; RGB mode also expands any grayscale file to 3 channels.
    with _quiet_torchvision_io():
        return torch.stack(decode_jpeg(list(blobs), mode=ImageReadMode.RGB))


def _load_embedded(path: str | None) -> tuple[Split, Split]:
    path = path or EMBEDDED_FILE
    if not os.path.isfile(path):
        raise DataError(f"embedded data file not found: {path} (reinstall ssam-tune or "
                        f"rebuild it with scripts/make_embedded_subset.py)")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    classes = list(blob["classes"])
    splits = []
    for name in ("train", "test"):
        offsets = blob[f"{name}_offsets"]
        # Views into the concatenated bytes, one per file: no copies before decoding.
        files = torch.tensor_split(blob[f"{name}_bytes"], offsets[1:-1])
        splits.append(Split(_decode(files), blob[f"{name}_labels"].long(), classes,
                            CIFAR10_MEAN, CIFAR10_STD))
    return splits[0], splits[1]


def _cifar_missing_message(name: str, root: str) -> str:
    _, folder, archive = _TORCHVISION_CIFAR[name]
    target = os.path.join(root, folder)
    return (f"{name} not found: expected the folder {target} (the python version of "
            f"the data set, extracted from {archive} of "
            f"https://www.cs.toronto.edu/~kriz/cifar.html). Place the extracted folder "
            f"there, or set download: true (needs network access) to fetch it into {root}.")


def _load_torchvision_cifar(name: str, root: str | None, download: bool
                            ) -> tuple[Split, Split]:
    import torchvision.datasets as tvd

    root = os.path.abspath(os.path.expanduser(root or _default_root()))
    cls = getattr(tvd, _TORCHVISION_CIFAR[name][0])
    try:
        if download:
            from filelock import FileLock

            os.makedirs(root, exist_ok=True)
            # Concurrent Ray Tune workers: the first downloads, the others wait and then
            # find verified files, so the archive is fetched once.
            with FileLock(os.path.join(root, f".{name}.download.lock")):
                train_set = cls(root, train=True, download=True)
                test_set = cls(root, train=False, download=True)
        else:
            train_set = cls(root, train=True, download=False)
            test_set = cls(root, train=False, download=False)
    except Exception as exc:  # missing, corrupt, or no network: say where the data goes
        reason = "download failed" if download else "files missing or corrupt"
        raise DataError(f"{_cifar_missing_message(name, root)} ({reason}: {exc})") from exc
    if name == "cifar10":
        mean, std = CIFAR10_MEAN, CIFAR10_STD
    else:
        mean, std = CIFAR100_MEAN, CIFAR100_STD

    def to_split(ds: Any) -> Split:
        # torchvision keeps N x H x W x C numpy uint8; the pipeline wants N x C x H x W.
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        return Split(images, torch.tensor(ds.targets, dtype=torch.int64), list(ds.classes),
                     mean, std)

    return to_split(train_set), to_split(test_set)


def _list_image_folder(folder: str, classes: list[str] | None
                       ) -> tuple[list[str], list[int], list[str]]:
    """Files and labels under ``folder/<class>/``; ``classes`` fixes the label order."""
    found = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if classes is None:
        classes = found
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise DataError(f"{folder} has class folders not in the training set: {unknown}")
    files, labels = [], []
    for name in found:
        label = classes.index(name)
        class_dir = os.path.join(folder, name)
        for fname in sorted(os.listdir(class_dir)):
            if fname.lower().endswith(IMAGE_EXTENSIONS):
                files.append(os.path.join(class_dir, fname))
                labels.append(label)
    return files, labels, classes


def _read_images(files: list[str], num_threads: int | None) -> torch.Tensor:
    """Read and decode files into uint8 N x 3 x H x W; every image must have one size."""
    from torchvision.io import ImageReadMode, decode_image, read_file

    def work(chunk: list[str]) -> torch.Tensor:
        images = [decode_image(read_file(f), mode=ImageReadMode.RGB) for f in chunk]
        shape = images[0].shape
        for f, im in zip(chunk, images, strict=True):
            if im.shape != shape:
                raise DataError(f"{f}: size {tuple(im.shape[1:])} differs from "
                                f"{tuple(shape[1:])}; in-memory data sets need one size")
        return torch.stack(images)

    if not files:
        return torch.empty(0, 3, 0, 0, dtype=torch.uint8)
    # Decoding releases the GIL, so threads use all cores without worker processes.
    chunks = [files[i:i + 512] for i in range(0, len(files), 512)]
    with _quiet_torchvision_io(), ThreadPoolExecutor(
            num_threads or min(8, os.cpu_count() or 1)) as pool:
        parts = list(pool.map(work, chunks))
    if len({p.shape[1:] for p in parts}) > 1:
        raise DataError(f"images under {os.path.dirname(os.path.dirname(files[0]))} "
                        f"differ in size; in-memory data sets need one size")
    return torch.cat(parts)


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units (chunked: low memory)."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for chunk in images.split(4096):
        x = chunk.double()
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(1e-12).sqrt()
    return tuple((mean / 255).tolist()), tuple((std / 255).tolist())


def _imagefolder_dirs(root: str | None) -> tuple[str, str]:
    if root is None:
        raise DataError("imagefolder needs root: a folder with train/<class>/ and "
                        "val/<class>/ (or test/<class>/) image folders")
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise DataError(f"imagefolder root {root} does not exist (expected "
                        f"{root}/train/<class>/*.jpg and {root}/val/ or {root}/test/)")
    train_dir = os.path.join(root, "train")
    if not os.path.isdir(train_dir):
        raise DataError(f"imagefolder: missing training folder {train_dir} (expected "
                        f"{train_dir}/<class>/*.jpg)")
    for name in ("val", "test"):
        if os.path.isdir(os.path.join(root, name)):
            return train_dir, os.path.join(root, name)
    raise DataError(f"imagefolder: missing evaluation folder {root}/val or {root}/test "
                    f"(class folders like {train_dir})")


def _first_image_size(train_dir: str) -> int:
    from torchvision.io import decode_image, read_file

    for entry in sorted(os.scandir(train_dir), key=lambda e: e.name):
        if entry.is_dir():
            for fname in sorted(os.listdir(entry.path)):
                if fname.lower().endswith(IMAGE_EXTENSIONS):
                    with _quiet_torchvision_io():
                        image = decode_image(read_file(os.path.join(entry.path, fname)))
                    return max(image.shape[1:])
    raise DataError(f"imagefolder: no images under {train_dir}/<class>/")


def _imagenet_transforms() -> tuple[Any, Any]:
    from torchvision import transforms as T

    norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    test = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), norm])
    return train, test


def _load_imagefolder_large(train_dir: str, eval_dir: str, val_fraction: float,
                            seed: int) -> Data:
    from torch.utils.data import Subset
    from torchvision.datasets import ImageFolder

    train_tf, test_tf = _imagenet_transforms()
    train_all = ImageFolder(train_dir, transform=train_tf)
    # Same files, evaluation transform: the validation part must not be augmented.
    train_eval = ImageFolder(train_dir, transform=test_tf)
    test = ImageFolder(eval_dir, transform=test_tf)
    if test.classes != train_all.classes:
        raise DataError(f"class folders of {eval_dir} differ from those of {train_dir}")
    keep, held = stratified_indices(torch.tensor(train_all.targets), val_fraction, seed)
    return Data("imagefolder", Subset(train_all, keep.tolist()),
                Subset(train_eval, held.tolist()), test, list(train_all.classes), 224,
                IMAGENET_MEAN, IMAGENET_STD, "imagenet")


def load_dataset(name: str = "embedded", root: str | None = None, download: bool = False,
                 val_fraction: float = 0.1, seed: int = 0, augment: str | None = None,
                 num_threads: int | None = None, label_noise: float = 0.0, kwargs: dict | None = None) -> Data:
    """Load a data set and split it into train / val / test.

    name:
        ``embedded`` (default, offline): the packaged 5,000 + 1,000 image CIFAR-10 subset;
        ``root``, if given, is another file in the same format.
        ``cifar10`` / ``cifar100``: torchvision's python version under ``root``
        (default ``$SSAM_TUNE_DATA`` or ``~/.cache/ssam_tune/data``); ``download=True``
        fetches it (once, under a file lock).
        ``imagefolder``: ``root/train/<class>/*`` and ``root/val/<class>/*`` (or ``test/``).
        ``package.module:function``: the user's data function, called with ``kwargs``
        (its protocol: training/user_code.py).
    val_fraction, seed:
        the validation split is this stratified fraction of the training set, chosen with
        ``seed`` (0 gives an empty validation split). For model selection; test is only
        reported.
    augment:
        ``cifar`` (in-memory ``Split``s, augmented per batch by ``iterate_batches``) or
        ``imagenet`` (torchvision ImageFolder with RandomResizedCrop/flip, Resize 256 +
        CenterCrop 224 for evaluation; use ``make_dataloader``). Default: ``cifar`` for
        images up to 64 px, else ``imagenet``. Only imagefolder accepts ``imagenet``.
    num_threads:
        decoding threads for in-memory image folders (default: up to 8, the CPU count).
    label_noise:
        this fraction of the TRAINING split's labels (after the validation split is carved
        out) is replaced by a uniformly random other class, seeded by ``seed``
        (``add_label_noise``); validation and test labels stay clean. In-memory data only.

    Raises ``DataError`` (a ``ValueError``) when the data is missing, naming the place
    it must be put.
    """
    user = is_import_string(name)
    if name not in DATASETS and not user:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}, or an import string "
                        "'package.module:function'")
    if augment not in (None, "cifar", "imagenet", "none"):
        raise DataError(f"augment must be 'cifar', 'imagenet' or 'none', got {augment!r}")
    if augment == "none":
        augment = None if not user else "none"
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not 0.0 <= label_noise < 1.0:
        raise DataError(f"label_noise must be in [0, 1), got {label_noise}")

    if user:
        train, test = _load_user(name, kwargs or {})
        if augment is None:
            small = train.is_image and train.images.shape[2] == train.images.shape[3] <= SMALL_IMAGE_MAX
            augment = "cifar" if small else "none"
        if augment == "imagenet" or (augment == "cifar" and not train.is_image):
            needs = "image files (imagefolder)" if augment == "imagenet" else "uint8 N x C x H x W images"
            raise ConfigError("data.augment", f"{augment!r} needs {needs}, and {name} gives "
                              f"{train.images.dtype} samples of shape {tuple(train.images.shape[1:])}; use none")
    elif name == "imagefolder":
        train_dir, eval_dir = _imagefolder_dirs(root)
        size = _first_image_size(train_dir)
        if augment is None:
            augment = "cifar" if size <= SMALL_IMAGE_MAX else "imagenet"
        if augment == "imagenet":
            if label_noise:
                raise DataError("label_noise applies to in-memory data sets only, not to "
                                "augment 'imagenet'")
            return _load_imagefolder_large(train_dir, eval_dir, val_fraction, seed)
        if size > SMALL_IMAGE_MAX:
            raise DataError(f"augment 'cifar' holds images in memory and needs images of at "
                            f"most {SMALL_IMAGE_MAX} px; {train_dir} has {size} px: use "
                            f"augment 'imagenet'")
        files, labels, classes = _list_image_folder(train_dir, None)
        test_files, test_labels, _ = _list_image_folder(eval_dir, classes)
        train = Split(_read_images(files, num_threads), torch.tensor(labels, dtype=torch.int64),
                      classes)
        test = Split(_read_images(test_files, num_threads),
                     torch.tensor(test_labels, dtype=torch.int64), classes)
    else:
        if augment == "imagenet":
            raise DataError(f"{name} is held in memory and uses augment 'cifar'")
        augment = "cifar"
        if name == "embedded":
            train, test = _load_embedded(root)
        else:
            train, test = _load_torchvision_cifar(name, root, download)

    if augment == "cifar" and train.images.shape[2] != train.images.shape[3]:
        raise DataError(f"{name}: in-memory images must be square, got "
                        f"{tuple(train.images.shape[2:])}")
    if len(test) and test.images.shape[1:] != train.images.shape[1:]:
        raise DataError(f"{name}: test images {tuple(test.images.shape[1:])} differ in size "
                        f"from training images {tuple(train.images.shape[1:])}")
    train, val = split_train_val(train, val_fraction, seed)
    train = add_label_noise(train, label_noise, seed)  # the training part only
    if name == "imagefolder" or (user and train.is_image):
        # Unknown data: normalise with the statistics of the training part only.
        mean, std = _channel_stats(train.images)
        train, val, test = (Split(s.images, s.labels, s.classes, mean, std)
                            for s in (train, val, test))
    return Data(name, train, val, test, list(train.classes), int(train.images.shape[-1]),
                train.mean, train.std, augment)


def dataset_shape(name: str, root: str | None) -> tuple[int, tuple[int, ...]]:
    """(number of classes, shape of one model input) of a built-in data set, reading no more
    than a folder listing and one image."""
    if name in ("embedded", "cifar10"):
        return 10, (3, 32, 32)
    if name == "cifar100":
        return 100, (3, 32, 32)
    train_dir, _ = _imagefolder_dirs(root)
    classes = [e.name for e in os.scandir(train_dir) if e.is_dir()]
    size = _first_image_size(train_dir)
    return len(classes), (3, size, size) if size <= SMALL_IMAGE_MAX else (3, 224, 224)


def _load_user(name: str, kwargs: dict) -> tuple[Split, Split]:
    """The user's data function's two sets as Splits, checked (protocol: training/user_code.py)."""
    out = call(name, "data.name", **kwargs)
    classes = None
    if isinstance(out, dict):
        if set(out) - {"train", "test", "classes"} or not {"train", "test"} <= set(out):
            raise ConfigError("data.name", f"{name} returned a mapping with keys {sorted(out)}; expected train, test "
                              "and optionally classes")
        classes = out.get("classes")
        out = (out["train"], out["test"])
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise ConfigError("data.name", f"{name} must return (train, test) or {{'train': ..., 'test': ...}}, got "
                          f"{type(out).__name__}")
    train, test = (_user_tensors(name, which, part) for which, part in zip(("train", "test"), out, strict=True))
    if len(train[0]) == 0:
        raise ConfigError("data.name", f"{name}: the training set is empty")
    if classes is not None:
        if not isinstance(classes, (list, tuple)) or not classes:
            raise ConfigError("data.name", f"{name}: classes must be a non-empty list of names")
        num = len(classes)
    else:
        num = int(train[1].max()) + 1
    for which, (_, y) in (("train", train), ("test", test)):
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= num):
            bound = "len(classes)" if classes is not None else "one more than the largest training label"
            raise ConfigError("data.name", f"{name}: {which} labels must lie in [0, {num}) ({bound}), got "
                              f"{int(y.min())}..{int(y.max())}")
    names = [str(c) for c in classes] if classes is not None else [str(i) for i in range(num)]
    return tuple(Split(x, y, names, (), ()) for x, y in (train, test))


def _user_tensors(name: str, which: str, part: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """One set of a user's data function as (x, y): a pair of tensors, or a Dataset read once."""
    if isinstance(part, (tuple, list)) and len(part) == 2 and all(isinstance(t, torch.Tensor) for t in part):
        x, y = part
    elif isinstance(part, torch.utils.data.Dataset) and hasattr(part, "__len__"):
        samples = [part[i] for i in range(len(part))]
        try:
            x = torch.stack([torch.as_tensor(s[0]) for s in samples]) if samples else torch.zeros(0, 1)
            y = torch.as_tensor([int(s[1]) for s in samples], dtype=torch.int64)
        except (TypeError, ValueError, RuntimeError, IndexError) as err:
            raise ConfigError("data.name", f"{name}: the {which} Dataset must yield (x, y) samples of one shape with "
                              f"integer labels ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    else:
        raise ConfigError("data.name", f"{name}: the {which} set must be a pair of tensors (x, y) or a torch "
                          f"Dataset with __len__, got {type(part).__name__}")
    if x.dim() < 2 or not (x.is_floating_point() or (x.dtype == torch.uint8 and x.dim() == 4)):
        raise ConfigError("data.name", f"{name}: {which} x must be uint8 N x C x H x W images or floating point "
                          f"N x ..., got {x.dtype} of shape {tuple(x.shape)}")
    if y.dim() != 1 or len(y) != len(x) or y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
        raise ConfigError("data.name", f"{name}: {which} y must be N integer class labels for the N = {len(x)} "
                          f"samples, got {y.dtype} of shape {tuple(y.shape)}")
    x = x.float() if x.is_floating_point() and x.dtype != torch.float32 else x
    return x.contiguous(), y.to(torch.int64)


class _RankShares:
    """Batches of indices: rank ``rank``'s share of each global batch of ``batch_size``
    (a batch sampler). Every rank draws the same global order from the same seeded
    generator and loads only its share."""

    def __init__(self, sampler, batch_size: int, drop_last: bool, rank: int, world: int) -> None:
        from torch.utils.data import BatchSampler

        self.batches = BatchSampler(sampler, batch_size, drop_last)
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        from ssam_tune.training.distributed import share

        for batch in self.batches:
            index = share(len(batch), self.rank, self.world)
            yield batch[index.start:index.stop]


def make_dataloader(dataset: Any, batch_size: int, *, shuffle: bool = False,
                    generator: torch.Generator | None = None, num_workers: int = 4,
                    drop_last: bool = False, pin_memory: bool = False, rank: int = 0, world: int = 1) -> Any:
    """A torch ``DataLoader`` for the ImageFolder path (``Data.in_memory`` false).

    ``generator`` seeds the shuffle order and the workers' base seed, so the epoch order
    is reproducible; per-image augmentation randomness lives in the worker processes. With
    ``world`` > 1 each batch is rank ``rank``'s share of the global batch of ``batch_size``.
    """
    from torch.utils.data import DataLoader, RandomSampler, SequentialSampler

    if world == 1:
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                          num_workers=num_workers, drop_last=drop_last, pin_memory=pin_memory,
                          persistent_workers=num_workers > 0)
    sampler = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    return DataLoader(dataset, batch_sampler=_RankShares(sampler, batch_size, drop_last, rank, world),
                      generator=generator, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=num_workers > 0)
