"""Typed training configuration, loaded from YAML with yaml.safe_load and validated.

One schema serves ``python -m ssam_tune.train CONFIG.yaml`` and the fixed part of a search
space. Unknown keys, wrong types and out-of-range values raise :class:`ConfigError`, whose
message names the YAML path (``method.rho``) and the rule it broke.

Defaults are the paper's CIFAR recipe (Section 5.1): batch 128, SGD momentum 0.9, lr 0.05
with a cosine schedule, weight decay 1e-3 for SAM/SSAM, cutout, rho 0.1 (CIFAR-10).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from ssam_tune.method.methods import METHODS, TENSOR_SCORES

__all__ = ["Config", "ConfigError", "DataConfig", "MethodConfig", "ModelConfig", "TrainConfig", "apply_overrides",
           "applying_config", "build_section", "config_from_dict", "config_to_dict", "flatten", "key_applies",
           "load_config", "load_yaml", "rule", "set_by_path"]

MODEL_NAMES = ("resnet18", "wrn28_10", "vgg11_bn", "resnet50")
# module path, a colon, then the attribute path: "mypkg.models:tiny_vit"
IMPORT_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
DATASET_NAMES = ("embedded", "cifar10", "cifar100", "imagefolder")


class ConfigError(ValueError):
    """A configuration problem; ``str()`` is one line naming the file, the key and the rule."""

    def __init__(self, path: str, rule: str, source: str | None = None) -> None:
        self.path, self.rule, self.source = path, rule, source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{path}: {rule}" if path else f"{where}{rule}")


def rule(lo=None, hi=None, lo_open=False, hi_open=False, choices=None, help=None, yaml_key=None,
         given=dataclasses.MISSING, imports=False) -> dict:
    """A field's validation rule, kept in its metadata, which :func:`build_section` checks.

    ``yaml_key`` places a field of a flat dataclass inside a mapping of the YAML
    (``"resources.cpu"``: the field is read from ``resources: {cpu: ...}``); ``given`` is its
    default when that mapping is given without it (else the field's own default applies); ``imports``: besides
    ``choices``, an import string ``package.module:function`` is accepted (checked when used)."""
    out = {"lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open, "choices": choices, "help": help,
           "yaml_key": yaml_key, "imports": imports}
    if given is not dataclasses.MISSING:
        out["given"] = given
    return out


def _f(default, **kw):
    """A dataclass field with a validation rule (:func:`rule`) in its metadata."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=rule(**kw))
    return field(default=default, metadata=rule(**kw))


# A user's model or data set: "package.module:function" (training/user_code.py calls it).
IMPORT_STRING = "an import string 'package.module:function'"


@dataclass
class ModelConfig:
    # a built-in network, or the user's: function(num_classes=..., input_shape=(C, H, W), **kwargs)
    name: str = _f("resnet18", choices=MODEL_NAMES, imports=True)
    kwargs: dict = _f({})  # further keyword arguments of the model's function
    width: float = _f(1.0, lo=0.0, lo_open=True, hi=16.0)  # channel multiplier (CIFAR models)
    depth: int = _f(28, lo=10, hi=100)  # WideResNet only
    widen_factor: int = _f(10, lo=1, hi=20)  # WideResNet only


@dataclass
class DataConfig:
    # a built-in data set, or the user's: function(**kwargs) -> (train, test) (training/user_code.py)
    name: str = _f("embedded", choices=DATASET_NAMES, imports=True)
    kwargs: dict = _f({})  # keyword arguments of the data function
    root: str | None = _f(None)  # data directory (cifar10/100, imagefolder)
    download: bool = _f(False)  # torchvision download for cifar10/100
    val_fraction: float = _f(0.1, lo=0.0, hi=1.0, hi_open=True)  # carved from the training set
    augment: str | None = _f(None, choices=("cifar", "imagenet", "none"))  # None: by image size
    cutout: int = _f(16, lo=0, hi=224)  # cutout square side in pixels (0: off)
    train_size: int | None = _f(None, lo=1)  # optional class-balanced subset of the train split
    num_workers: int = _f(4, lo=0, hi=64)  # DataLoader workers (ImageNet-size data only)
    # fraction of TRAINING labels replaced by a random other class (seeded; val/test clean)
    label_noise: float = _f(0.0, lo=0.0, hi=1.0, hi_open=True)


@dataclass
class TrainConfig:
    epochs: int = _f(200, lo=1, hi=100000)
    batch_size: int = _f(128, lo=1, hi=65536)
    eval_batch_size: int = _f(512, lo=1, hi=65536)
    lr: float = _f(0.05, lo=0.0, lo_open=True, hi=100.0)
    momentum: float = _f(0.9, lo=0.0, hi=1.0, hi_open=True)
    nesterov: bool = _f(False)
    weight_decay: float = _f(1e-3, lo=0.0, hi=1.0)
    warmup_epochs: int = _f(0, lo=0)
    label_smoothing: float = _f(0.0, lo=0.0, hi=1.0, hi_open=True)
    device: str = _f("auto", help="auto, cpu, cuda or cuda:N")
    precision: str = _f("auto", choices=("auto", "fp32", "bf16"))  # auto: bf16 autocast on GPU
    channels_last: bool | None = _f(None)  # null: on GPU only
    max_steps_per_epoch: int | None = _f(None, lo=1)  # cap for smoke runs
    # torch.compile the model's forward (and so its backward) for training and evaluation;
    # weights, checkpoints and the step are those of the eager model (tests/test_structured.py)
    compile: bool = _f(False)
    # Evaluate the test set every k epochs (0: only at the final epoch), and always at an epoch
    # with a new best validation accuracy (test_acc_at_best). Reported, never used to select.
    test_every: int = _f(1, lo=0, hi=100000)
    # Multi-worker trials: BatchNorm statistics over the global batch (torch SyncBatchNorm,
    # CUDA only). Off: each worker normalises with its share's statistics, and the running
    # statistics are averaged over workers every epoch (training/trainer.py).
    sync_bn: bool = _f(False)
    # Fault injection for tests: the training loss is NaN from this global step on, so a
    # divergence does not depend on how a CPU rounds a huge learning rate (null: off).
    inject_nan_at_step: int | None = _f(None, lo=0)
    # Fault injection for tests: the last worker process SIGKILLs itself at this global
    # step, unless the run was resumed from a checkpoint (null: off).
    inject_kill_at_step: int | None = _f(None, lo=0)


@dataclass
class MethodConfig:
    name: str = _f("ssam_f", choices=tuple(METHODS))
    rho: float = _f(0.1, lo=0.0, hi=10.0)  # perturbation radius (Eq. 2)
    sparsity: float = _f(0.5, lo=0.0, hi=1.0, hi_open=True)  # fraction NOT perturbed
    # auto: full for element masks (the paper's), masked for tensor masks and SAM-ON, whose
    # first pass then computes only the perturbed tensors' gradients (optim.SSAM.first_pass)
    normalize: str = _f("auto", choices=("auto", "full", "masked"))
    granularity: str = _f("element", choices=("element", "tensor"))  # whole tensors perturbed
    # SSAM-F tensor ranking (masks.py); "cost" ignores the Fisher (the ablation of results/structured)
    tensor_score: str = _f("per_flop", choices=TENSOR_SCORES)
    T_m: int = _f(1, lo=1, hi=100000)  # mask refresh interval (Alg. 1)
    mask_unit: str = _f("epoch", choices=("epoch", "step"))
    fixed_mask: bool = _f(False)  # Table 9 "fixed": build once, never refresh
    N_F: int = _f(128, lo=1, hi=1000000)  # Fisher samples (Eq. 5, Table 8)
    fisher_bn: str = _f("per_sample", choices=("per_sample", "eval"))
    alpha: float = _f(0.5, lo=0.0, hi=1.0)  # SSAM-D drop rate (Eq. 9)
    drop: str = _f("flattest", choices=("flattest", "random", "sharpest"))  # Table 7
    bn_second_pass: str = _f("update", choices=("update", "freeze"))  # BN stats at w + e
    # The perturbation schedule (method/schedule.py): a step perturbs if it is a multiple of
    # perturb_every steps after step ceil(perturb_from * total steps) and its seeded draw is below
    # perturb_prob; any other step is the base optimizer's plain step (one pass, an SGD step).
    perturb_every: int = _f(1, lo=1, hi=1000000)  # LookSAM / Composer's SAM interval
    perturb_from: float = _f(0.0, lo=0.0, hi=1.0, hi_open=True)  # SAM in the late phase only
    perturb_prob: float = _f(1.0, lo=0.0, hi=1.0, lo_open=True)  # randomized SAM steps (RST)


@dataclass
class Config:
    seed: int = _f(0, lo=0, hi=2**31 - 1)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: MethodConfig = field(default_factory=MethodConfig)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "method": MethodConfig}


