"""`python -m ssam_tune.run SPACE.yaml`: a search (or a list of cases) on Ray Tune.

    python -m ssam_tune.run SPACE.yaml [--set KEY=VALUE ...] [--address ADDR] [--storage PATH]
                                       [--name NAME] [--resume [auto]] [--num-samples N] [--smoke]
                                       [--dry-run]

The space is validated before Ray starts (exit code 2, nothing started or written). The Ray
experiment goes to ``<storage>/<name>`` (default storage: ``results/ray``), the exports to
``results/<name>/``. ``--resume`` finishes an experiment whose driver was killed;
``--resume auto`` starts the experiment if it is absent and resumes it if present (an
idempotent entrypoint for jobs that a cluster may restart).

This module is the command line and the order of things (:func:`run_search`: run, settle the
study, export, thin the checkpoints, confirm); the Ray Tune experiment itself (Ray, the
Tuner, ``fit()``, the study settled) is :mod:`ssam_tune.tuning.tuner`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import yaml

from ssam_tune.storage.experiment import RESULTS, SPACE_FILE, Experiment, resolve_storage
from ssam_tune.training.config import ConfigError, apply_overrides, load_yaml
from ssam_tune.tuning.space import NAME_RE, SearchSpace, load_space, smoke, space_to_dict

__all__ = ["SearchResult", "main", "run_search", "space_to_dict", "tune"]


def describe(space: SearchSpace, full: bool = True) -> str:
    """The resolved space and the trial budget (``--dry-run``); without ``full``, the fixed
    training config is left out (a run prints this header)."""
    t = space.tune
    lines = [f"experiment: {space.name}  (from {space.source})"]
    if full:
        lines.append("fixed training config:")
        lines += ["  " + line for line in yaml.safe_dump(space.base, sort_keys=False).splitlines()]
    else:
        b = space.base
        lines.append(f"training: {b['model']['name']} (width {b['model']['width']:g}) on {b['data']['name']}, "
                     f"{space.epochs} epochs, batch {b['train']['batch_size']}, lr {b['train']['lr']:g} "
                     "(--dry-run prints the whole config)")
    if space.search:
        lines.append("search (define-by-run; conditional keys only for the methods that use them):")
        lines += [f"  {d.key}: {d.describe()}" for d in space.search]
    fixed = space.fixed_trials()
    lines.append(f"fixed trials ({'cases x seeds' if space.mode == 'cases' else 'baselines'}): "
                 f"{', '.join(label for label, _ in fixed) or 'none'}")
    lines += _schedule_lines(fixed)
    sampled = t.num_samples if space.mode == "search" else 0
    lines.append(f"trial budget: {len(fixed) + sampled} trials ({len(fixed)} fixed + {sampled} sampled), "
                 f"{space.epochs} epochs each at most")
    objective = "validation accuracy (max)" if t.objective == "single" else \
        f"validation accuracy (max) and {t.flops} FLOPs ({t.flops_metric}, min)"
    lines.append(f"objective: {objective}")
    lines.append(f"sampler: {t.describe_sampler(space.epochs)}")
    if t.sampler == "nsga2" and t.generations(space.epochs) < 2:
        lines.append(f"warning: the budget fills {t.generations(space.epochs)} NSGA-II generation(s) of "
                     f"{t.population_size}; below 2 it is random search. Raise num_samples or lower "
                     "tune.population_size.")
    if t.sampler == "nsga2" and t.time_budget_s:
        lines.append("note: with tune.time_budget_s, num_samples is only a ceiling and the default population "
                     "assumes all of it runs; set tune.population_size to what the time allows.")
    lines.append(f"scheduler: {t.describe_scheduler(space.epochs)}")
    lines.append(t.describe_resources(*_local_resources(), "this machine"))
    if t.confirm_top_k:
        lines.append(f"confirmation: top {t.confirm_top_k} front points x seeds {t.confirm_seeds}")
    return "\n".join(lines)


def _schedule_lines(fixed: list[tuple[str, dict]]) -> list[str]:
    """The fixed trials that perturb on some steps only (method.perturb_*), each case once."""
    from ssam_tune.method.methods import method
    from ssam_tune.method.schedule import PerturbSchedule

    shown = {}
    for label, cfg in fixed:
        m = cfg["method"]  # a resolved config: every key present, defaults included
        rule = PerturbSchedule(every=m["perturb_every"], start=m["perturb_from"], prob=m["perturb_prob"])
        if method(m["name"]).perturbs and not rule.always:
            shown.setdefault(label.split("/seed")[0], f"{rule.expected_share():.3g}")
    if not shown:
        return []
    return ["perturbation schedules (share of steps that perturb, (1 - perturb_from) x perturb_prob / "
            "perturb_every; the others are one-pass SGD steps): " + ", ".join(f"{k} {v}" for k, v in shown.items())]


def _local_resources() -> tuple[float, float]:
    """(CPUs, GPUs) of this machine, as a local Ray would offer them."""
    import torch

    return float(os.cpu_count() or 1), float(torch.cuda.device_count() if torch.cuda.is_available() else 0)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ssam_tune.run", description=__doc__.split("\n\n")[0])
    p.add_argument("space", help="search-space YAML (see README)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the space file before it is validated, e.g. --set train.epochs=5, "
                        "--set tune.num_samples=20, --set 'search.method.rho={type: uniform, low: 0.05, high: 0.2}' "
                        "(repeatable; the value is read as YAML)")
    p.add_argument("--address", default=None, help="Ray cluster address to join (default: RAY_ADDRESS, "
                   "else start a local Ray); not ray://: submit with `ray job submit` instead")
    p.add_argument("--storage", default=None, help="experiment storage: a shared path or s3:// URI "
                   "(default: tune.storage_path, else results/ray)")
    p.add_argument("--name", default=None, help="experiment name (default: the space's name)")
    p.add_argument("--resume", nargs="?", const="yes", choices=("yes", "auto"), default=None,
                   help="finish an interrupted experiment; 'auto': start it if absent, else resume it")
    p.add_argument("--num-samples", type=int, default=None, help="override tune.num_samples")
    p.add_argument("--smoke", action="store_true", help="shrink to a few-minute CPU check of the setup")
    p.add_argument("--dry-run", action="store_true", help="print the resolved space and budget, run nothing")
    p.add_argument("--results", default=str(RESULTS), help=argparse.SUPPRESS)
    return p


def prepare(args, raw: dict | None = None) -> SearchSpace:
    """Load (or take ``raw``, the file's content), apply ``--set``, validate; raises
    ConfigError. A dry run or a smoke run does not require the data directories to exist (a
    smoke run uses the embedded data)."""
    if args.overrides:  # before validation, so a --set value meets the same rules as the file's
        raw = load_yaml(args.space) if raw is None else raw
        if not isinstance(raw, dict):
            raise ConfigError("(top level)", "must be a mapping with the training config, search or cases, and tune",
                              str(args.space))
        apply_overrides(raw, args.overrides, flat=("search",))
    # resuming: the stored space.yaml is what runs; the YAML is read as leniently as a stored one
    space = load_space(args.space, data=raw, check_paths=not (args.dry_run or args.smoke), stored=bool(args.resume))
    if args.name is not None:
        if not NAME_RE.match(args.name) or ".." in args.name:
            raise ConfigError("--name", f"must be letters, digits, '_', '-' or '.' and stay inside results/; "
                              f"got {args.name!r}")
        space.name = args.name
    if args.num_samples is not None:
        if args.num_samples < 1:
            raise ConfigError("--num-samples", f"must be >= 1, got {args.num_samples}")
        if space.mode == "cases":
            raise ConfigError("--num-samples", "a cases space runs every case; num_samples does not apply")
        space.tune.num_samples = args.num_samples
    if args.smoke:
        space = smoke(space)
        if args.name is not None:
            space.name = args.name
    try:
        check_user_code(space)
    except ConfigError as err:  # name the space file, as its other errors do
        raise ConfigError(err.path, err.rule, err.source or str(args.space)) from None
    return space


def check_user_code(space: SearchSpace) -> None:
    """A user's model or data (import strings) is called once here, before Ray starts, so
    that a module that does not import, a wrong signature or a wrong output is a one-line
    ConfigError rather than a failed trial; then the folders their modules came from are put
    on PYTHONPATH, which the local Ray's workers inherit (a module found only through the
    driver's working directory would not import in a worker)."""
    from ssam_tune.training.config import config_from_dict
    from ssam_tune.training.user_code import module_roots, preflight

    methods = {cfg["method"]["name"] for _, cfg in space.fixed_trials()}
    names = [d for d in space.search if d.key == "method.name"]
    methods |= set(names[0].values) if names else {space.base["method"]["name"]}
    seen = set()
    for cfg in [space.base, *(c for _, c in space.fixed_trials())]:
        key = yaml.safe_dump({k: cfg[k] for k in ("model", "data")}, sort_keys=True)
        if key not in seen:
            seen.add(key)
            preflight(config_from_dict(cfg), sorted(methods))
    roots = module_roots([space.base["model"]["name"], space.base["data"]["name"]])
    path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if any(r not in path for r in roots):
        os.environ["PYTHONPATH"] = os.pathsep.join([*path, *(r for r in roots if r not in path)])


def _storage(args, space: SearchSpace) -> str:
    return resolve_storage(args.storage or space.tune.storage_path or str(Path(args.results) / "ray"))


def confirmation_space(space: SearchSpace, runs: list[tuple[str, dict]]) -> SearchSpace:
    """The confirmation experiment: the chosen front points as cases, crossed with the
    confirmation seeds, every trial at full fidelity (no scheduler, no anchors)."""
    cases: dict[str, dict] = {}
    for label, cfg in runs:
        flat = {f"{section}.{k}": v for section in ("model", "data", "train", "method")
                for k, v in cfg[section].items()}
        cases[label.split("/seed")[0]] = flat
    t = dataclasses.replace(space.tune, scheduler="none", baselines=[], confirm_top_k=0, confirm_seeds=[],
                            diagnostics="none",  # the search's front is measured; its re-runs are not
                            num_samples=len(cases) * len(space.tune.confirm_seeds))
    return SearchSpace(name=f"{space.name}-confirm", source=space.source, base=space.base, search=[],
                       cases=[{"label": label, **flat} for label, flat in cases.items()],
                       seeds=list(space.tune.confirm_seeds), tune=t)


def run_search(space: SearchSpace, *, storage: str, resume: bool, address: str | None = None,
               results: str = str(RESULTS), trainable=None, stop=None) -> Path:
    """Run (or resume) the experiment, write the exports, then run the confirmation step
    (``tune.confirm``) if asked; returns the export folder."""
    out = _run_experiment(space, storage=storage, resume=resume, address=address, results=results,
                          trainable=trainable, stop=stop)
    t = space.tune
    if t.confirm_top_k:
        from ssam_tune.export import confirm_cases, export_confirmation

        runs = confirm_cases(Experiment.at(storage, space.name).root, t.confirm_top_k, t.confirm_seeds)
        if not runs:
            print("confirmation skipped: no completed trial on the front")
            return out
        cspace = confirmation_space(space, runs)
        cexp = Experiment.at(storage, cspace.name)
        print(f"confirming {len(cspace.cases)} front point(s) with seeds {cspace.seeds}")
        _run_experiment(cspace, storage=storage, resume=cexp.started, address=address, results=results,
                        trainable=trainable)
        export_confirmation(cexp.root, out)
    return out


def _run_experiment(space: SearchSpace, *, storage: str, resume: bool, address: str | None,
                    results: str, trainable=None, stop=None) -> Path:
    """One experiment, start to finish: run (or resume) it on Ray Tune, settle its Optuna
    study, write its exports, then thin its checkpoints (``tune.retain_checkpoints``).
    ``trainable`` and ``stop``: :func:`ssam_tune.tuning.tuner.run_experiment`."""
    from ssam_tune.export import export_experiment, load_trials
    from ssam_tune.export.live import LiveTensorBoard, ray_tensorboard_off
    from ssam_tune.tuning.tuner import run_experiment, settle_study

    out = Path(results) / space.name
    exp = Experiment.at(storage, space.name)
    # the results layer while the search runs: Ray's default loggers off (its JSON and CSV
    # ones are passed by the tuner), LiveTensorBoard writes results/<name>/tensorboard/
    run_experiment(space, storage=storage, resume=resume, address=address, trainable=trainable, stop=stop,
                   callbacks=[LiveTensorBoard(space, out / "tensorboard")],
                   fit_context=ray_tensorboard_off(exp, resume))
    t = space.tune
    # the trials as the exports read them: what the study is told, which checkpoints stay
    rows = load_trials(exp.root, t.flops_metric) if space.mode == "search" or t.retain_checkpoints == "front" \
        else None
    if space.mode == "search":
        settle_study(space, exp, rows)
    if getattr(t, "diagnostics", "none") == "sharpness":
        _measure_front(exp, rows, t.flops_metric)
    info = export_experiment(exp.root, out)
    if t.retain_checkpoints == "front":
        _retain(space, exp, rows, info)
    print(info["console"], flush=True)
    return out


def _measure_front(exp: Experiment, rows: list[dict] | None, cost_metric: str) -> None:
    """``tune.diagnostics: sharpness``: the front points' sharpness, before the export shows
    it and before the checkpoints are thinned (the front's stay)."""
    from ssam_tune.export import load_trials
    from ssam_tune.export.front import front_rows
    from ssam_tune.sharpness import front_sharpness

    rows = rows if rows is not None else load_trials(exp.root, cost_metric)
    front = [r["trial_id"] for r in front_rows(rows, cost_metric)]
    print(f"measuring the sharpness of {len(front)} front point(s) (tune.diagnostics: sharpness)", flush=True)
    front_sharpness(exp.root, front)


def _retain(space: SearchSpace, exp: Experiment, rows: list[dict], info: dict) -> None:
    """``tune.retain_checkpoints: front``: once exported, only the front's trials and the best
    (a search), or every completed case, keep their checkpoints; errored trials keep theirs
    (``--resume`` re-runs them from it)."""
    from ssam_tune.tuning.retention import prune_after_export

    done = [r["trial_id"] for r in rows if r["status"] != "errored"]
    keep = {*info["front"], info["best_trial"]} if space.mode == "search" else set(done)
    prune_after_export(exp, done, keep)


def settle_start(args, space: SearchSpace) -> tuple[SearchSpace, str, bool]:
    """Where the experiment goes and whether it resumes: ``(space, storage, resume)``, the
    space being the stored one when resuming. Raises ConfigError (nothing started)."""
    storage = _storage(args, space)
    address = args.address or os.environ.get("RAY_ADDRESS") or ""
    if address.startswith("ray://"):
        # Ray Client runs the driver's Tune loop remotely while space.yaml and the exports
        # would be written on this machine.
        raise ConfigError("--address" if args.address else "RAY_ADDRESS",
                          f"Ray Client addresses ({address}) are not supported; run the search on the "
                          "cluster with `ray job submit --address http://<head>:8265 --working-dir . -- "
                          "python -m ssam_tune.run SPACE.yaml ...`")
    exp = Experiment.at(storage, space.name)
    try:
        exists = exp.started
    except (OSError, ValueError) as err:  # pyarrow: unknown scheme, no credentials, no bucket
        raise ConfigError("--storage", f"cannot reach {exp.root} ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}); check the URI and the "
                          "credentials, or use a local folder") from None
    resume = exists if args.resume == "auto" else bool(args.resume)
    if resume and not exists:
        raise ConfigError("--resume", f"no experiment to resume at {exp.root} (--resume auto starts it)")
    if resume and not exp.resumable:
        # killed before Ray saved any state: nothing ran that could be kept
        print(f"note: {exp.root} has no saved Ray state (its driver stopped within seconds of the start); "
              "starting it afresh")
        resume = False
    elif not resume and exists:
        raise ConfigError("--name", f"experiment {space.name!r} already exists at {exp.root}; "
                          "use --resume (or --resume auto) to finish it or --name for a new one")
    if args.resume == "auto":
        print(f"--resume auto: {'resuming' if resume else 'starting'} {exp.root}")
    stored_text = exp.read_text(SPACE_FILE) if resume else None
    if stored_text is not None:
        # finish the experiment as it was started, whatever the YAML says now
        stored = load_space(exp.join(SPACE_FILE), data=yaml.safe_load(stored_text), check_paths=False,
                            stored=True)
        if space_to_dict(stored) != space_to_dict(space):
            print(f"note: resuming with the space stored in {exp.join(SPACE_FILE)} "
                  f"(it differs from {args.space})", file=sys.stderr)
        space = stored
    return space, storage, resume


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        space = prepare(args)
        if args.dry_run:
            _storage(args, space)  # a storage URI that cannot be parsed is refused here too
            print(describe(space))
            return 0
        space, storage, resume = settle_start(args, space)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(describe(space, full=False))
    run_search(space, storage=storage, resume=resume, address=args.address, results=args.results)
    return 0


# -- the Python API ---------------------------------------------------------------------------------
@dataclasses.dataclass
class SearchResult:
    """What :func:`tune` returns: where everything went, and the exports read back."""

    name: str
    export_dir: Path  # results/<name>: trials.csv, pareto.csv, best_config.yaml, summary.md, ...
    experiment: str  # the Ray experiment (a path or URI): checkpoints, the Optuna journal
    best_config: dict  # the best trial's training config (best_config.yaml; ssam_tune.train runs it)
    front: list[dict]  # pareto.csv: the front's rows, numbers as numbers
    trials: list[dict]  # trials.csv: every trial's row


def tune(space: str | os.PathLike | dict, *, overrides: list[str] | tuple[str, ...] = (), name: str | None = None,
           storage: str | None = None, resume: bool | str = False, num_samples: int | None = None,
           smoke: bool = False, address: str | None = None, results: str | os.PathLike = RESULTS) -> SearchResult:
    """Run a search from Python, as ``python -m ssam_tune.run`` does, and return its exports
    (``ssam_tune.tune``; ``ssam_tune.search`` is the old path of the searcher's module).

    ``space`` is a search-space YAML file or the same content as a dict; ``overrides`` are
    ``--set`` items (``"train.epochs=5"``); the keywords are the command line's options
    (``resume``: True, or ``"auto"`` to start or resume). A bad space raises ConfigError
    before Ray starts. Ray is started locally unless ``address`` (or RAY_ADDRESS) names a
    cluster, or this process has already called ``ray.init``.
    """
    import copy

    raw = copy.deepcopy(space) if isinstance(space, dict) else None
    source = f"{space.get('name', 'search')}.yaml" if isinstance(space, dict) else str(space)
    args = argparse.Namespace(space=source, overrides=list(overrides), name=name, num_samples=num_samples,
                              smoke=smoke, dry_run=False, resume={True: "yes", False: None}.get(resume, resume),
                              results=str(results), storage=storage, address=address)
    space_ = prepare(args, raw=raw)
    space_, store, settle = settle_start(args, space_)
    out = run_search(space_, storage=store, resume=settle, address=address, results=str(results))
    return SearchResult(name=space_.name, export_dir=out, experiment=Experiment.at(store, space_.name).root,
                        best_config=yaml.safe_load((out / "best_config.yaml").read_text()) or {},
                        front=_read_rows(out / "pareto.csv"), trials=_read_rows(out / "trials.csv"))


def _read_rows(path: Path) -> list[dict]:
    """A CSV export's rows, numbers as numbers (empty cells None)."""
    import csv

    def value(text: str):
        if text == "":
            return None
        try:
            return int(text)
        except ValueError:
            try:
                return float(text)
            except ValueError:
                return text

    if not path.exists():
        return []
    with path.open(newline="") as f:
        return [{k: value(v) for k, v in row.items()} for row in csv.DictReader(f)]


def __getattr__(name: str):
    # the trial-name functions (pickled in the tuner.pkl of experiments started by
    # run_search before ssam_tune/tuning/tuner.py) and Ray's start moved to the tuning layer
    from ssam_tune._compat import moved_name

    return moved_name(__name__, name)


if __name__ == "__main__":
    sys.exit(main())
