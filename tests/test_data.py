"""Tests for ssam_tune.training.data: loading, splits, the tensor augmentation and the error paths."""

from __future__ import annotations

import os

import pytest
import torch

from ssam_tune.training import batches as B
from ssam_tune.training import data as D

# torchvision 0.29 deprecates its image codecs (used here to write test images).
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")

# the extracted cifar10-jpeg archive (README: data/cifar10-jpeg), where available
CIFAR_JPEG_ROOT = os.environ.get("SSAM_TUNE_CIFAR_JPEG",
                                 os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                              "data", "cifar10-jpeg"))


def coordinate_images(n: int, size: int = 32) -> torch.Tensor:
    """Images whose pixels name their position: channel 0 = row + 1, channel 1 = col + 1.

    Values are never 0, so zero padding is recognisable, and every window is unique.
    """
    r = torch.arange(size).view(size, 1).expand(size, size) + 1
    c = torch.arange(size).view(1, size).expand(size, size) + 1
    image = torch.stack([r, c, torch.full_like(r, 200)]).to(torch.uint8)
    return image.expand(n, 3, size, size).contiguous()


# --------------------------------------------------------------------------- embedded set
# (the ``embedded`` fixture, the data set split as the Trainer splits it, is in conftest.py)

def test_embedded_shapes_and_balance(embedded: D.Data) -> None:
    assert embedded.name == "embedded" and embedded.in_memory
    assert embedded.num_classes == 10 and embedded.image_size == 32
    assert embedded.classes[0] == "airplane" and embedded.classes[9] == "truck"
    assert (len(embedded.train), len(embedded.val), len(embedded.test)) == (4500, 500, 1000)
    for split in (embedded.train, embedded.val, embedded.test):
        assert split.images.dtype == torch.uint8 and split.labels.dtype == torch.int64
        assert split.images.shape[1:] == (3, 32, 32)
    assert embedded.train.labels.bincount().tolist() == [450] * 10
    assert embedded.val.labels.bincount().tolist() == [50] * 10
    assert embedded.test.labels.bincount().tolist() == [100] * 10
    # Real photographs, not blank decodes: pixel statistics near CIFAR-10's.
    mean = embedded.train.images.float().mean(dim=(0, 2, 3)) / 255
    assert torch.allclose(mean, torch.tensor(D.CIFAR10_MEAN), atol=0.03)


def test_embedded_file_is_raw_jpeg_bytes() -> None:
    blob = torch.load(D.EMBEDDED_FILE, weights_only=True)
    assert os.path.getsize(D.EMBEDDED_FILE) < 8_000_000
    offsets = blob["train_offsets"]
    assert offsets.shape == (5001,) and int(offsets[-1]) == blob["train_bytes"].numel()
    first = blob["train_bytes"][int(offsets[0]):int(offsets[1])]
    assert first[:2].tolist() == [0xFF, 0xD8]  # JPEG start-of-image marker


@pytest.mark.skipif(not os.path.isdir(CIFAR_JPEG_ROOT), reason="extracted archive not here")
def test_embedded_bytes_match_source_files() -> None:
    blob = torch.load(D.EMBEDDED_FILE, weights_only=True)
    offsets = blob["test_offsets"]
    for i in (0, 517, 999):
        name = blob["classes"][int(blob["test_labels"][i])]
        path = os.path.join(CIFAR_JPEG_ROOT, "test", name,
                            f"{int(blob['test_file_index'][i]):04d}.jpg")
        with open(path, "rb") as fh:
            assert fh.read() == bytes(blob["test_bytes"][offsets[i]:offsets[i + 1]].tolist())


# --------------------------------------------------------------------------- splits

