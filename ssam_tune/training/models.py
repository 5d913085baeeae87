"""Network architectures used in the Sparse SAM experiments (Mi et al., NeurIPS 2022, Sec. 5.1).

* ``resnet18``  -- CIFAR ResNet-18 (He et al. 2016) with a 3x3 stride-1 first conv and no
  max-pool, as the paper states ("we replace the first convolution layer in ResNet and
  WideResNet with the one of 3x3 kernel size, 1 stride and 1 padding"). Tables 1, 5-9.
* ``wrn28_10``  -- pre-activation WideResNet (Zagoruyko & Komodakis 2016), depth 28, widen
  factor 10 by default. Table 2.
* ``vgg11_bn``  -- CIFAR VGG-11 with BatchNorm and a single linear classifier. Table 4.
* ``resnet50``  -- torchvision's ImageNet ResNet-50. Table 3.

All models use non-inplace ReLU and out-of-place residual adds (``out = out + shortcut``), so
that forward/backward hooks on module outputs (the Fisher code) see tensors that nothing
modifies afterwards. Importing this module has no side effects.

Use :func:`build_model` (or the :data:`MODELS` dict of builders) to construct a model.
"""

from __future__ import annotations

import torch.nn.functional as F
import torchvision.models.resnet as tv_resnet
from torch import nn

from ssam_tune.training.config import ConfigError
from ssam_tune.training.user_code import call, is_import_string

__all__ = ["MODELS", "VGG", "ResNet18", "WideResNet", "build_model", "count_params"]


def _scale(channels: int, width: float) -> int:
    """Channel count ``channels * width`` rounded to an int, at least 1."""
    return max(1, round(channels * width))


def _init_weights(model: nn.Module) -> None:
    """Standard init: Kaiming-normal (fan_out, ReLU) convs, BatchNorm weight 1 and bias 0.

    Linear layers keep PyTorch's default init (as the CIFAR reference code bases do).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------- ResNet-18 (CIFAR)


class BasicBlock(nn.Module):
    """Post-activation residual block of ResNet-18/34: two 3x3 convs with BatchNorm."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return F.relu(out)


class ResNet18(nn.Module):
    """CIFAR ResNet-18: BasicBlock [2, 2, 2, 2], 3x3 stride-1 stem, no max-pool.

    ``width`` multiplies the stage widths (64, 128, 256, 512). About 11.17M parameters at
    width 1 with 10 classes.
    """

    def __init__(self, num_classes: int = 10, width: float = 1.0, blocks=(2, 2, 2, 2)):
        super().__init__()
        widths = [_scale(c, width) for c in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        stages = []
        for i, (planes, n) in enumerate(zip(widths, blocks, strict=True)):
            layers = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_planes, num_classes)
        _init_weights(self)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = self.pool(out).flatten(1)
        return self.linear(out)


# --------------------------------------------------------------------------- WideResNet


class WideBasic(nn.Module):
    """Pre-activation wide block: BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 plus shortcut.

    When the shape changes, the shortcut is a 1x1 conv applied to the pre-activated input,
    as in Zagoruyko & Komodakis' reference code.
    """

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.equal_in_out = in_planes == planes and stride == 1
        self.shortcut = None
        if not self.equal_in_out:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x):
        o = F.relu(self.bn1(x))
        shortcut = x if self.equal_in_out else self.shortcut(o)
        out = self.conv1(o)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return out + shortcut


class WideResNet(nn.Module):
    """WideResNet-depth-k (pre-activation). Depth must satisfy (depth - 4) % 6 == 0.

    Stage widths are (16, 16k, 32k, 64k), each multiplied by ``width``. WRN-28-10 has
    about 36.5M parameters with 10 classes.
    """

    def __init__(self, num_classes: int = 10, depth: int = 28, widen_factor: int = 10,
                 dropout: float = 0.0, width: float = 1.0):
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"depth must be 6n+4 with n >= 1, got depth={depth!r}")
        if widen_factor <= 0:
            raise ValueError(f"widen_factor must be positive, got widen_factor={widen_factor!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got dropout={dropout!r}")
        n = (depth - 4) // 6
        widths = [_scale(c, width) for c in (16, 16 * widen_factor, 32 * widen_factor,
                                              64 * widen_factor)]
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        in_planes = widths[0]
        stages = []
        for i, planes in enumerate(widths[1:]):
            layers = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(WideBasic(in_planes, planes, stride, dropout))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.block1, self.block2, self.block3 = stages
        self.bn = nn.BatchNorm2d(in_planes)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_planes, num_classes)
        _init_weights(self)

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn(out))
        out = self.pool(out).flatten(1)
        return self.linear(out)


