"""Search-space YAML: the fixed training config plus ``search:``/``cases:``, ``seeds:``, ``tune:``.

Everything is validated here, before Ray starts: every error is a one-line
:class:`~ssam_tune.training.config.ConfigError` naming the YAML path and the rule. The resolved
space turns into concrete training configs through :func:`sample_params` (define-by-run:
conditional parameters are only sampled when the sampled method uses them) and
:func:`resolve_config`.
"""

from __future__ import annotations

import copy
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ssam_tune.method.methods import METHODS, applies
from ssam_tune.storage.files import is_uri
from ssam_tune.training.config import (
    SECTIONS,
    Config,
    ConfigError,
    build_section,
    config_from_dict,
    config_to_dict,
    flatten,
    get_by_path,
    load_yaml,
    rule,
    set_by_path,
)
from ssam_tune.training.user_code import is_import_string

__all__ = ["Dist", "SearchSpace", "TuneSettings", "load_space", "resolve_config", "sample_params", "smoke",
           "space_to_dict"]

DIST_TYPES = ("uniform", "loguniform", "int", "choice")
TOP_KEYS = ("name", "seed", "model", "data", "train", "method", "search", "cases", "seeds", "tune")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


@dataclass(frozen=True)
class Dist:
    """One searched key: ``{type: uniform|loguniform|int|choice, low, high, step, values}``."""

    key: str
    type: str
    low: float | None = None
    high: float | None = None
    step: float | None = None
    values: tuple = ()

    def describe(self) -> str:
        if self.type == "choice":
            return f"choice {list(self.values)}"
        step = f" step {self.step}" if self.step else ""
        return f"{self.type} [{self.low}, {self.high}]{step}"


# What the Tune trial of a data-parallel trial holds: it only drives its Ray Train run, whose
# workers hold tune.resources each. Ray refuses an empty request; a sliver of memory (a
# logical resource) keeps the driver off the CPUs and GPUs its workers are sized to fill.
DRIVER_MEMORY = 2**28


# -- the tune: section --------------------------------------------------------------------------
OBJECTIVES = ("single", "multi")
SAMPLERS = ("tpe", "nsga2", "random")
BASELINES = ("sgd", "sam", "ssam")
# tune.flops -> the per-epoch metric that is the search's cost axis.
COST_METRICS = {"theoretical": "flops_theoretical", "executed": "flops_executed", "wall": "train_seconds"}
# auto: none. On real learning curves (benchmarks/curves/) accuracy at a quarter of training
# does not rank final accuracy (Spearman about 0 at epoch 3 of 12; README, "Early stopping"),
# and under the same epoch budget every early-stopping strategy measured lost to running each
# trial in full (benchmarks/bench_replay_label_noise.txt). mo_asha and asha stay available;
# their first rung defaults to two thirds of the epochs, where the correlation is 0.6 or more.
SCHEDULERS = ("auto", "mo_asha", "asha", "none")
# Checkpoints of finished trials: "front" keeps those of the Pareto front and the best trial
# (deleted as soon as a trial is pruned or diverges, the rest after the export); "all" keeps
# every trial's last keep_checkpoints.
RETAIN = ("front", "all")
# Measurements of the front points after the search (ssam_tune/sharpness.py): "sharpness" is
# the Hessian's top eigenvalues and trace at each front point's final weights.
DIAGNOSTICS = ("none", "sharpness")


