"""`python -m ssam_tune.run SPACE.yaml`: a search (or a list of cases) on Ray Tune.

    python -m ssam_tune.run SPACE.yaml [--address ADDR] [--storage PATH] [--name NAME]
                                       [--resume [auto]] [--num-samples N] [--smoke] [--dry-run]

The space is validated before Ray starts (exit code 2, nothing started or written). The Ray
experiment goes to ``<storage>/<name>`` (default storage: ``results/ray``), the exports to
``results/<name>/``. ``--resume`` finishes an experiment whose driver was killed;
``--resume auto`` starts the experiment if it is absent and resumes it if present (an
idempotent entrypoint for jobs that a cluster may restart).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
from pathlib import Path

import yaml

from ssam_tune.storage.experiment import JOURNAL_FILE, RESULTS, SPACE_FILE, TRIAL_PREFIX, Experiment, resolve_storage
from ssam_tune.training.config import ConfigError
from ssam_tune.tuning.space import DRIVER_MEMORY, NAME_RE, SearchSpace, load_space, smoke, space_to_dict

__all__ = ["PENDING_TRIALS", "main", "run_search", "space_to_dict"]

# Trials Ray may hold pending (asked of the searcher, waiting for resources) when
# tune.max_concurrent_trials is unset; TUNE_MAX_PENDING_TRIALS_PG overrides it.
PENDING_TRIALS = 8


def _trial_name(trial) -> str:
    meta = trial.config.get("ssam_tune", {})
    return f"{meta.get('label', 'trial').replace('/', '_')}_{trial.trial_id}"


def _trial_dirname(trial) -> str:
    return f"{TRIAL_PREFIX}{trial.trial_id}"


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


def _local_resources() -> tuple[float, float]:
    """(CPUs, GPUs) of this machine, as a local Ray would offer them."""
    import torch

    return float(os.cpu_count() or 1), float(torch.cuda.device_count() if torch.cuda.is_available() else 0)


def _trial_resources(t) -> dict:
    """What Tune reserves for one trial: its resources, or for a data-parallel trial only its
    driver's DRIVER_MEMORY (the trial's Ray Train run reserves the workers when it starts)."""
    return {"cpu": t.cpu, "gpu": t.gpu} if t.workers == 1 else {"cpu": 0, "memory": DRIVER_MEMORY}


def _max_concurrent(t) -> int | None:
    """tune.max_concurrent_trials; for data-parallel trials left unset, as many as the
    cluster holds now (at least 1): the drivers hold almost nothing, so Ray would start
    trials whose workers wait for resources."""
    if t.max_concurrent_trials or t.workers == 1:
        return t.max_concurrent_trials
    import ray

    total = ray.cluster_resources()
    return max(1, t.trials_that_fit(total.get("CPU", 0.0), total.get("GPU", 0.0)))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ssam_tune.run", description=__doc__.split("\n\n")[0])
    p.add_argument("space", help="search-space YAML (see README)")
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


def prepare(args) -> SearchSpace:
    """Load, override and validate; raises ConfigError. A dry run or a smoke run does not
    require the data directories to exist (a smoke run uses the embedded data)."""
    # resuming: the stored space.yaml is what runs; the YAML is read as leniently as a stored one
    space = load_space(args.space, check_paths=not (args.dry_run or args.smoke), stored=bool(args.resume))
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
    return space


def _storage(args, space: SearchSpace) -> str:
    return resolve_storage(args.storage or space.tune.storage_path or str(Path(args.results) / "ray"))


def _init_ray(address: str | None, dashboard: bool = False) -> None:
    """Connect to the cluster at ``address`` (or RAY_ADDRESS), or start a local Ray; with
    ``dashboard`` (data-parallel trials) the local one runs its dashboard on loopback, and
    either must answer Ray's state API, or the search is refused before any trial starts."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    # Trials keep the driver's working directory, so relative paths keep working.
    runtime_env = {"env_vars": {"RAY_CHDIR_TO_TRIAL_DIR": "0"}}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        # A fresh local instance; its dashboard (and state API) only where needed, on loopback.
        ray.init(address="local", include_dashboard=dashboard, runtime_env=runtime_env, log_to_driver=True)
    if dashboard:
        try:
            _require_state_api()
        except ConfigError:
            ray.shutdown()
            raise


