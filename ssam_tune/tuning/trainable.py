"""The Ray Tune trainable: a thin wrapper around :class:`ssam_tune.training.trainer.Trainer`.

It reports every epoch (with ``epoch``, ASHA's time attribute), checkpoints every epoch and
resumes from the newest checkpoint it can read. Besides the checkpoint handed to Ray, the
newest checkpoint is also written to ``<experiment>/checkpoints/<trial id>/checkpoint.pt``
(local storage): Ray saves its experiment state only every so often, and a checkpoint
written after that save would otherwise be forgotten when a killed driver is resumed. That
copy is written atomically (fsync, rename), so one is enough; it is deleted once the trial
has finished (``ssam_tune.tuning.retention``).

A trial with ``tune.resources.workers`` > 1 is a data-parallel Ray Train run inside the same
Tune trial (Ray 2.60's pattern for Train V2 under Tune): the trial function starts a
``TorchTrainer`` of that many workers (gloo on CPUs, NCCL on GPUs), each running a Trainer in
the process group, and :class:`~ray.tune.integration.ray_train.TuneReportCallback` hands rank
0's result of each epoch to Tune, so the searcher, the schedulers and the exports see one
result per epoch. Rank 0 alone writes the checkpoint; the run keeps its checkpoints in the
trial's folder (``Experiment.train_run``), restores every worker from the newest after a
worker dies (``max_failures`` times), and resumes from it when Tune re-runs the trial (a
resumed driver, an errored trial). The workers need no copy of their own: Ray Train
records each checkpoint as it is reported.
"""

from __future__ import annotations

import logging
import math
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

from ray import tune

from ssam_tune.storage.experiment import CKPT_FILE, META, RAY_CHECKPOINT_PREFIX, Experiment
from ssam_tune.storage.files import clear_partial_writes
from ssam_tune.training.config import config_from_dict
from ssam_tune.training.data import Data
from ssam_tune.training.trainer import (
    CHECKPOINT_FORMAT,
    Trainer,
    load_checkpoint,
    load_data,
    resolve_device,
    save_checkpoint,
)
from ssam_tune.tuning._private import quiet_train_reports

__all__ = ["train_trial"]

_DATA_CACHE: dict[str, Data] = {}  # one load per worker process (actors are reused)


def _data_for(cfg) -> Data:
    """Load the data set once per worker process (Ray reuses actors across trials).

    Concurrent downloads of CIFAR are serialised by a file lock inside load_dataset."""
    key = repr((cfg.data, cfg.seed))
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = load_data(cfg)
        while len(_DATA_CACHE) > 2:  # bounded: keep the two most recent data sets
            _DATA_CACHE.pop(next(iter(_DATA_CACHE)))
    return _DATA_CACHE[key]


def _read(path: Path) -> dict | None:
    """A checkpoint, or None (with a warning) if it is missing, truncated or corrupt."""
    if not path.is_file():
        return None
    try:
        state = load_checkpoint(path)
        int(state["epoch"])
        if state.get("format") != CHECKPOINT_FORMAT or not {"model", "optimizer", "rng", "tracker"} <= set(state):
            raise ValueError("not an ssam-tune training checkpoint")
        return state
    except Exception as err:  # noqa: BLE001 - any unreadable file is treated the same way
        warnings.warn(f"ignoring unreadable checkpoint {path}: {type(err).__name__}: {err}", stacklevel=2)
        return None


def _latest_state(own_dir: Path | None) -> dict | None:
    """The newest readable checkpoint: Ray's (restored trial) or our own per-trial copies."""
    candidates: list[dict] = []
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = _read(Path(d) / CKPT_FILE)
            if state is not None:
                candidates.append(state)
    if own_dir is not None:
        for name in (CKPT_FILE, "previous.pt"):  # previous.pt: written by older versions
            state = _read(own_dir / name)
            if state is not None:
                candidates.append(state)
    return max(candidates, key=lambda s: int(s["epoch"]), default=None)


def _clean(metrics: dict) -> dict:
    """Ray-friendly metrics: None and NaN become absent (ASHA skips results without them).

    A diverged report always carries val_acc (0 if it diverged before any evaluation): the
    searcher's metric must be present in every result, or Ray stops the whole experiment."""
    out = {k: v for k, v in metrics.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}
    if out.get("status") == "diverged":
        out.setdefault("val_acc", 0.0)
        out.setdefault("epoch", 0)
    return out


def _run(trainer: Trainer, meta: dict, state: dict | None,
         report: Callable[[dict, dict | None], None]) -> None:
    """Resume from ``state`` (if any), then train, calling ``report(metrics, state)`` once
    per epoch; ``state`` is None where there is nothing to checkpoint (a finished or
    diverged run). The same loop for one worker and for every rank of several."""
    import ray

    if state is not None:
        trainer.load_state_dict(state)
        if trainer.rank == 0:
            print(f"[ssam-tune] trial {meta.get('trial_id')} resumed at epoch {trainer.epoch}")
    extra = {"label": meta.get("label", ""), "device": str(trainer.device),
             "node_id": ray.get_runtime_context().get_node_id(),
             "resumed_from": trainer.epoch,  # 0: this run started from scratch
             "workers": trainer.world}
    if trainer.epoch >= trainer.cfg.train.epochs or trainer.tracker["status"] != "running":
        final = dict(trainer.tracker.get("last_good") or {"epoch": trainer.epoch})
        final.update(status=trainer.tracker["status"], **extra)
        report(_clean(final), None)  # already finished before the restart: report once more
        return
    for metrics in trainer.epochs():
        metrics = {**_clean(metrics), **extra}
        if metrics.get("status") == "diverged":
            report(metrics, None)
            return
        report(metrics, trainer.state_dict())