# --------------------------------------------------------------------------- VGG-11-BN (CIFAR)

_VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(nn.Module):
    """CIFAR VGG with BatchNorm: conv3x3-BN-ReLU stack, then one Linear(512 * width, classes).

    This is the CIFAR form used by CIFAR code bases, not torchvision's ImageNet head. An
    adaptive average pool before the classifier makes it accept inputs of any size >= 32
    (at 32x32 the feature map is already 1x1 and the pool is the identity).
    """

    def __init__(self, num_classes: int = 10, cfg=_VGG11, width: float = 1.0):
        super().__init__()
        layers, in_ch = [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                out_ch = _scale(v, width)
                layers += [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
                           nn.BatchNorm2d(out_ch), nn.ReLU()]
                in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_ch, num_classes)
        _init_weights(self)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


# --------------------------------------------------------------------------- ResNet-50 (ImageNet)


class _Bottleneck(tv_resnet.Bottleneck):
    """torchvision's Bottleneck with an out-of-place residual add (same parameters)."""

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


# --------------------------------------------------------------------------- builders


def _build_resnet18(num_classes, *, width=1.0, input_size=32):
    return ResNet18(num_classes=num_classes, width=width)


def _build_wrn28_10(num_classes, *, width=1.0, input_size=32, depth=28, widen_factor=10,
                    dropout=0.0):
    return WideResNet(num_classes=num_classes, depth=depth, widen_factor=widen_factor,
                      dropout=dropout, width=width)


def _build_vgg11_bn(num_classes, *, width=1.0, input_size=32):
    if input_size < 32:
        raise ValueError(f"vgg11_bn has 5 max-pools and needs input_size >= 32, "
                         f"got input_size={input_size!r}")
    return VGG(num_classes=num_classes, width=width)


def _build_resnet50(num_classes, *, width=1.0, input_size=224):
    """torchvision ResNet-50 (what ``torchvision.models.resnet50(weights=None,
    num_classes=num_classes)`` builds: same modules, state-dict keys and init), with
    non-inplace ReLU and an out-of-place residual add."""
    if width != 1.0:
        raise ValueError(f"resnet50 (torchvision) supports width=1.0 only, got width={width!r}")
    model = tv_resnet.ResNet(_Bottleneck, [3, 4, 6, 3], num_classes=num_classes)
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    return model


MODELS = {
    "resnet18": _build_resnet18,
    "wrn28_10": _build_wrn28_10,
    "vgg11_bn": _build_vgg11_bn,
    "resnet50": _build_resnet50,
}
"""Model name -> builder ``f(num_classes, *, width=1.0, input_size=..., **kw) -> nn.Module``."""


def build_model(name: str, num_classes: int, *, width: float = 1.0, input_size: int = 32,
                input_shape: tuple[int, ...] | None = None, **kw) -> nn.Module:
    """Build the model ``name`` (a key of :data:`MODELS`, or a user's import string
    ``package.module:function``, called as ``function(num_classes=..., input_shape=...,
    **kw)``: training/user_code.py) for ``num_classes`` classes.

    ``width`` multiplies every channel count (rounded, at least 1; ``resnet50`` only
    supports 1.0). ``input_size`` is the side of the square input images; all models end
    in an adaptive average pool, so it is only checked (``vgg11_bn`` needs >= 32).
    Extra keyword arguments go to the builder (``wrn28_10``: ``depth``, ``widen_factor``,
    ``dropout``). An unknown name raises ``ValueError`` listing the choices.
    """
    if is_import_string(name):
        shape = tuple(int(v) for v in (input_shape or (3, input_size, input_size)))
        model = call(name, "model.name", num_classes=num_classes, input_shape=shape, **kw)
        if not isinstance(model, nn.Module):
            raise ConfigError("model.name", f"{name} must return a torch.nn.Module, got {type(model).__name__}")
        return model
    if input_shape is not None:
        input_size = int(input_shape[-1])
    if name not in MODELS:
        raise ValueError(f"unknown model name={name!r}; choices: {sorted(MODELS)}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got num_classes={num_classes!r}")
    if not width > 0:
        raise ValueError(f"width must be positive, got width={width!r}")
    if not isinstance(input_size, int) or input_size < 1:
        raise ValueError(f"input_size must be a positive int, got input_size={input_size!r}")
    return MODELS[name](num_classes, width=width, input_size=input_size, **kw)


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``model`` (only those with requires_grad if ``trainable_only``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