def _type_name(tp) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list",
             dict: "a mapping of names to values"}
    args = [a for a in get_args(tp) if a is not type(None)]
    if args:
        return " or ".join(names.get(a, str(a)) for a in args) + " (or null)"
    return names.get(tp, str(tp))


def _coerce(value: Any, tp, path: str) -> Any:
    """Check ``value`` against a field annotation (int, float, bool, str, optional)."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], path) if value is not None else _fail_type(value, tp, path)
    if origin is Literal:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):  # NaN would pass every range check
                raise ConfigError(path, f"must be a finite number, got {value!r}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is list:
        if isinstance(value, list):
            return list(value)
    elif tp is dict:
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return copy.deepcopy(value)
    return _fail_type(value, tp, path)


def _fail_type(value, tp, path):
    raise ConfigError(path, f"must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _check_rule(value: Any, meta: dict, path: str) -> None:
    """A value against its field's rule; the message states the whole rule, e.g.
    ``must be in [0.0, 1.0), got 1.0``."""
    if value is None:
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        if not meta.get("imports"):
            raise ConfigError(path, f"must be one of {', '.join(map(str, choices))}; got {value!r}")
        if not IMPORT_RE.match(str(value)):
            raise ConfigError(path, f"must be one of {', '.join(map(str, choices))}, or {IMPORT_STRING}; "
                              f"got {value!r}")
    lo, hi, lo_open, hi_open = meta.get("lo"), meta.get("hi"), meta.get("lo_open"), meta.get("hi_open")
    below = lo is not None and (value <= lo if lo_open else value < lo)
    above = hi is not None and (value >= hi if hi_open else value > hi)
    if not (below or above):
        return
    if lo is not None and hi is not None:
        rule = f"must be in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    elif lo is not None:
        rule = f"must be {'>' if lo_open else '>='} {lo}"
    else:
        rule = f"must be {'<' if hi_open else '<='} {hi}"
    why = f" ({meta['help']})" if meta.get("help") else ""
    raise ConfigError(path, f"{rule}, got {value!r}{why}")


# a config's sections never change: their hints are resolved once (an export of 2,000 trials
# builds 10,000 sections, and resolving string annotations compiles each one anew)
_type_hints = functools.cache(typing.get_type_hints)


@functools.cache
def _yaml_keys(cls) -> dict:
    """The YAML keys of the rule-annotated dataclass ``cls``, in field order: each names its
    field, or, for a mapping that flat fields share (``rule(yaml_key="resources.cpu")``), a dict
    of the mapping's keys, each naming its field."""
    keys: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        where = f.metadata.get("yaml_key")
        if where:
            outer, inner = where.split(".")
            keys.setdefault(outer, {})[inner] = f
        else:
            keys[f.name] = f
    return keys


