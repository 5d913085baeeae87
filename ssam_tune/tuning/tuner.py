"""One Ray Tune experiment: Ray started or joined, the Tuner built (or restored), ``fit()``, and
the Optuna study settled afterwards.

:func:`run_experiment` runs one experiment to the end of ``fit()``; :func:`settle_study` then
tells the study what Ray did not. The command line (:func:`ssam_tune.run.run_search`) keeps
the order of things (run, settle, export, retention, confirmation) and hands in what the
results layer adds while the search runs (the live TensorBoard callback, Ray's own loggers
off) as ``callbacks`` and ``fit_context``: this layer never imports the exports.

Ray (:func:`ray_session`): a local Ray is started, or the cluster at ``address`` (or
RAY_ADDRESS) joined, and shut down when the experiment ends. Where this process runs Ray
already (its caller called ``ray.init``) and no address is given, the experiment runs in
that Ray and leaves it running, so a caller can run several searches in one Ray.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import yaml

from ssam_tune.storage.experiment import JOURNAL_FILE, META, SPACE_FILE, TRIAL_PREFIX, Experiment
from ssam_tune.training.config import ConfigError
from ssam_tune.tuning.space import DRIVER_MEMORY, SearchSpace, space_to_dict

__all__ = ["PENDING_TRIALS", "init_ray", "ray_session", "run_experiment", "settle_study"]

# Trials Ray may hold pending (asked of the searcher, waiting for resources) when
# tune.max_concurrent_trials is unset; TUNE_MAX_PENDING_TRIALS_PG overrides it.
PENDING_TRIALS = 8


# -- names and resources of trials (Ray pickles the two name functions into tuner.pkl) ---------------
def trial_name(trial) -> str:
    meta = trial.config.get(META, {})
    return f"{meta.get('label', 'trial').replace('/', '_')}_{trial.trial_id}"


def trial_dirname(trial) -> str:
    return f"{TRIAL_PREFIX}{trial.trial_id}"


def trial_resources(t) -> dict:
    """What Tune reserves for one trial: its resources, or for a data-parallel trial only its
    driver's DRIVER_MEMORY (the trial's Ray Train run reserves the workers when it starts)."""
    return {"cpu": t.cpu, "gpu": t.gpu} if t.workers == 1 else {"cpu": 0, "memory": DRIVER_MEMORY}


def max_concurrent(t) -> int | None:
    """tune.max_concurrent_trials; for data-parallel trials left unset, as many as the
    cluster holds now (at least 1): the drivers hold almost nothing, so Ray would start
    trials whose workers wait for resources."""
    if t.max_concurrent_trials or t.workers == 1:
        return t.max_concurrent_trials
    import ray

    total = ray.cluster_resources()
    return max(1, t.trials_that_fit(total.get("CPU", 0.0), total.get("GPU", 0.0)))


# -- Ray ---------------------------------------------------------------------------------------------
def init_ray(address: str | None, dashboard: bool = False) -> None:
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
        # WARNING keeps Ray's INFO lines ("Started a local Ray instance", "Wrote the latest
        # version of all result files") out of the console, where Progress prints the search's
        # own; the notice that token authentication is on (Ray's default for a new local
        # instance, kept) is left out too, as it says nothing the user must act on.
        auth = logging.getLogger("ray._private.authentication.authentication_token_setup")
        level = auth.level
        auth.setLevel(logging.ERROR)
        try:
            ray.init(address="local", include_dashboard=dashboard, runtime_env=runtime_env, log_to_driver=True,
                     logging_level=logging.WARNING)
        finally:
            auth.setLevel(level)
    if dashboard:
        try:
            require_state_api()
        except ConfigError:
            ray.shutdown()
            raise


def require_state_api() -> None:
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


@contextlib.contextmanager
def ray_session(address: str | None, dashboard: bool = False) -> Iterator[None]:
    """Ray for one experiment. Without ``address``, in a process that runs Ray already: that
    Ray, left running (a data-parallel search still needs its state API: without it the
    search is refused, and that Ray keeps running). Otherwise :func:`init_ray`, and
    ``ray.shutdown()`` when the block ends."""
    import ray

    if ray.is_initialized():
        if address is not None:
            raise ConfigError("--address", f"this process is connected to Ray already; cannot join {address} "
                              "as well (leave the address out to run in that Ray)")
        if dashboard:
            try:
                require_state_api()
            except ConfigError as err:
                raise ConfigError(err.path, f"{err.rule} (this process's Ray was started before the search: "
                                  "start it with its dashboard, e.g. ray.init(include_dashboard=True))") from None
        yield
        return
    init_ray(address, dashboard=dashboard)
    try:
        yield
    finally:
        ray.shutdown()


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
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


def _set_tune_environment() -> None:
    """Tune's settings that only environment variables reach (a user's own values win)."""
    # Trials keep the driver's working directory (Tune hands this on to the trial actors).
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    # A result without val_acc (e.g. an early divergence) must not abort the experiment;
    # the searcher and ASHA handle missing values themselves.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # Ray warns when checkpoints force frequent experiment snapshots: that is by design here
    # (every epoch is checkpointed and CheckpointConfig.num_to_keep bounds the disk).
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


# -- the experiment ----------------------------------------------------------------------------------
def _record_space(space: SearchSpace, exp: Experiment) -> None:
    """The experiment folder, with the resolved space it runs (``space.yaml``, written once:
    a resumed experiment keeps the one it started with)."""
    exp.make()
    if not exp.exists(SPACE_FILE):
        exp.write_text(SPACE_FILE, yaml.safe_dump(space_to_dict(space), sort_keys=False))


def build_tuner(space: SearchSpace, *, storage: str, resume: bool, trainable: Callable | None = None,
                stop=None, callbacks: Sequence = (), concurrent: int | None = None):
    """The Tuner of a new experiment ``<storage>/<space.name>``, or the one restored from it
    (``resume``: it brings back the callbacks, the stopper and the searcher pickled in its
    tuner.pkl; ``callbacks`` and ``stop`` are not used). ``callbacks`` run after the JSON and
    CSV loggers."""
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from ssam_tune.tuning.progress import Progress
    from ssam_tune.tuning.retention import PruneCheckpoints, RestoreFromNewest
    from ssam_tune.tuning.schedulers import RungStateCallback, make_scheduler
    from ssam_tune.tuning.search import SsamSearcher
    from ssam_tune.tuning.trainable import train_trial

    t = space.tune
    exp = Experiment.at(storage, space.name)
    trainable = tune.with_resources(trainable or train_trial, trial_resources(t))
    if resume:
        return tune.Tuner.restore(exp.root, trainable, resume_unfinished=True, resume_errored=True)
    scheduler = make_scheduler(space, exp)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            # -1: the searcher ends the search (Ray's count of the trials it made would
            # stop short after a resumed searcher asks again for trials Ray lost)
            search_alg=SsamSearcher(space, exp), scheduler=scheduler, num_samples=-1,
            max_concurrent_trials=concurrent, time_budget_s=t.time_budget_s,
            trial_name_creator=trial_name, trial_dirname_creator=trial_dirname,
            # a stopped data-parallel trial's process must end, taking its Train run with it
            reuse_actors=t.workers == 1),
        run_config=tune.RunConfig(
            name=space.name, storage_path=storage, stop=stop,
            # Ray's default loggers are off while fit() runs (the caller's fit_context): its
            # JSON and CSV ones are passed here, the caller's callbacks after them
            callbacks=[RungStateCallback(scheduler), Progress(space.epochs, t.flops_metric, space.budget()),
                       JsonLoggerCallback(), CSVLoggerCallback(), *callbacks, RestoreFromNewest(),
                       *([PruneCheckpoints(exp, space.epochs)] if t.retain_checkpoints == "front" else [])],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=t.keep_checkpoints),
            # verbose 0: Progress prints a line per result instead of Ray's tables
            failure_config=tune.FailureConfig(max_failures=t.max_failures), verbose=0),
    )


def run_experiment(space: SearchSpace, *, storage: str, resume: bool, address: str | None = None,
                   trainable: Callable | None = None, stop=None, callbacks: Sequence = (),
                   fit_context: contextlib.AbstractContextManager | None = None) -> Experiment:
    """Run (or resume) the experiment ``<storage>/<space.name>`` until every trial has
    finished; returns it.

    ``trainable`` replaces the training function (load tests drive the machinery with a
    trivial one); it receives the same config and must report the same metrics. ``stop`` is
    Ray's ``RunConfig(stop=...)`` (benchmarks cap the epochs a search may spend; note that Ray
    hands a function trainable's last result to a stopper twice). ``callbacks`` are more Tune
    callbacks of a new experiment; ``fit_context`` is entered around ``fit()`` alone."""
    _set_tune_environment()
    exp = Experiment.at(storage, space.name)
    _record_space(space, exp)
    with ray_session(address, dashboard=space.tune.workers > 1):
        concurrent = max_concurrent(space.tune)
        tuner = build_tuner(space, storage=storage, resume=resume, trainable=trainable, stop=stop, callbacks=callbacks,
                            concurrent=concurrent)
        # Ray keeps ONE pending trial for a searcher that limits concurrency itself (as this one
        # does), so an autoscaler would add GPU nodes one at a time: let it see the demand.
        pending = os.environ.get("TUNE_MAX_PENDING_TRIALS_PG") or str(concurrent or PENDING_TRIALS)
        # RAY_AIR_NEW_OUTPUT 0: Ray's older reporter, which verbose=0 silences; the newer one
        # prints its box (with "Number of trials 9223372036854775807" for the searcher-ended
        # search) and "View detailed results here: <Ray's folder>" whatever the verbosity,
        # while Progress already prints a line per result and the exports their own paths
        with fit_context or contextlib.nullcontext(), _env("TUNE_MAX_PENDING_TRIALS_PG", pending), \
                _env("RAY_AIR_NEW_OUTPUT", os.environ.get("RAY_AIR_NEW_OUTPUT", "0")):
            tuner.fit()
    return exp


def settle_study(space: SearchSpace, exp: Experiment, rows: list[dict]) -> int:
    """After ``fit()`` every trial has finished, but Ray does not tell the searcher about the
    trials a stopper or the time budget ended: settle them from their ``rows`` (the trials
    as the exports read them). For a URI experiment the study is the ``optuna.journal`` Ray
    uploaded with its final state (the searcher wrote it there): settled in a local copy,
    then uploaded again. Returns how many trials the study was told of."""
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
        if not journal.is_file():
            return 0
        outcomes = {row["trial_id"]: (row["status"], row["epochs_reached"],
                                      objective_values(t.objective, row, t.flops_metric))
                    for row in rows}
        told = settle(open_study(str(journal), space.name, t.objective, t.flops_metric), outcomes)
        if told and not exp.is_local and journal.parent == Path(tmp):
            exp.write_bytes(JOURNAL_FILE, journal.read_bytes())
    return told