def _require_state_api() -> None:
    """Ray Train frees the workers of a data-parallel trial that Tune stopped (early stopping)
    only through Ray's state API: its placement-group cleaner polls it to see the trial's
    run die. Without it, each stopped trial would hold its workers' CPUs and GPUs until the
    search ends, and later trials would wait for ever."""
    import ray
    from ray.util.state import list_nodes

    try:
        list_nodes(address=ray.get_runtime_context().gcs_address, limit=1, raise_on_missing_output=False)
    except Exception as err:  # noqa: BLE001 - any failure means the same thing here
        raise ConfigError("tune.resources.workers", "data-parallel trials need Ray's dashboard (its state API "
                          f"frees the workers of stopped trials), which did not answer: {type(err).__name__}: "
                          f"{err}. Install ray[default] and start the cluster with its dashboard, or set "
                          "tune.resources.workers: 1") from None


def confirmation_space(space: SearchSpace, runs: list[tuple[str, dict]]) -> SearchSpace:
    """The confirmation experiment: the chosen front points as cases, crossed with the
    confirmation seeds, every trial at full fidelity (no scheduler, no anchors)."""
    cases: dict[str, dict] = {}
    for label, cfg in runs:
        flat = {f"{section}.{k}": v for section in ("model", "data", "train", "method")
                for k, v in cfg[section].items()}
        cases[label.split("/seed")[0]] = flat
    t = dataclasses.replace(space.tune, scheduler="none", baselines=[], confirm_top_k=0, confirm_seeds=[],
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
    """Run (or resume) one Ray Tune experiment, then write its exports.

    ``trainable`` replaces the training function (load tests drive the machinery with a
    trivial one); it receives the same config and must report the same metrics. ``stop`` is
    Ray's ``RunConfig(stop=...)`` (benchmarks cap the epochs a search may spend; note that Ray
    hands a function trainable's last result to a stopper twice)."""
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from ssam_tune.export import export_experiment
    from ssam_tune.export.live import LiveTensorBoard, ray_tensorboard_off
    from ssam_tune.tuning.progress import Progress
    from ssam_tune.tuning.retention import PruneCheckpoints, RestoreFromNewest
    from ssam_tune.tuning.schedulers import RungStateCallback, make_scheduler
    from ssam_tune.tuning.search import SsamSearcher
    from ssam_tune.tuning.trainable import train_trial

    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    # A result without val_acc (e.g. an early divergence) must not abort the experiment;
    # the searcher and ASHA handle missing values themselves.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # Ray warns when checkpoints force frequent experiment snapshots: that is by design here
    # (every epoch is checkpointed and CheckpointConfig.num_to_keep bounds the disk).
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    exp = Experiment.at(storage, space.name)
    out = Path(results) / space.name
    exp.make()
    if not exp.exists(SPACE_FILE):
        exp.write_text(SPACE_FILE, yaml.safe_dump(space_to_dict(space), sort_keys=False))
    _init_ray(address, dashboard=space.tune.workers > 1)
    try:
        t = space.tune
        trainable = tune.with_resources(trainable or train_trial, _trial_resources(t))
        concurrent = _max_concurrent(t)
        if resume:
            tuner = tune.Tuner.restore(exp.root, trainable, resume_unfinished=True, resume_errored=True)
        else:
            scheduler = make_scheduler(space, exp)
            searcher = SsamSearcher(space, exp)
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(
                    # -1: the searcher ends the search (Ray's count of the trials it made would
                    # stop short after a resumed searcher asks again for trials Ray lost)
                    search_alg=searcher, scheduler=scheduler, num_samples=-1,
                    max_concurrent_trials=concurrent, time_budget_s=t.time_budget_s,
                    trial_name_creator=_trial_name, trial_dirname_creator=_trial_dirname,
                    # a stopped data-parallel trial's process must end, taking its Train run with it
                    reuse_actors=t.workers == 1),
                run_config=tune.RunConfig(
                    name=space.name, storage_path=storage, stop=stop,
                    # Ray's default loggers are off while fit() runs (ray_tensorboard_off): its JSON
                    # and CSV ones are passed here, LiveTensorBoard writes results/<name>/tensorboard/
                    callbacks=[RungStateCallback(scheduler), Progress(space.epochs, t.flops_metric),
                               JsonLoggerCallback(), CSVLoggerCallback(), LiveTensorBoard(space, out / "tensorboard"),
                               RestoreFromNewest(),
                               *([PruneCheckpoints(exp, space.epochs)] if t.retain_checkpoints == "front" else [])],
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=t.keep_checkpoints),
                    # verbose 0: Progress prints a line per result instead of Ray's tables
                    failure_config=tune.FailureConfig(max_failures=t.max_failures), verbose=0),
            )
        # Ray keeps ONE pending trial for a searcher that limits concurrency itself (as this one
        # does), so an autoscaler would add GPU nodes one at a time: let it see the demand.
        pending = os.environ.get("TUNE_MAX_PENDING_TRIALS_PG") or str(concurrent or PENDING_TRIALS)
        with ray_tensorboard_off(exp, resume), _env("TUNE_MAX_PENDING_TRIALS_PG", pending):
            tuner.fit()
    finally:
        import ray

        ray.shutdown()
    rows = _settle_study(space, exp) if space.mode == "search" else None
    info = export_experiment(exp.root, out)
    if space.tune.retain_checkpoints == "front":
        from ssam_tune.export import load_trials
        from ssam_tune.tuning.retention import prune_after_export

        # errored trials keep theirs (--resume re-runs them from it); every case is a result
        rows = rows if rows is not None else load_trials(exp.root, space.tune.flops_metric)
        done = [r["trial_id"] for r in rows if r["status"] != "errored"]
        keep = {*info["front"], info["best_trial"]} if space.mode == "search" else set(done)
        prune_after_export(exp, done, keep)
    print(info["console"], flush=True)
    return out


