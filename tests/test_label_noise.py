"""Training-split label noise (data.label_noise): exact count, clean val/test, seeded, off at 0."""

from __future__ import annotations

import pytest
import torch

from ssam_tune.training import data as D
from ssam_tune.training.config import ConfigError, config_from_dict

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")


def toy_split(n: int = 1000, classes: int = 10) -> D.Split:
    images = torch.arange(n, dtype=torch.int64).remainder(256).to(torch.uint8).view(n, 1, 1, 1)
    images = images.expand(n, 3, 2, 2).contiguous()
    labels = torch.arange(n, dtype=torch.int64) % classes
    return D.Split(images, labels, [f"c{i}" for i in range(classes)])


@pytest.mark.parametrize("n, fraction", [(1000, 0.2), (1000, 0.35), (999, 0.5), (7, 0.3)])
def test_exact_fraction_flipped_to_another_class(n: int, fraction: float) -> None:
    clean = toy_split(n)
    noisy = D.add_label_noise(clean, fraction, seed=3)
    changed = noisy.labels != clean.labels
    assert int(changed.sum()) == round(fraction * n)  # a flip never keeps the old class
    assert noisy.labels.min() >= 0 and noisy.labels.max() < 10
    assert noisy.images is clean.images and noisy.classes == clean.classes
    assert torch.equal(clean.labels, torch.arange(n) % 10)  # the input is not modified


def test_new_classes_are_uniform_over_the_other_classes() -> None:
    clean = toy_split(20000)
    noisy = D.add_label_noise(clean, 0.5, seed=0)
    changed = noisy.labels != clean.labels
    offsets = (noisy.labels[changed] - clean.labels[changed]) % 10
    counts = torch.bincount(offsets, minlength=10)
    assert counts[0] == 0
    expected = 10000 / 9
    assert ((counts[1:].double() - expected).abs() < 5 * expected ** 0.5).all()


def test_same_seed_same_flips_other_seed_other_flips() -> None:
    clean = toy_split()
    a = D.add_label_noise(clean, 0.25, seed=7)
    b = D.add_label_noise(clean, 0.25, seed=7)
    c = D.add_label_noise(clean, 0.25, seed=8)
    assert torch.equal(a.labels, b.labels)
    assert not torch.equal(a.labels, c.labels)


def test_zero_changes_nothing() -> None:
    clean = toy_split()
    assert D.add_label_noise(clean, 0.0, seed=0) is clean
    assert D.add_label_noise(toy_split(10), 0.04, seed=0).labels.equal(toy_split(10).labels)  # rounds to 0


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_out_of_range_rejected(fraction: float) -> None:
    with pytest.raises(D.DataError, match="label_noise"):
        D.add_label_noise(toy_split(), fraction, seed=0)
    with pytest.raises(D.DataError, match="label_noise"):
        D.load_dataset("embedded", label_noise=fraction)


def test_embedded_noise_on_train_only(embedded: D.Data) -> None:
    noisy = D.load_dataset("embedded", val_fraction=0.1, seed=0, label_noise=0.2)
    assert torch.equal(noisy.val.labels, embedded.val.labels)
    assert torch.equal(noisy.val.images, embedded.val.images)
    assert torch.equal(noisy.test.labels, embedded.test.labels)
    assert torch.equal(noisy.train.images, embedded.train.images)  # the same images, in order
    assert int((noisy.train.labels != embedded.train.labels).sum()) == round(0.2 * 4500)
    again = D.load_dataset("embedded", val_fraction=0.1, seed=0, label_noise=0.2)
    assert torch.equal(again.train.labels, noisy.train.labels)
    off = D.load_dataset("embedded", val_fraction=0.1, seed=0, label_noise=0.0)
    assert torch.equal(off.train.labels, embedded.train.labels)


def test_config_key() -> None:
    assert config_from_dict({}).data.label_noise == 0.0
    assert config_from_dict({"data": {"label_noise": 0.3}}).data.label_noise == 0.3
    with pytest.raises(ConfigError, match=r"data\.label_noise: must be in \[0\.0, 1\.0\)"):
        config_from_dict({"data": {"label_noise": 1.0}})


def test_the_config_key_reaches_the_training_data(embedded: D.Data) -> None:
    """data.label_noise travels from a config through load_data (what Trainer and the Ray
    trainable call) to the training labels."""
    from ssam_tune.training.trainer import load_data

    cfg = config_from_dict({"data": {"name": "embedded", "val_fraction": 0.1, "label_noise": 0.3}})
    data = load_data(cfg)
    assert int((data.train.labels != embedded.train.labels).sum()) == round(0.3 * 4500)
    assert torch.equal(data.val.labels, embedded.val.labels)