def _not_a_mapping(path: str, data: Any) -> ConfigError:
    return ConfigError(path or "(top level)", f"must be a mapping of keys to values, got {type(data).__name__}")


def _unknown_key(prefix: str, data: dict, allowed) -> None:
    unknown = sorted(set(map(str, data)) - set(allowed))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}", f"unknown key; allowed keys here: {', '.join(allowed)}")


def build_section(cls, data: Any, prefix: str):
    """Build the rule-annotated dataclass ``cls`` from a YAML mapping; errors name
    ``prefix + key``. Nested dataclass fields are built recursively; the flat fields that a
    ``yaml_key`` rule places in a mapping (``resources: {cpu: 2}``) are read from it, with the
    same checks and messages as a nested section's (a mapping given as null is absent)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise _not_a_mapping(prefix, data)
    keys = _yaml_keys(cls)
    hints = _type_hints(cls)
    _unknown_key(prefix, data, keys)
    kwargs = {}
    for name, f in keys.items():
        path = f"{prefix}{name}"
        if name not in data:
            continue
        if isinstance(f, dict):
            kwargs.update(_build_mapping(f, data[name], f"{path}.", hints))
            continue
        section = next((a for a in (hints[name], *get_args(hints[name])) if dataclasses.is_dataclass(a)), None)
        if section is not None and (data[name] is not None or type(None) not in get_args(hints[name])):
            kwargs[name] = build_section(section, data[name], f"{path}.")
            continue
        value = _coerce(data[name], hints[name], path)
        _check_rule(value, f.metadata, path)
        kwargs[name] = value
    return cls(**kwargs)


def _build_mapping(fields: dict, data: Any, prefix: str, hints: dict) -> dict:
    """The values of the flat fields ``fields`` (mapping key -> field) from one YAML mapping."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise _not_a_mapping(prefix, data)
    _unknown_key(prefix, data, fields)
    out = {}
    for key, f in fields.items():
        if key in data:
            path = f"{prefix}{key}"
            out[f.name] = _coerce(data[key], hints[f.name], path)
            _check_rule(out[f.name], f.metadata, path)
        elif "given" in f.metadata:
            out[f.name] = copy.deepcopy(f.metadata["given"])
    return out


