"""Tests for ssam_tune.training.models: shapes, parameter counts, init, and hook-safety (no in-place ops)."""

import math

import pytest
import torch
import torchvision
from torch import nn

from ssam_tune.training.models import MODELS, build_model, count_params

# (name, num_classes, width, input size): small widths keep forward+backward fast on CPU.
SMALL = [
    ("resnet18", 10, 0.125, 32),
    ("wrn28_10", 100, 0.125, 32),
    ("vgg11_bn", 10, 0.125, 32),
    ("resnet50", 7, 1.0, 64),
]


def test_models_is_plain_dict_of_the_four_architectures():
    assert type(MODELS) is dict
    assert set(MODELS) == {"resnet18", "wrn28_10", "vgg11_bn", "resnet50"}
    assert all(callable(f) for f in MODELS.values())


@pytest.mark.parametrize("name,num_classes,width,size", SMALL)
def test_forward_backward_shapes_and_grads(name, num_classes, width, size):
    torch.manual_seed(0)
    model = build_model(name, num_classes, width=width, input_size=size)
    model.train()
    x = torch.randn(2, 3, size, size)
    out = model(x)
    assert out.shape == (2, num_classes)
    nn.functional.cross_entropy(out, torch.tensor([0, 1])).backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, n
        assert torch.isfinite(p.grad).all(), n


@pytest.mark.parametrize("name,num_classes,width,size", SMALL)
def test_module_outputs_never_modified_in_place(name, num_classes, width, size):
    """Fisher code hooks module outputs: no ReLU(inplace=True), no `out += shortcut`."""
    model = build_model(name, num_classes, width=width, input_size=size)
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            assert not m.inplace
    seen = []

    def hook(module, inputs, output):
        if isinstance(output, torch.Tensor):
            seen.append((module, output, output._version))

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    out = model(torch.randn(2, 3, size, size))
    out.sum().backward()
    for h in handles:
        h.remove()
    assert len(seen) > 10
    for module, output, version in seen:
        assert output._version == version, f"output of {type(module).__name__} modified in place"


def test_unknown_name_lists_choices():
    with pytest.raises(ValueError) as err:
        build_model("resnet19", 10)
    msg = str(err.value)
    assert "resnet19" in msg
    for name in MODELS:
        assert name in msg


@pytest.mark.parametrize("kw", [{"num_classes": 0}, {"width": 0.0}, {"width": -1.0},
                                {"input_size": 0}])
def test_invalid_arguments(kw):
    args = {"num_classes": 10, **kw}
    nc = args.pop("num_classes")
    with pytest.raises(ValueError, match=next(iter(kw))):
        build_model("resnet18", nc, **args)


def test_model_specific_errors():
    with pytest.raises(ValueError, match="depth"):
        build_model("wrn28_10", 10, depth=27)
    with pytest.raises(ValueError, match="width"):
        build_model("resnet50", 10, width=0.5)
    with pytest.raises(ValueError, match="input_size"):
        build_model("vgg11_bn", 10, input_size=16)


def test_parameter_counts_at_full_width():
    # Known totals: CIFAR ResNet-18 11.17M, WRN-28-10 36.5M, VGG-11-BN (CIFAR head) 9.23M,
    # ResNet-50 25.6M with 1000 classes.
    assert count_params(build_model("resnet18", 10)) == 11_173_962
    assert count_params(build_model("wrn28_10", 10)) == 36_479_194
    assert count_params(build_model("vgg11_bn", 10)) == 9_228_362
    r50 = build_model("resnet50", 1000)
    assert count_params(r50) == 25_557_032
    assert count_params(r50) == count_params(torchvision.models.resnet50(weights=None))
    assert count_params(build_model("resnet18", 100)) == 11_173_962 + 90 * 513


def test_resnet50_matches_torchvision_layout():
    ours = build_model("resnet50", 10)
    ref = torchvision.models.resnet50(weights=None, num_classes=10)
    a, b = ours.state_dict(), ref.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)


def test_width_scales_channels():
    m = build_model("resnet18", 10, width=0.5)
    assert m.conv1.out_channels == 32 and m.linear.in_features == 256
    m = build_model("resnet18", 10, width=0.001)  # rounds up to at least one channel
    assert m.conv1.out_channels == 1
    w = build_model("wrn28_10", 10, width=0.25)
    assert w.conv1.out_channels == 4 and w.linear.in_features == 160
    v = build_model("vgg11_bn", 10, width=0.25)
    assert v.classifier.in_features == 128 and isinstance(v.classifier, nn.Linear)


def test_wrn_configurable_depth_and_widen_factor():
    m = build_model("wrn28_10", 10, depth=16, widen_factor=4)
    assert len(m.block1) == 2 and m.linear.in_features == 256
    assert not any(isinstance(x, nn.Dropout) for x in m.modules())
    d = build_model("wrn28_10", 10, depth=10, widen_factor=1, dropout=0.3)
    assert any(isinstance(x, nn.Dropout) and x.p == 0.3 for x in d.modules())


def test_standard_init():
    torch.manual_seed(0)
    m = build_model("resnet18", 10)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            assert torch.equal(mod.weight, torch.ones_like(mod.weight))
            assert torch.equal(mod.bias, torch.zeros_like(mod.bias))
    conv = m.layer4[0].conv2  # Kaiming normal, fan_out: std = sqrt(2 / (out * 3 * 3))
    expected = math.sqrt(2.0 / (conv.out_channels * 9))
    assert abs(conv.weight.std().item() / expected - 1) < 0.02


def test_count_params_trainable_only():
    m = build_model("resnet18", 10, width=0.125)
    total = count_params(m)
    m.linear.weight.requires_grad_(False)
    assert count_params(m, trainable_only=True) == total - m.linear.weight.numel()