def test_val_split_disjoint_deterministic_and_seeded(embedded: D.Data) -> None:
    labels = torch.arange(1000) % 7
    keep, held = D.stratified_indices(labels, 0.2, seed=3)
    assert len(set(keep.tolist()) & set(held.tolist())) == 0
    assert sorted(keep.tolist() + held.tolist()) == list(range(1000))
    again_keep, again_held = D.stratified_indices(labels, 0.2, seed=3)
    assert torch.equal(keep, again_keep) and torch.equal(held, again_held)
    assert not torch.equal(held, D.stratified_indices(labels, 0.2, seed=4)[1])

    again = D.load_dataset("embedded", val_fraction=0.1, seed=0)
    assert torch.equal(again.val.images, embedded.val.images)
    assert torch.equal(again.train.labels, embedded.train.labels)
    # No training image appears in validation (images as byte strings).
    train_set = {bytes(im.flatten().tolist()) for im in embedded.train.images[:4500:9]}
    val_set = {bytes(im.flatten().tolist()) for im in embedded.val.images}
    assert not train_set & val_set


def test_val_fraction_zero_gives_empty_val() -> None:
    data = D.load_dataset("embedded", val_fraction=0.0)
    assert len(data.train) == 5000 and len(data.val) == 0
    assert data.val.images.shape == (0, 3, 32, 32)
    assert list(B.iterate_batches(data.val, 64)) == []
    with pytest.raises(ValueError):
        D.load_dataset("embedded", val_fraction=1.0)


# --------------------------------------------------------------------------- augmentation

def test_crop_and_flip_are_windows_of_the_padded_image() -> None:
    n = 2000
    images = coordinate_images(n)
    gen = torch.Generator().manual_seed(0)
    out = B.augment_batch(images, gen, cutout=0, normalize=False)
    assert out.dtype == torch.float32 and out.shape == images.shape
    raw = torch.round(out * 255).to(torch.uint8)
    padded = torch.nn.functional.pad(images[0], (4, 4, 4, 4))
    match = torch.zeros(n, dtype=torch.long)
    offsets, flips = set(), 0
    for dy in range(9):
        for dx in range(9):
            window = padded[:, dy:dy + 32, dx:dx + 32]
            for flipped, cand in ((False, window), (True, window.flip(-1))):
                hit = (raw == cand).flatten(1).all(1)
                match += hit
                if hit.any():
                    offsets.add((dy, dx))
                    flips += int(hit.sum()) if flipped else 0
    assert (match == 1).all()  # every output is exactly one (flipped) window
    assert len(offsets) == 81  # all translations in [-4, 4]^2 occur
    assert 0.45 * n < flips < 0.55 * n


def test_cutout_zeroes_a_clipped_16px_square() -> None:
    n = 3000
    images = torch.full((n, 3, 32, 32), 255, dtype=torch.uint8)
    gen = torch.Generator().manual_seed(1)
    out = B.augment_batch(images, gen, padding=0, flip=False, cutout=16, normalize=False)
    zero = out == 0
    assert (zero.all(1) == zero.any(1)).all()  # same square in every channel
    mask = zero[:, 0]
    rows, cols = mask.any(2), mask.any(1)
    assert torch.equal(mask, rows[:, :, None] & cols[:, None, :])  # a rectangle
    height, width = rows.sum(1), cols.sum(1)
    area = mask.flatten(1).sum(1)
    assert ((area >= 64) & (area <= 256)).all()
    assert ((height >= 8) & (height <= 16) & (width >= 8) & (width <= 16)).all()
    for extent, line in ((height, rows), (width, cols)):
        contiguous = (line.float().diff(dim=1).abs().sum(1) <= 2)
        assert contiguous.all()
        # A side shorter than 16 must be cut by the image border.
        short = extent < 16
        assert (line[short][:, 0] | line[short][:, -1]).all()
    assert (area == 256).float().mean() > 0.2 and (area < 256).float().mean() > 0.2
    assert (out[~zero] == 1.0).all()


def test_normalised_output_and_cutout_zero_after_normalisation() -> None:
    images = torch.full((500, 3, 32, 32), 255, dtype=torch.uint8)
    gen = torch.Generator().manual_seed(2)
    out = B.augment_batch(images, gen, padding=0, flip=False)
    expected = (1 - torch.tensor(D.CIFAR10_MEAN)) / torch.tensor(D.CIFAR10_STD)
    zero = out == 0
    assert zero.flatten(1).sum(1).min() >= 3 * 64
    per_channel = out.permute(1, 0, 2, 3).reshape(3, -1)
    kept = ~zero.permute(1, 0, 2, 3).reshape(3, -1)
    for ch in range(3):
        assert torch.allclose(per_channel[ch][kept[ch]], expected[ch].expand(
            int(kept[ch].sum())), atol=1e-5)
    # Evaluation path: only normalisation.
    ev = B.normalize_batch(images[:4], D.CIFAR10_MEAN, D.CIFAR10_STD, channels_last=True)
    assert ev.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(ev[:, :, 5, 5], expected.expand(4, 3), atol=1e-5)