def _check_cross(cfg: Config) -> None:
    """Rules that involve two keys."""
    if cfg.train.warmup_epochs >= cfg.train.epochs and cfg.train.warmup_epochs > 0:
        raise ConfigError("train.warmup_epochs", f"must be < train.epochs ({cfg.train.epochs}), "
                          f"got {cfg.train.warmup_epochs}")
    if cfg.data.name == "imagefolder" and not cfg.data.root:
        raise ConfigError("data.root", "is required for data.name: imagefolder (the folder holding train/ "
                          "and val/ or test/)")
    if cfg.model.name == "resnet50" and cfg.model.width != 1.0:
        raise ConfigError("model.width", "resnet50 has no width multiplier; use 1.0")
    if (cfg.model.depth - 4) % 6:
        raise ConfigError("model.depth",
                          f"WideResNet depth must be 6n + 4 (10, 16, 22, 28, ...), got {cfg.model.depth}")


def config_from_dict(data: Any, source: str | None = None) -> Config:
    """Build and validate a :class:`Config`; errors carry ``source`` (a file name)."""
    try:
        cfg = build_section(Config, data, "")
        _check_cross(cfg)
    except ConfigError as err:
        raise ConfigError(err.path, err.rule, source) from None
    return cfg


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def key_applies(flat: dict, key: str) -> bool:
    """Whether the dotted ``key`` means something in the training config ``flat`` (dotted
    keys, e.g. a trials.csv row): the ONE "does not apply" rule of every output (trials.csv
    and pareto.csv leave such values empty, TensorBoard marks them, best_config.yaml and the
    front's configs leave the keys out). A ``method.*`` key applies to the methods whose row
    lists it (method/methods.py); ``depth`` and ``widen_factor`` to the WideResNet; ``width`` to
    the built-in networks; ``cutout`` unless augmentation is off or ImageNet's; ``download`` to
    CIFAR; ``num_workers`` to image folders; the fault injections only when set."""
    section, _, name = key.partition(".")
    if section == "method":
        from ssam_tune.method.methods import applies

        method = flat.get("method.name")
        return method is None or applies(key, method)
    model, data = flat.get("model.name"), flat.get("data.name")
    if key in ("model.depth", "model.widen_factor"):
        return model is None or model == "wrn28_10"
    if key == "model.width":
        return model is None or not IMPORT_RE.match(str(model))
    if key == "data.cutout":
        return flat.get("data.augment") not in ("none", "imagenet")
    if key == "data.download":
        return data is None or data in ("cifar10", "cifar100")
    if key == "data.num_workers":
        return data is None or data == "imagefolder"
    if key in ("model.kwargs", "data.kwargs"):
        return bool(flat.get(key))
    if section == "train" and name.startswith("inject_"):
        return flat.get(key) is not None
    return True


