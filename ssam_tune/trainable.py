"""The Ray Tune trainable: a thin wrapper around :class:`ssam_tune.train.Trainer`.

It reports every epoch (with ``epoch``, ASHA's time attribute), checkpoints every epoch and
resumes from the newest checkpoint it can read. Besides the checkpoint handed to Ray, each
epoch's checkpoint is also written to ``<experiment>/checkpoints/<trial id>/``: Ray saves
its experiment state only every so often, and a checkpoint written after that save would
otherwise be forgotten when a killed driver is resumed.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import warnings
from pathlib import Path

import torch
from ray import tune

from ssam_tune.config import config_from_dict
from ssam_tune.data import Data
from ssam_tune.experiment import Experiment, clear_partial_writes
from ssam_tune.search import META
from ssam_tune.train import CHECKPOINT_FORMAT, Trainer, load_checkpoint, load_data, save_checkpoint

__all__ = ["train_trial"]

CKPT_FILE = "checkpoint.pt"
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


def _device(cfg) -> torch.device:
    import ray

    gpu_ids = ray.get_gpu_ids()
    if cfg.train.device != "auto":
        return torch.device(cfg.train.device)
    if torch.cuda.is_available():
        return torch.device("cuda", 0)  # Ray set CUDA_VISIBLE_DEVICES to this trial's GPU
    if gpu_ids:
        warnings.warn(f"Ray assigned GPU {gpu_ids} but CUDA is not available here; training on the CPU",
                      stacklevel=2)
    return torch.device("cpu")


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
        for name in (CKPT_FILE, "previous.pt"):
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


def train_trial(config: dict) -> None:
    """Function trainable: ``config = {"ssam_tune": bookkeeping, "config": training config}``."""
    # Ray logs "Checkpoint successfully created" for every epoch of every trial at INFO level;
    # the driver's console shows our one line per result instead.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    meta = config.get(META, {})
    cfg = config_from_dict(config["config"])
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    trainer = Trainer(cfg, data=_data_for(cfg), device=_device(cfg))
    own_dir = Experiment(meta["exp_dir"]).checkpoint_dir(meta["trial_id"]) if meta.get("exp_dir") else None
    if own_dir is not None:
        own_dir.mkdir(parents=True, exist_ok=True)
        clear_partial_writes(own_dir)  # left by a crash in the middle of a write
    state = _latest_state(own_dir)
    if state is not None:
        trainer.load_state_dict(state)
        print(f"[ssam-tune] trial {meta.get('trial_id')} resumed at epoch {trainer.epoch}")
    resumed_from = trainer.epoch  # 0: this run started from scratch
    if trainer.epoch >= cfg.train.epochs or trainer.tracker["status"] != "running":
        final = dict(trainer.tracker.get("last_good") or {"epoch": trainer.epoch})
        final.update(status=trainer.tracker["status"], label=meta.get("label", ""), device=str(trainer.device),
                     node_id=node_id, resumed_from=resumed_from)
        tune.report(_clean(final))  # already finished before the restart: report once more
        return
    for metrics in trainer.epochs():
        metrics = _clean(metrics)
        metrics["label"] = meta.get("label", "")
        metrics["device"] = str(trainer.device)
        metrics["node_id"] = node_id
        metrics["resumed_from"] = resumed_from
        if metrics.get("status") == "diverged":
            tune.report(metrics)
            return
        state = trainer.state_dict()
        if own_dir is not None:
            # keep the last two (the newest may be cut short by a crash mid-write)
            if (own_dir / CKPT_FILE).exists():
                os.replace(own_dir / CKPT_FILE, own_dir / "previous.pt")
            save_checkpoint(own_dir / CKPT_FILE, state)
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(Path(tmp) / CKPT_FILE, state)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