@dataclass
class TuneSettings:
    """The ``tune:`` section, each setting once: its YAML place, default and value rule
    (:func:`~ssam_tune.training.config.rule`, checked by ``build_section``), then resolved by
    :func:`_parse_tune` (the shorthands, the rules between keys, ``scheduler: auto``, the
    grace period, NSGA-II's population). Flat: ``resources.cpu`` is ``cpu``,
    ``scheduler.type`` is ``scheduler``, ``confirm.top_k`` is ``confirm_top_k``.

    Ray pickles it (the searcher's SearchSpace): an instance pickled by an older version
    lacks the fields added since, which ``SsamSearcher.restore`` fills with their defaults."""

    num_samples: int = field(default=20, metadata=rule(lo=1))
    objective: str = field(default="multi", metadata=rule(choices=OBJECTIVES))
    flops: str = field(default="theoretical", metadata=rule(choices=tuple(COST_METRICS)))
    sampler: str = field(default="tpe", metadata=rule(choices=SAMPLERS))
    n_startup_trials: int = field(default=10, metadata=rule(lo=0, help="tpe only"))
    # nsga2 only; resolved from the budget when not given
    population_size: int | None = field(default=None, metadata=rule(lo=2, help="nsga2 only; default from "
                                                                              "num_samples"))
    seed: int = field(default=0, metadata=rule(lo=0))
    # resolved: mo_asha, asha or none ("auto" is not kept)
    scheduler: str = field(default="auto", metadata=rule(choices=SCHEDULERS, yaml_key="scheduler.type"))
    # ASHA only (None without a scheduler); resolved to two thirds of train.epochs when not given
    grace_period: int | None = field(default=None, metadata=rule(lo=1, yaml_key="scheduler.grace_period"))
    reduction_factor: float = field(default=3.0, metadata=rule(lo=1.0, lo_open=True,
                                                               yaml_key="scheduler.reduction_factor"))
    baselines: list = field(default_factory=lambda: list(BASELINES), metadata=rule())
    # configs the sampler proposes first (Optuna's enqueue_trial), e.g. the paper's settings:
    # mappings of searched keys to values; a key an entry leaves out is sampled
    enqueue: list = field(default_factory=list, metadata=rule())
    # > 1: a data-parallel trial on Ray Train; cpu and gpu are per worker
    workers: int = field(default=1, metadata=rule(lo=1, hi=4096, yaml_key="resources.workers"))
    cpu: float = field(default=1.0, metadata=rule(lo=0.0, lo_open=True, yaml_key="resources.cpu"))
    gpu: float = field(default=0.0, metadata=rule(
        lo=0.0, hi=1.0, help="a fraction of one GPU per worker; more GPUs per trial: tune.resources.workers",
        yaml_key="resources.gpu"))
    max_concurrent_trials: int | None = field(default=None, metadata=rule(lo=1))
    time_budget_s: float | None = field(default=None, metadata=rule(lo=0.0, lo_open=True))
    storage_path: str | None = field(default=None, metadata=rule())
    max_failures: int = field(default=2, metadata=rule(lo=0))
    keep_checkpoints: int = field(default=2, metadata=rule(lo=1, hi=2, help="bounded disk use"))
    retain_checkpoints: str = field(default="front", metadata=rule(choices=RETAIN))
    diagnostics: str = field(default="none", metadata=rule(choices=DIAGNOSTICS))
    # the front points re-run with fresh seeds: 0 without a confirm: mapping (no confirmation
    # step); top_k 3 and seeds [1, 2, 3] where the mapping leaves them out
    confirm_top_k: int = field(default=0, metadata=rule(lo=1, yaml_key="confirm.top_k", given=3))
    confirm_seeds: list = field(default_factory=list, metadata=rule(yaml_key="confirm.seeds", given=[1, 2, 3]))

    def per_trial(self) -> dict[str, float]:
        """The CPUs and GPUs one trial holds: all its workers' together."""
        return {"CPU": self.workers * self.cpu, "GPU": self.workers * self.gpu}

    def trials_that_fit(self, cpus: float, gpus: float) -> int:
        """How many trials run at once on ``cpus`` CPUs and ``gpus`` GPUs in all, counting
        whole trials (or workers) per GPU and not how they pack onto nodes."""
        fit = int(cpus // (self.workers * self.cpu))
        if self.gpu:
            per_gpu = int(1 / self.gpu + 1e-9)  # trials sharing one GPU (workers > 1: gpu is 1)
            fit = min(fit, int(gpus) * per_gpu // self.workers)
        return fit

    def describe_resources(self, cpus: float, gpus: float, where: str) -> str:
        if self.workers == 1:
            head = f"resources per trial: {self.cpu:g} CPU, {self.gpu:g} GPU"
        else:
            total = self.per_trial()
            head = (f"resources per trial: {self.workers} data-parallel workers (Ray Train) x {self.cpu:g} CPU, "
                    f"{self.gpu:g} GPU = {total['GPU']:g} GPUs and {total['CPU']:g} CPUs per trial")
        fit = self.trials_that_fit(cpus, gpus)
        limit = self.max_concurrent_trials or ("auto: as many as fit" if self.workers > 1 else "auto")
        return (f"{head}; max concurrent: {limit}\n"
                f"trials that fit at once on {where} ({cpus:g} CPUs, {gpus:g} GPUs): {fit}")

    @property
    def flops_metric(self) -> str:
        return COST_METRICS[self.flops]

    def rungs(self, epochs: int) -> list[int]:
        """The epochs at which the scheduler ranks trials (none without a scheduler)."""
        return milestones(self.grace_period, self.reduction_factor, epochs) if self.scheduler != "none" else []

    def expected_full_runs(self, epochs: int) -> float:
        """How many sampled trials reach full fidelity: successive halving keeps about
        1/reduction_factor of the trials at each rung."""
        return self.num_samples / self.reduction_factor ** len(self.rungs(epochs))

    def describe_sampler(self, epochs: int) -> str:
        """The sampler and the settings it uses (only those)."""
        first = getattr(self, "enqueue", None)  # absent from an instance pickled by an older version
        if first:
            return f"{len(first)} enqueued configs (tune.enqueue), then {self._describe_sampler(epochs)}"
        return self._describe_sampler(epochs)

    def _describe_sampler(self, epochs: int) -> str:
        if self.sampler == "tpe":
            return (f"tpe (seed {self.seed}, {self.n_startup_trials} random start-up trials, then a joint "
                    "density per method's keys)")
        if self.sampler == "nsga2":
            return (f"nsga2 (seed {self.seed}, population {self.population_size}; about "
                    f"{self.expected_full_runs(epochs):.0f} full-fidelity trials expected: "
                    f"{self.generations(epochs)} generation(s))")
        return f"random (seed {self.seed})"

    def describe_scheduler(self, epochs: int) -> str:
        rungs = f"rungs at epochs {self.rungs(epochs)}, reduction factor {self.reduction_factor:g}; anchors never " \
                "stopped"
        if self.scheduler == "mo_asha":
            ranked = "val_acc" if self.objective == "single" else \
                f"val_acc and full-run {self.flops_metric} (non-dominated sorting, then crowding distance)"
            return f"MO-ASHA on {ranked}, {rungs}"
        if self.scheduler == "asha":
            return f"ASHA on val_acc only, {rungs}"
        return "none (every trial runs all epochs)"

    def default_population(self, epochs: int) -> int:
        """NSGA-II's default population: four generations of the full-fidelity trials the
        budget yields, at least 2 and at most 50 (Optuna's own default)."""
        return int(max(2, min(50, self.expected_full_runs(epochs) // 4)))

    def generations(self, epochs: int) -> int:
        """NSGA-II generations the budget fills (a generation closes after population_size
        COMPLETE trials; pruned and failed ones do not count)."""
        return int(self.expected_full_runs(epochs) // self.population_size) if self.population_size else 0


@dataclass
class SearchSpace:
    name: str
    source: str
    base: dict  # the fixed training config (validated, as a plain dict)
    search: list  # list[Dist]
    cases: list  # list[dict dotted -> value]
    seeds: list
    tune: TuneSettings

    @property
    def epochs(self) -> int:
        return int(self.base["train"]["epochs"])

    @property
    def mode(self) -> str:
        return "search" if self.search else "cases"

    def fixed_trials(self) -> list[tuple[str, dict]]:
        """(label, config) of the trials run before (or instead of) the sampler's."""
        if self.mode == "cases":
            out = []
            for i, case in enumerate(self.cases):
                for seed in self.seeds:
                    label = case.get("label") or f"case{i}"
                    params = {k: v for k, v in case.items() if k != "label"}
                    out.append((f"{label}/seed{seed}", resolve_config(self.base, {**params, "seed": seed})))
            return out
        return [(b, resolve_config(self.base, baseline_params(b, self.base))) for b in self.tune.baselines]

    def budget(self) -> int:
        return len(self.fixed_trials()) + (self.tune.num_samples if self.mode == "search" else 0)


def milestones(grace_period: int, reduction_factor: float, max_t: int) -> list[int]:
    """ASHA's rungs below ``max_t``: grace, grace*rf, grace*rf^2, ... (epochs, rounded)."""
    out, r = [], float(grace_period)
    while int(round(r)) < max_t:
        if not out or int(round(r)) > out[-1]:
            out.append(int(round(r)))
        r *= reduction_factor
    return out


def baseline_params(which: str, base: dict) -> dict:
    """The anchors of every front: SGD (1x), SAM (2x) and the paper's default SSAM
    (SSAM-F, 50% sparsity, T_m = 1, N_F = 128: Table 1), with the base config's rho."""
    if which == "sgd":
        return {"method.name": "sgd"}
    if which == "sam":
        return {"method.name": "sam"}
    return {"method.name": "ssam_f", "method.sparsity": 0.5, "method.T_m": 1, "method.N_F": 128}


def resolve_config(base: dict, params: dict) -> dict:
    """The base config with dotted ``params`` applied, validated, as a nested dict."""
    data = copy.deepcopy(base)
    for key, value in params.items():
        set_by_path(data, key, value)
    return config_to_dict(config_from_dict(data))


def sample_params(space: SearchSpace, trial) -> dict:
    """Define-by-run sampling on an Optuna trial: the method first, then only the keys
    that the sampled method uses (N_F for ssam_f, alpha/drop for ssam_d, ...)."""
    params: dict[str, Any] = {}
    dists = {d.key: d for d in space.search}
    order = sorted(dists, key=lambda k: (k != "method.name", k))
    method = space.base["method"]["name"]
    for key in order:
        d = dists[key]
        if key != "method.name" and not applies(key, method):
            continue
        if d.type == "choice":
            value = trial.suggest_categorical(key, list(d.values))
        elif d.type == "int":
            value = trial.suggest_int(key, int(d.low), int(d.high), step=int(d.step or 1))
        else:
            value = trial.suggest_float(key, d.low, d.high, step=d.step, log=d.type == "loguniform")
        params[key] = value
        if key == "method.name":
            method = value
    return params


# ---------------------------------------------------------------------------------------------
# loading and validation
# ---------------------------------------------------------------------------------------------
def _num(value, path, *, integer=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a number"
        raise ConfigError(path, f"must be {kind}, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(path, f"must be finite, got {value!r}")
    return value


def _parse_dist(key: str, spec: Any, base: dict) -> Dist:
    path = f"search.{key}"
    if not isinstance(spec, dict):
        raise ConfigError(path, "must be a mapping like {type: loguniform, low: 0.01, high: 0.5}")
    unknown = sorted(set(spec) - {"type", "low", "high", "step", "values"})
    if unknown:
        raise ConfigError(f"{path}.{unknown[0]}", "unknown key; allowed: type, low, high, step, values")
    kind = spec.get("type")
    if kind not in DIST_TYPES:
        raise ConfigError(f"{path}.type", f"must be one of {', '.join(DIST_TYPES)}; got {kind!r}")
    try:
        get_by_path(config_to_dict(Config()), key)
    except (KeyError, TypeError):
        raise ConfigError(path, "is not a training config key (use section.key, e.g. method.rho)") from None
    if key == "seed":
        raise ConfigError(path, "the seed is not a hyper-parameter; use cases and seeds for repeats")
    if kind == "choice":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}.values", "must be a non-empty list")
        if len({repr(v) for v in values}) != len(values):
            raise ConfigError(f"{path}.values", "must not repeat a value")
        for extra in ("low", "high", "step"):
            if extra in spec:
                raise ConfigError(f"{path}.{extra}", "only uniform, loguniform and int take low/high/step")
        for i, v in enumerate(values):
            _check_value(base, key, v, f"{path}.values[{i}]")
        return Dist(key, kind, values=tuple(values))
    if "values" in spec:
        raise ConfigError(f"{path}.values", "only type choice takes values")
    for bound in ("low", "high"):
        if bound not in spec:
            raise ConfigError(f"{path}.{bound}", "is required")
    integer = kind == "int"
    low = _num(spec["low"], f"{path}.low", integer=integer)
    high = _num(spec["high"], f"{path}.high", integer=integer)
    if low > high or (low == high and not integer):
        raise ConfigError(path, f"low < high must hold, got low={low}, high={high}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{path}.low", f"loguniform needs low > 0, got {low}")
    step = spec.get("step")
    if step is not None:
        if kind == "loguniform":
            raise ConfigError(f"{path}.step", "loguniform takes no step")
        step = _num(step, f"{path}.step", integer=integer)
        if step <= 0:
            raise ConfigError(f"{path}.step", f"must be > 0, got {step}")
    _check_value(base, key, low, f"{path}.low")
    _check_value(base, key, high, f"{path}.high")
    return Dist(key, kind, float(low) if not integer else int(low), float(high) if not integer else int(high), step)


def _check_value(base: dict, key: str, value: Any, path: str) -> None:
    """A searched value must itself be a valid config value (range rules, choices)."""
    data = copy.deepcopy(base)
    set_by_path(data, key, value)
    try:
        config_from_dict(data)
    except ConfigError as err:
        if err.path == key:
            raise ConfigError(path, err.rule) from None
        # a cross-key rule that another value trips (e.g. warmup vs epochs): report it too
        raise ConfigError(path, f"{err.path}: {err.rule}") from None


def _parse_tune(raw: Any, epochs: int, stored: bool = False) -> TuneSettings:
    """The ``tune:`` section: the value rules of :class:`TuneSettings`' fields, plus the
    shorthands (``scheduler: none``, ``baselines: false``) and the rules that involve other
    keys (the grace period against train.epochs)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("tune", "must be a mapping")
    raw = dict(raw)
    sched = raw.get("scheduler")
    if sched in SCHEDULERS:
        raw["scheduler"] = {"type": sched}
    elif sched is None and "scheduler" in raw:
        raw["scheduler"] = {"type": "none"}
    elif sched is not None and not isinstance(sched, dict):
        raise ConfigError("tune.scheduler", f"must be one of {', '.join(SCHEDULERS)} or a mapping like "
                          "{type: mo_asha, grace_period: 50}")
    if raw.get("baselines") in (False, None) and "baselines" in raw:
        raw["baselines"] = []
    elif raw.get("baselines") is True:
        raw["baselines"] = list(BASELINES)
    if raw.get("confirm") is not None and not isinstance(raw["confirm"], dict):
        raise ConfigError("tune.confirm", "must be a mapping like {top_k: 3, seeds: [1, 2, 3]}")
    t = build_section(TuneSettings, raw, "tune.")

    # settings the chosen sampler would silently ignore are refused (in a space.yaml stored by
    # an experiment they are dropped: older versions always wrote n_startup_trials)
    ignored = {"n_startup_trials": ("tpe",), "population_size": ("nsga2",)}
    for key, samplers in ignored.items():
        if raw.get(key) is not None and t.sampler not in samplers and not stored:
            why = ("its first generation (population_size trials) is its start-up" if t.sampler == "nsga2"
                   else "every trial is random")
            raise ConfigError(f"tune.{key}", f"only applies to sampler {' or '.join(samplers)}; sampler "
                              f"{t.sampler} ignores it ({why}); remove it")
    if any(b not in BASELINES for b in t.baselines):
        raise ConfigError("tune.baselines", f"must be a list drawn from {', '.join(BASELINES)} (or false); "
                          f"got {t.baselines!r}")
    t.baselines = list(dict.fromkeys(t.baselines))
    if t.storage_path is not None and not t.storage_path:
        raise ConfigError("tune.storage_path", "must be a path or URI string, got ''")
    if t.scheduler == "auto":
        t.scheduler = "none"
    if t.scheduler != "none":
        grace = t.grace_period or max(1, math.ceil(2 * epochs / 3))  # the last third: see SCHEDULERS
        if not 1 <= grace <= epochs:
            raise ConfigError("tune.scheduler.grace_period",
                              f"must be between 1 and train.epochs ({epochs}), got {grace}")
        t.grace_period = grace
    else:  # no rungs: the ASHA settings a mapping may give are not kept (nor written back)
        unset = TuneSettings()
        t.grace_period, t.reduction_factor = unset.grace_period, unset.reduction_factor
    if t.sampler == "nsga2" and t.population_size is None:
        t.population_size = t.default_population(epochs)
    if raw.get("confirm") is not None:
        seeds = t.confirm_seeds
        if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
            raise ConfigError("tune.confirm.seeds", f"must be a non-empty list of integers >= 0, got {seeds!r}")
    return t


def load_space(path: str | os.PathLike, *, data: Any = None, check_paths: bool = True,
               stored: bool = False) -> SearchSpace:
    """Load and validate a search-space YAML (``data`` instead of reading ``path``).

    ``check_paths`` also requires ``data.root`` to exist unless the data is downloaded.
    ``stored``: the ``space.yaml`` an experiment stored (possibly by an older version), read
    leniently where a newer rule would refuse what an older version wrote."""
    source = str(path)
    try:
        raw = load_yaml(path) if data is None else data
        return _parse_space(raw, source, Path(path).stem, check_paths, stored)
    except ConfigError as err:
        raise ConfigError(err.path, err.rule, source) from None


def _parse_space(raw: Any, source: str, stem: str, check_paths: bool = True, stored: bool = False) -> SearchSpace:
    if not isinstance(raw, dict):
        raise ConfigError("(top level)", "must be a mapping with the training config, search or cases, and tune")
    unknown = sorted(set(map(str, raw)) - set(TOP_KEYS))
    if unknown:
        raise ConfigError(unknown[0], f"unknown key; allowed top-level keys: {', '.join(TOP_KEYS)}")
    name = raw.get("name", stem)
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise ConfigError("name", f"must be letters, digits, '_', '-' or '.', start with a letter or digit and stay "
                          f"inside results/ (no '/' or '..'); got {name!r}")
    base_raw = {k: raw[k] for k in ("seed", "model", "data", "train", "method") if k in raw}
    base_cfg = config_from_dict(base_raw)
    base = config_to_dict(base_cfg)
    # Relative paths are taken from the directory the search is launched from, and made
    # absolute here, so they still work inside trials (whose working directory may differ).
    if base["data"]["root"] and not is_uri(base["data"]["root"]):
        base["data"]["root"] = str(Path(base["data"]["root"]).expanduser().resolve())
    if check_paths and base_cfg.data.name in ("cifar10", "cifar100", "imagefolder") and base["data"]["root"] and \
            not base_cfg.data.download and not Path(base["data"]["root"]).exists():
        raise ConfigError("data.root", f"directory not found: {base['data']['root']} (put the data there, or set "
                          "data.download: true for cifar10/cifar100)")

    search_raw, cases_raw = raw.get("search"), raw.get("cases")
    if search_raw is not None and cases_raw is not None:
        raise ConfigError("cases", "give either search (a sampled space) or cases (an explicit list), not both")
    if search_raw is None and cases_raw is None:
        raise ConfigError("search", "is required (or cases): nothing to search")
    tune = _parse_tune(raw.get("tune"), base_cfg.train.epochs, stored)
    _check_workers(tune, base_cfg.train, raw.get("search"))
    search, cases = [], []
    if search_raw is not None:
        if not isinstance(search_raw, dict) or not search_raw:
            raise ConfigError("search", "must be a non-empty mapping of config keys to distributions")
        if base_cfg.data.val_fraction <= 0:
            raise ConfigError("data.val_fraction", "a search selects on validation accuracy; must be > 0 "
                              "(for example 0.1)")
        search = [_parse_dist(str(k), v, base) for k, v in search_raw.items()]
        _check_conditionals(search, base)
        tune.enqueue = _parse_enqueue(tune.enqueue, search, base)
        if "seeds" in raw:
            raise ConfigError("seeds", "only applies to cases; a search samples configs once each "
                              "(use tune.confirm for seeds of the winners)")
    else:
        if not isinstance(cases_raw, list) or not cases_raw:
            raise ConfigError("cases", "must be a non-empty list of config overrides")
        seeds = raw.get("seeds", [base_cfg.seed])
        if not isinstance(seeds, list) or not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0
                                                         for s in seeds):
            raise ConfigError("seeds", f"must be a non-empty list of integers >= 0, got {seeds!r}")
        for i, case in enumerate(cases_raw):
            if not isinstance(case, dict) or not case:
                raise ConfigError(f"cases[{i}]", "must be a non-empty mapping of config keys to values")
            flat = flatten(case, sections=SECTIONS)
            label = flat.get("label")
            if label is not None and (not isinstance(label, str) or not NAME_RE.match(label)):
                raise ConfigError(f"cases[{i}].label", f"must be a short name of letters, digits, '_', '-', '.'; "
                                  f"got {label!r}")
            # all of a case's keys at once: some must change together (data.name + data.root)
            data = copy.deepcopy(base)
            try:
                for key, value in flat.items():
                    if key != "label":
                        set_by_path(data, key, value)
                case_cfg = config_from_dict(data)
            except ConfigError as err:
                raise ConfigError(f"cases[{i}].{err.path}", err.rule) from None
            try:
                _check_workers(tune, case_cfg.train, None)
            except ConfigError as err:
                raise ConfigError(f"cases[{i}].{err.path}", err.rule) from None
            cases.append(flat)
        if tune.enqueue:
            raise ConfigError("tune.enqueue", "only applies to a search (a sampled space); cases are run as listed")
        tune.baselines = []
        tune.num_samples = len(cases) * len(seeds)
    return SearchSpace(name=name, source=source, base=base, search=search, cases=cases,
                       seeds=raw.get("seeds", [base_cfg.seed]) if cases else [], tune=tune)


def _check_workers(t: TuneSettings, train, search_raw) -> None:
    """A data-parallel trial splits train.batch_size (the global batch) over its workers."""
    if t.workers == 1:
        return
    if train.sync_bn and not t.gpu:
        raise ConfigError("train.sync_bn", "needs GPU workers (torch's SyncBatchNorm trains on CUDA only); set "
                          "tune.resources.gpu, or train.sync_bn: false")
    if 0 < t.gpu < 1:
        raise ConfigError("tune.resources.gpu", f"{t.gpu:g}: the workers of a data-parallel trial need a whole GPU "
                          "each (NCCL runs one rank per GPU); use gpu: 1, or workers: 1 to share GPUs between trials")
    sizes = [train.batch_size]
    spec = search_raw.get("train.batch_size") if isinstance(search_raw, dict) else None
    if isinstance(spec, dict):
        sizes += [v for v in spec.get("values") or [] if isinstance(v, int)]
        if spec.get("type") == "int" and (spec.get("low", 0) % t.workers or (spec.get("step") or 1) % t.workers):
            raise ConfigError("search.train.batch_size", f"low and step must be multiples of tune.resources.workers="
                              f"{t.workers}, so every sampled batch splits evenly over the workers")
    for size in sizes:
        if size % t.workers:
            raise ConfigError("train.batch_size", f"{size} does not split evenly over tune.resources.workers="
                              f"{t.workers}: use a multiple of {t.workers} (train.batch_size is the global "
                              "batch; each worker takes batch_size / workers of it)")


def _parse_enqueue(entries: list, search: list, base: dict) -> list[dict]:
    """``tune.enqueue``: each entry a mapping of searched keys to values inside their
    distributions; ``method.name`` is required when it is searched, and every other key must
    apply to that method."""
    dists = {d.key: d for d in search}
    out = []
    for i, entry in enumerate(entries):
        path = f"tune.enqueue[{i}]"
        if not isinstance(entry, dict) or not entry:
            raise ConfigError(path, "must be a non-empty mapping of searched keys to values, like "
                              "{method.name: ssam_f, method.sparsity: 0.9}")
        flat = flatten(entry, sections=SECTIONS)
        if "method.name" in dists and "method.name" not in flat:
            raise ConfigError(path, "must give method.name (it is searched, and the other keys depend on it)")
        method = flat.get("method.name", base["method"]["name"])
        for key, value in flat.items():
            where = f"{path}.{key}"
            if key not in dists:
                raise ConfigError(where, f"is not a searched key; the searched keys are {', '.join(dists)}")
            d = dists[key]
            if d.type == "choice":
                if value not in d.values:
                    raise ConfigError(where, f"must be one of the searched values {list(d.values)}, got {value!r}")
            else:
                number = _num(value, where, integer=d.type == "int")
                if not d.low <= number <= d.high:
                    raise ConfigError(where, f"must lie in the searched range [{d.low}, {d.high}], got {value!r}")
            if key != "method.name" and not applies(key, method):
                raise ConfigError(where, f"does not apply to method {method}; remove it")
        out.append(flat)
    return out


def _check_conditionals(search: list, base: dict) -> None:
    dists = {d.key: d for d in search}
    methods = list(dists["method.name"].values) if "method.name" in dists else [base["method"]["name"]]
    for d in search:
        if not any(applies(d.key, m) for m in methods):
            allowed = [m for m in METHODS if applies(d.key, m)]
            raise ConfigError(f"search.{d.key}", f"only applies to method {' or '.join(allowed)}, but the method is "
                              f"{' or '.join(methods)}; remove it or search method.name")


def space_to_dict(space: SearchSpace) -> dict:
    """A YAML dict that :func:`load_space` reads back into the same space."""
    out = {"name": space.name, **copy.deepcopy(space.base)}
    if space.search:
        out["search"] = {}
        for d in space.search:
            spec = {"type": d.type}
            if d.type == "choice":
                spec["values"] = list(d.values)
            else:
                spec.update(low=d.low, high=d.high)
                if d.step is not None:
                    spec["step"] = d.step
            out["search"][d.key] = spec
    else:
        out["cases"] = copy.deepcopy(space.cases)
        out["seeds"] = list(space.seeds)
    t = space.tune
    out["tune"] = {
        "num_samples": t.num_samples, "objective": t.objective, "flops": t.flops, "sampler": t.sampler,
        **({"n_startup_trials": t.n_startup_trials} if t.sampler == "tpe" else {}),
        **({"population_size": t.population_size} if t.sampler == "nsga2" else {}), "seed": t.seed,
        "scheduler": {"type": t.scheduler, "grace_period": t.grace_period, "reduction_factor": t.reduction_factor}
        if t.scheduler != "none" else "none",
        "baselines": list(t.baselines) or False,
        # written only when given, so older versions still read (export) the file
        **({"enqueue": copy.deepcopy(t.enqueue)} if getattr(t, "enqueue", None) else {}),
        # workers written only when > 1, so older versions still read (export) the file
        "resources": {**({"workers": t.workers} if t.workers > 1 else {}), "cpu": t.cpu, "gpu": t.gpu},
        "max_concurrent_trials": t.max_concurrent_trials, "time_budget_s": t.time_budget_s,
        "storage_path": t.storage_path, "max_failures": t.max_failures, "keep_checkpoints": t.keep_checkpoints,
        # written only when not the default, so older versions still read (export) the file
        **({"retain_checkpoints": t.retain_checkpoints} if t.retain_checkpoints != "front" else {}),
        **({"diagnostics": t.diagnostics} if getattr(t, "diagnostics", "none") != "none" else {}),
    }
    if t.confirm_top_k:
        out["tune"]["confirm"] = {"top_k": t.confirm_top_k, "seeds": list(t.confirm_seeds)}
    if space.mode == "cases":
        for key in ("num_samples", "baselines"):
            out["tune"].pop(key)
    return out


def smoke(space: SearchSpace) -> SearchSpace:
    """Shrink any space to a CPU check of a few minutes: a small stand-in model on the
    embedded data, 2 epochs, a handful of trials."""
    s = copy.deepcopy(space)
    b = s.base
    if b["model"]["name"] in ("resnet50", "wrn28_10"):
        b["model"]["name"] = "resnet18"
    b["model"]["width"] = 0.125
    if is_import_string(b["data"]["name"]):  # a user's data set stays (a model may need its shape)
        b["data"].update({"train_size": min(b["data"]["train_size"] or 512, 512)})
    else:
        b["data"].update({"name": "embedded", "root": None, "download": False, "train_size": 512, "augment": None,
                          "val_fraction": max(0.1, b["data"]["val_fraction"])})
    b["train"].update({"epochs": 2, "batch_size": 64, "eval_batch_size": 256, "warmup_epochs": 0,
                       "device": "auto", "max_steps_per_epoch": None})
    if b["method"]["N_F"] > 64:
        b["method"]["N_F"] = 64
    s.search = [d if d.key != "method.N_F" else Dist(d.key, "choice", values=(16, 64)) for d in s.search]
    s.search = [d for d in s.search if not d.key.startswith(("model.", "data.", "train.epochs", "train.batch"))]
    t = s.tune
    t.num_samples = min(t.num_samples, 4)
    t.n_startup_trials = min(t.n_startup_trials, 2)
    if t.scheduler != "none":
        t.grace_period = 1
    t.cpu, t.gpu = 1.0, 0.0
    b["train"]["sync_bn"] = False  # CUDA only
    t.workers = min(t.workers, 2)  # a data-parallel space keeps the Ray Train path, on 2 CPU workers
    t.max_concurrent_trials = 2 if t.workers == 1 else 1
    t.time_budget_s = None
    t.confirm_top_k, t.confirm_seeds = 0, []
    if t.sampler == "nsga2":
        t.population_size = t.default_population(s.epochs)
    # enqueued configs keep only what the shrunk space still searches, with values inside it
    smoke_dists = {d.key: d for d in s.search}
    t.enqueue = [{k: v for k, v in entry.items() if k in smoke_dists and
                  (smoke_dists[k].type != "choice" or v in smoke_dists[k].values)}
                 for entry in getattr(t, "enqueue", None) or []][:t.num_samples]
    if s.mode == "cases":
        s.cases = s.cases[:4]
        s.seeds = s.seeds[:1]
        t.num_samples = len(s.cases)
    s.name = f"{space.name}-smoke"
    # re-validate every fixed trial of the shrunk space
    s.fixed_trials()
    return s