def applying_config(config: dict) -> dict:
    """A nested training config with only the keys that apply (:func:`key_applies`); it
    builds the same Config (the keys left out take their defaults, which nothing reads)."""
    flat = flatten(config, sections=SECTIONS)
    out: dict = {}
    for key, value in flat.items():
        if key_applies(flat, key):
            set_by_path(out, key, value)
    return out


class _StrictLoader(yaml.SafeLoader):
    """safe_load semantics, plus duplicate keys rejected (a silent override is a typo)."""


def _construct_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(path: str | Path) -> Any:
    """Read a YAML file safely (no python tags); errors name the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("", f"file not found: {path}", str(path))
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError("", f"cannot read the file ({err})", str(path)) from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        if "python/" in str(err) or "could not determine a constructor" in str(err):
            problem = "YAML tags such as !!python/... are not allowed (safe_load only)"
        raise ConfigError("", f"invalid YAML: {where}{problem}", str(path)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load a training config file and apply ``key=value`` overrides (``--set``)."""
    data = load_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError("(top level)", "must be a mapping of keys to values", str(path))
    return config_from_dict(apply_overrides(data, overrides or []), source=str(path))


def apply_overrides(data: dict, overrides: list[str], flat: tuple[str, ...] = ()) -> dict:
    """Apply ``--set KEY=VALUE`` items to a YAML mapping in place (and return it): the value is
    read as YAML (empty: null) and set at the dotted ``KEY``. Under a section named in ``flat``
    the rest of the key is ONE key (a search space's ``search.method.rho``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError("--set", f"expected key=value, got {item!r}")
        key, raw = (part.strip() for part in item.split("=", 1))
        try:
            value = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {key}", f"the value is not valid YAML ({str(err).splitlines()[0]}): {raw!r}") \
                from None
        head, _, rest = key.partition(".")
        if head in flat and rest:
            section = data.get(head)
            if section is None:
                section = data[head] = {}
            if not isinstance(section, dict):
                raise ConfigError(key, f"{head} is not a section")
            section[rest] = value
        else:
            set_by_path(data, key, value)
    return data


def set_by_path(data: dict, dotted: str, value: Any) -> None:
    """Set ``data["a"]["b"] = value`` for ``dotted = "a.b"``, creating sections as needed."""
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(dotted, f"{part} is not a section")
        node = child
    node[parts[-1]] = value


def flatten(data: dict, prefix: str = "", sections=None) -> dict:
    """Nested dict to dotted keys, the inverse of :func:`set_by_path`: ``{"method": {"rho":
    0.1}}`` -> ``{"method.rho": 0.1}``. Every mapping is opened, or with ``sections`` only the
    mappings under those keys (a case of a search space: a mapping anywhere else is a value,
    which the config's rules then refuse as the value it is)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and (sections is None or key in sections):
            out.update(flatten(value, f"{prefix}{key}.", sections))
        else:
            out[f"{prefix}{key}"] = value
    return out


def get_by_path(cfg_dict: dict, dotted: str) -> Any:
    node = cfg_dict
    for part in dotted.split("."):
        node = node[part]
    return node
