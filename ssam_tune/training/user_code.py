"""A user's model and data, named in a config by an import string ``"package.module:function"``.

``model.name: "mypkg.nets:tiny_vit"`` (with ``model.kwargs``) is called as
``tiny_vit(num_classes=K, input_shape=(C, H, W), **kwargs)`` and must return an
``nn.Module`` whose output for a batch of N samples is ``N x K`` logits.

``data.name: "mypkg.data:load"`` (with ``data.kwargs``) is called as ``load(**kwargs)`` and
returns the training and test sets, ``(train, test)``, or a mapping ``{"train": ..., "test":
..., "classes": [names]}``. Each set is either a pair of tensors ``(x, y)`` or a torch
``Dataset`` of ``(x, y)`` samples (read once into memory). ``x`` is uint8 ``N x C x H x W``
(images: scaled to [0, 1] and normalised with the training part's channel statistics,
augmentable) or floating point of any shape ``N x ...`` (used as given); ``y`` holds integer
class labels in ``[0, K)``, K being ``len(classes)`` or, without names, one more than the
largest training label. The sets then take the same path as the built-in ones
(training/data.py): the seeded stratified validation split, ``train_size``, label noise,
batching and data-parallel shares.

Every problem is a :class:`ConfigError` naming the key and what to fix, raised where the code
is first called (``python -m ssam_tune.run`` calls it before Ray starts: :func:`preflight`).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from ssam_tune.training.config import IMPORT_RE, ConfigError

__all__ = ["call", "is_import_string", "module_roots", "preflight", "resolve"]


def is_import_string(name: Any) -> bool:
    return isinstance(name, str) and bool(IMPORT_RE.match(name))


def resolve(spec: str, key: str) -> Callable:
    """The callable an import string names; ``key`` (``model.name``) is named in errors."""
    module_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - any failure of the user's module is reported as such
        raise ConfigError(key, f"cannot import {module_name!r} ({type(err).__name__}: {err}); install the package "
                          "or put its folder on PYTHONPATH (Ray workers need it too)") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(key, f"{module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(key, f"{spec} is not callable ({type(obj).__name__})")
    return obj


def call(spec: str, key: str, **kwargs) -> Any:
    """``function(**kwargs)`` for the function ``spec`` names; a call its signature does not
    accept, and an exception inside it, become one-line ConfigErrors naming ``key``."""
    fn = resolve(spec, key)
    try:
        inspect.signature(fn).bind(**kwargs)
    except TypeError as err:
        raise ConfigError(key, f"{spec} cannot be called as {attr_of(spec)}({', '.join(f'{k}=...' for k in kwargs)}): "
                          f"{err}") from None
    except ValueError:  # no signature to inspect (a builtin): let the call say
        pass
    try:
        return fn(**kwargs)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - the user's exception, shown in one line
        first = str(err).splitlines()[0] if str(err) else ""
        raise ConfigError(key, f"{spec} raised {type(err).__name__}: {first}") from err


def module_roots(specs: list[str]) -> list[str]:
    """The folders that the modules of the import strings among ``specs`` were imported from
    (the folder holding each top-level package, absolute): what a worker needs on its path."""
    import os
    import sys

    roots = []
    for spec in specs:
        if not is_import_string(spec):
            continue
        top = sys.modules.get(spec.partition(":")[0].split(".")[0])
        file = getattr(top, "__file__", None)
        if file:
            root = os.path.dirname(os.path.abspath(file))
            if os.path.basename(file) == "__init__.py":
                root = os.path.dirname(root)
            if root not in roots:
                roots.append(root)
    return roots


def attr_of(spec: str) -> str:
    return spec.partition(":")[2]


def preflight(cfg, methods: list[str]) -> str:
    """Check a config's user model and data once, before any trial runs: the data function's
    sets, the model's construction and its output for two samples, and, where ``methods``
    include ``sam_on``, that the model has normalization layers. Returns a one-line summary;
    raises ConfigError. A config without import strings is not touched (returns "")."""
    import torch

    from ssam_tune.method.masks import NORM_LAYERS
    from ssam_tune.training.data import load_dataset
    from ssam_tune.training.models import build_model

    m, d = cfg.model, cfg.data
    if not (is_import_string(m.name) or is_import_string(d.name)):
        return ""
    if is_import_string(d.name):
        data = load_dataset(d.name, kwargs=d.kwargs, val_fraction=d.val_fraction, seed=cfg.seed,
                            augment=d.augment, label_noise=d.label_noise)
        num_classes, shape = data.num_classes, data.sample_shape
    else:
        num_classes, shape = _builtin_data_shape(cfg)
    model = build_model(m.name, num_classes, width=m.width, input_shape=shape, **m.kwargs)
    if is_import_string(m.name):
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model(torch.zeros((2, *shape)))
        except Exception as err:  # noqa: BLE001 - the user's model, reported in one line
            first = str(err).splitlines()[0] if str(err) else ""
            raise ConfigError("model.name", f"{m.name} fails on a batch of shape {(2, *shape)}: "
                              f"{type(err).__name__}: {first}") from err
        model.train(was)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ConfigError("model.name", f"{m.name} must return N x num_classes logits; for 2 samples of "
                              f"{num_classes} classes it returned {got}")
    if "sam_on" in methods and not any(isinstance(x, NORM_LAYERS) for x in model.modules()):
        raise ConfigError("method.name", f"sam_on perturbs only normalization layers (BatchNorm, GroupNorm, "
                          f"LayerNorm) and {m.name} has none; search other methods or add such layers")
    n = sum(p.numel() for p in model.parameters())
    return f"model {m.name}: {n:,} parameters, input {shape}, {num_classes} classes"


def _builtin_data_shape(cfg) -> tuple[int, tuple[int, ...]]:
    """(classes, sample shape) of a built-in data set, without reading it where that is known."""
    from ssam_tune.training.data import dataset_shape

    return dataset_shape(cfg.data.name, cfg.data.root)