def train_trial(config: dict) -> None:
    """Function trainable: ``config = {"ssam_tune": bookkeeping, "config": training config}``."""
    # Ray logs "Checkpoint successfully created" for every epoch of every trial at INFO level;
    # the driver's console shows our one line per result instead.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    meta = config.get(META, {})
    if meta.get("train_run"):
        _train_run(config)
        return
    import ray

    cfg = config_from_dict(config["config"])
    # auto: the trial's GPU (Ray set CUDA_VISIBLE_DEVICES to it), else the CPU
    device = resolve_device(cfg.train.device, gpu_ids=ray.get_gpu_ids())
    trainer = Trainer(cfg, data=_data_for(cfg), device=device)
    own_dir = Experiment(meta["exp_dir"]).checkpoint_dir(meta["trial_id"]) if meta.get("exp_dir") else None
    if own_dir is not None:
        own_dir.mkdir(parents=True, exist_ok=True)
        clear_partial_writes(own_dir)  # left by a crash in the middle of a write

    def report(metrics: dict, state: dict | None) -> None:
        if state is None:
            tune.report(metrics)
            return
        if own_dir is not None:
            save_checkpoint(own_dir / CKPT_FILE, state)  # atomic: a crash leaves the previous one
            (own_dir / "previous.pt").unlink(missing_ok=True)  # an older version's second copy
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(Path(tmp) / CKPT_FILE, state)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))

    _run(trainer, meta, _latest_state(own_dir), report)


# -- several workers: a Ray Train run inside the trial ----------------------------------------------
def _train_run(config: dict) -> None:
    """The trial function of a data-parallel trial: one TorchTrainer run, to its end."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    meta = config[META]
    run = meta["train_run"]
    storage, name = Experiment(meta["exp_dir"]).train_run(meta["trial_id"])
    per_worker = {"CPU": run["cpu"], **({"GPU": run["gpu"]} if run["gpu"] else {})}
    TorchTrainer(
        _worker, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=run["workers"], use_gpu=run["gpu"] > 0,
                                     resources_per_worker=per_worker),
        run_config=RunConfig(name=name, storage_path=storage, callbacks=[TuneReportCallback()],
                             checkpoint_config=CheckpointConfig(num_to_keep=run["keep_checkpoints"]),
                             failure_config=FailureConfig(max_failures=run["max_failures"]),
                             # the console shows one line per epoch (ssam_tune.tuning.progress), not
                             # Ray Train's lines per worker report
                             logging_config=LoggingConfig(log_level="WARNING")),
    ).fit()  # raises when the run fails for good: Tune records the trial as errored


def _newest_run_state(recorded, exp: Experiment, trial_id: str) -> dict | None:
    """The newest readable checkpoint of a data-parallel trial: the one Ray Train recorded
    (after a worker died, or when Tune re-runs the trial), or a newer one in the trial's
    folder. Ray Train records a checkpoint when its controller next polls the workers, after
    rank 0 has uploaded it: a worker that dies in between (a kill right after an epoch's
    report) leaves the newest checkpoint stored but not recorded, and the run would restart
    from the one before. An upload cut short fails to read and is skipped."""
    import ray.train

    found = []
    if recorded is not None:
        with recorded.as_directory() as d:
            found.append(_read(Path(d) / CKPT_FILE))
    newest = max((int(s["epoch"]) for s in found if s), default=-1)
    for rel in reversed(exp.trial_checkpoints(trial_id)):  # newest first
        with ray.train.Checkpoint(exp.join(rel)).as_directory() as d:
            state = _read(Path(d) / CKPT_FILE)
        if state is not None:
            if int(state["epoch"]) > newest:
                found.append(state)
            break
    return max((s for s in found if s), key=lambda s: int(s["epoch"]), default=None)


def _worker(config: dict) -> None:
    """One worker of a data-parallel trial, inside the run's process group."""
    import ray.train
    import ray.train.torch

    quiet_train_reports()  # the console shows one line per epoch (ssam_tune.tuning.progress)
    meta = config[META]
    cfg = config_from_dict(config["config"])
    # auto: the device Ray Train gave this worker (its GPU among the node's workers', or the CPU)
    device = resolve_device(cfg.train.device, assigned=ray.train.torch.get_device())
    trainer = Trainer(cfg, data=_data_for(cfg), device=device)
    state = _newest_run_state(ray.train.get_checkpoint(), Experiment(meta["exp_dir"]), meta["trial_id"])
    # rank 0's results are the trial's (TuneReportCallback); every rank reports each epoch
    rank0 = ray.train.get_context().get_world_rank() == 0

    def report(metrics: dict, state: dict | None) -> None:
        if state is None or not rank0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(Path(tmp) / CKPT_FILE, state)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"{RAY_CHECKPOINT_PREFIX}{metrics['epoch']:06d}")

    _run(trainer, meta, state, report)