def test_augmentation_deterministic_under_generator_state(embedded: D.Data) -> None:
    x = embedded.train.images[:256]
    gen = torch.Generator().manual_seed(7)
    state = gen.get_state()
    a = B.augment_batch(x, gen)
    b = B.augment_batch(x, gen)
    gen.set_state(state)
    assert torch.equal(B.augment_batch(x, gen), a)
    assert not torch.equal(a, b)
    half = B.augment_batch(x, torch.Generator().manual_seed(7), dtype=torch.float16,
                           channels_last=True)
    assert half.dtype == torch.float16
    assert half.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(half.float(), a, atol=1e-2)


def test_iterate_batches_epoch_order_and_reproducibility(embedded: D.Data) -> None:
    split = embedded.val
    batches = B.iterate_batches(split, 128, shuffle=True,
                                generator=torch.Generator().manual_seed(0), augment=True)
    assert len(batches) == 4
    first = list(batches)
    assert [len(y) for _, y in first] == [128, 128, 128, 116]
    assert first[0][0].shape == (128, 3, 32, 32) and first[0][0].dtype == torch.float32
    # An epoch is a permutation of the split.
    ys = torch.cat([y for _, y in first])
    assert torch.equal(ys.sort().values, split.labels.sort().values)
    replay = list(B.iterate_batches(split, 128, shuffle=True,
                                    generator=torch.Generator().manual_seed(0), augment=True))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(first, replay, strict=True))
    assert not torch.equal(torch.cat([y for _, y in batches]), ys)  # next epoch reshuffles
    dropped = B.iterate_batches(split, 128, drop_last=True)
    assert len(dropped) == 3 and len(list(dropped)) == 3
    # Evaluation batches in order are just the normalised images.
    x, y = next(iter(B.iterate_batches(split, 10)))
    assert torch.equal(y, split.labels[:10])
    assert torch.allclose(x, B.normalize_batch(split.images[:10], split.mean, split.std))
    with pytest.raises(ValueError):
        B.iterate_batches(split, 10, shuffle=True)  # no generator


def test_sample_for_fisher(embedded: D.Data) -> None:
    x, y = B.sample_for_fisher(embedded.train, 64, torch.Generator().manual_seed(5))
    x2, y2 = B.sample_for_fisher(embedded.train, 64, torch.Generator().manual_seed(5))
    assert x.shape == (64, 3, 32, 32) and y.shape == (64,)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    perm = torch.randperm(len(embedded.train), generator=torch.Generator().manual_seed(5))
    expected = B.normalize_batch(embedded.train.images[perm[:64]], D.CIFAR10_MEAN,
                                 D.CIFAR10_STD)
    assert torch.equal(x, expected)  # un-augmented
    x_all, _ = B.sample_for_fisher(embedded.val, 10_000, torch.Generator().manual_seed(0))
    assert len(x_all) == len(embedded.val)


# --------------------------------------------------------------------------- errors, folders

@pytest.mark.parametrize("name,folder", [("cifar10", "cifar-10-batches-py"),
                                         ("cifar100", "cifar-100-python")])
def test_missing_cifar_raises_data_error_naming_the_folder(tmp_path, name, folder) -> None:
    with pytest.raises(D.DataError) as info:
        D.load_dataset(name, root=str(tmp_path), download=False)
    assert str(tmp_path / folder) in str(info.value)
    assert "download: true" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_failed_download_raises_data_error(tmp_path, monkeypatch) -> None:
    import torchvision.datasets as tvd

    def no_network(self) -> None:
        raise OSError("network unreachable")

    monkeypatch.setattr(tvd.CIFAR10, "download", no_network)
    with pytest.raises(D.DataError) as info:
        D.load_dataset("cifar10", root=str(tmp_path / "new"), download=True)
    assert str(tmp_path / "new" / "cifar-10-batches-py") in str(info.value)
    assert "network unreachable" in str(info.value)