@contextlib.contextmanager
def _env(name: str, value: str):
    """``os.environ[name] = value`` while the block runs (a confirmation experiment run by the
    same process starts from the user's environment again)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _settle_study(space: SearchSpace, exp: Experiment) -> list[dict]:
    """After ``fit()`` every trial has finished, but Ray does not tell the searcher about the
    trials a stopper or the time budget ended: settle them from their results. For a URI
    experiment the study is the ``optuna.journal`` Ray uploaded with its final state (the
    searcher wrote it there): settled in a local copy, then uploaded again. Returns the
    trials' rows as the exports read them."""
    import tempfile

    from ssam_tune.export import load_trials
    from ssam_tune.tuning.study import objective_values, open_study, settle

    t = space.tune
    with tempfile.TemporaryDirectory() as tmp:
        if exp.is_local:
            journal = Path(exp.journal_path())
        else:
            data = exp.read_bytes(JOURNAL_FILE)
            journal = Path(tmp) / JOURNAL_FILE if data is not None else Path(exp.journal_path())  # older runs
            if data is not None:
                journal.write_bytes(data)
        rows = load_trials(exp.root, t.flops_metric)
        if not journal.is_file():
            return rows
        outcomes = {row["trial_id"]: (row["status"], row["epochs_reached"],
                                      objective_values(t.objective, row, t.flops_metric))
                    for row in rows}
        told = settle(open_study(str(journal), space.name, t.objective, t.flops_metric), outcomes)
        if told and not exp.is_local and journal.parent == Path(tmp):
            exp.write_bytes(JOURNAL_FILE, journal.read_bytes())
    return rows


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        space = prepare(args)
        storage = _storage(args, space)
        if args.dry_run:
            print(describe(space))
            return 0
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
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(describe(space, full=False))
    run_search(space, storage=storage, resume=resume, address=args.address, results=args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