def test_unknown_name_and_bad_augment() -> None:
    with pytest.raises(D.DataError):
        D.load_dataset("mnist")
    with pytest.raises(D.DataError):
        D.load_dataset("embedded", augment="imagenet")


def _write_tree(root, sizes=(8, 8)) -> dict:
    from torchvision.io import encode_jpeg, write_png

    pixels = {}
    gen = torch.Generator().manual_seed(0)
    for split, count in (("train", 6), ("val", 2)):
        for name in ["cat", "dog"]:
            os.makedirs(root / split / name)
            for i in range(count):
                image = torch.randint(0, 256, (3, *sizes), dtype=torch.uint8, generator=gen)
                if i % 2:
                    write_png(image, str(root / split / name / f"{i}.png"))
                    pixels[(split, name, i)] = image
                else:
                    (root / split / name / f"{i}.jpg").write_bytes(
                        bytes(encode_jpeg(image).tolist()))
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return pixels


def test_imagefolder_small_images_in_memory(tmp_path) -> None:
    pixels = _write_tree(tmp_path)
    data = D.load_dataset("imagefolder", root=str(tmp_path), val_fraction=0.25, seed=0,
                          num_threads=2)
    assert data.in_memory and data.augment == "cifar" and data.classes == ["cat", "dog"]
    assert data.image_size == 8 and data.num_classes == 2
    assert (len(data.train), len(data.val), len(data.test)) == (8, 4, 4)
    assert data.train.labels.bincount().tolist() == [4, 4]
    assert data.test.labels.tolist() == [0, 0, 1, 1]
    assert torch.equal(data.test.images[1], pixels[("val", "cat", 1)])  # PNG: exact pixels
    assert len(data.mean) == 3 and all(0.2 < m < 0.8 for m in data.mean)
    x, _ = next(iter(B.iterate_batches(data.train, 4, shuffle=True, augment=True,
                                       generator=torch.Generator().manual_seed(0),
                                       cutout=4)))
    assert x.shape == (4, 3, 8, 8)


def test_imagefolder_large_images_use_imagenet_loader(tmp_path) -> None:
    _write_tree(tmp_path, sizes=(80, 96))
    data = D.load_dataset("imagefolder", root=str(tmp_path), val_fraction=0.25)
    assert not data.in_memory and data.augment == "imagenet" and data.image_size == 224
    assert (len(data.train), len(data.val), len(data.test)) == (8, 4, 4)
    x, _ = data.train[0]
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    loader = D.make_dataloader(data.test, 4, num_workers=0)
    xb, yb = next(iter(loader))
    assert xb.shape == (4, 3, 224, 224) and yb.tolist() == [0, 0, 1, 1]


def test_imagefolder_missing_folders_raise(tmp_path) -> None:
    with pytest.raises(D.DataError, match=str(tmp_path / "nope")):
        D.load_dataset("imagefolder", root=str(tmp_path / "nope"))
    (tmp_path / "val").mkdir()
    with pytest.raises(D.DataError, match=str(tmp_path / "train")):
        D.load_dataset("imagefolder", root=str(tmp_path))
    with pytest.raises(D.DataError):
        D.load_dataset("imagefolder", root=None)


@pytest.mark.skipif(not os.path.isdir(CIFAR_JPEG_ROOT), reason="extracted archive not here")
def test_imagefolder_reads_extracted_cifar_archive() -> None:
    data = D.load_dataset("imagefolder", root=CIFAR_JPEG_ROOT, val_fraction=0.1)
    assert data.in_memory and data.augment == "cifar" and data.image_size == 32
    assert (len(data.train), len(data.val), len(data.test)) == (45000, 5000, 10000)
    assert data.classes == D.load_dataset("embedded").classes
    assert torch.allclose(torch.tensor(data.mean), torch.tensor(D.CIFAR10_MEAN), atol=0.01)
