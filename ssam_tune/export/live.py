"""TensorBoard while the search runs: a Ray Tune callback in the driver that writes the tree
of :mod:`ssam_tune.export.tensorboard` into ``results/<name>/tensorboard/`` as results
arrive (a local folder, whatever the experiment's storage). The export rebuilds the same tree
from the experiment folder when the search ends.

A trial's scalars appear epoch by epoch; its HParams session, with its status, when it ends
(TensorBoard keeps the first session a run holds, so a "running" one could not be updated).
On ``--resume`` Ray brings this callback back from ``tuner.pkl``; a trial that continues
gets a new event file in its run folder.

Ray's own TensorBoard logger (``trial_<id>`` runs in the experiment folder) is off while the
search runs: :func:`ray_tensorboard_off`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from ray.tune import Callback

from ssam_tune.export.front import hp_keys
from ssam_tune.export.read import finite_number
from ssam_tune.export.tensorboard import (
    drop_sessions,
    end_events,
    epoch_event,
    event_file,
    experiment_events,
    final_metrics,
    header_event,
    run_name,
    trial_hparams,
    trial_status,
    write_events,
)
from ssam_tune.storage.experiment import META, TUNER_FILE, Experiment

__all__ = ["LiveTensorBoard", "ray_tensorboard_off"]

_NO_DEFAULT_LOGGERS = "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"


@contextlib.contextmanager
def ray_tensorboard_off(exp: Experiment, resume: bool) -> Iterator[None]:
    """Ray adds its CSV, JSON and TensorBoard loggers to the callbacks unless this variable is 1
    (``ray.tune.utils.callback._create_default_callbacks``); with it, the run passes the JSON
    and CSV loggers itself (the exports read result.json). A resumed experiment runs the
    callbacks pickled in its tuner.pkl: one started by an older version holds no JSON logger
    (cloudpickle writes class names in clear) and keeps Ray's defaults. The variable is put
    back afterwards, for any other Tune run in this process."""
    before = os.environ.get(_NO_DEFAULT_LOGGERS)
    passed = not resume or b"JsonLoggerCallback" in (exp.read_bytes(TUNER_FILE) or b"")
    os.environ[_NO_DEFAULT_LOGGERS] = "1" if passed else "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(_NO_DEFAULT_LOGGERS, None)
        else:
            os.environ[_NO_DEFAULT_LOGGERS] = before


class LiveTensorBoard(Callback):
    """Writes the search's TensorBoard tree as results arrive (module doc); picklable, since Ray
    keeps the run's callbacks in tuner.pkl."""

    def __init__(self, space, dest: str | Path) -> None:
        self.dest = str(dest)
        self.keys, self.cost_metric = hp_keys(space, []), space.tune.flops_metric
        self.sgd_cost: float | None = None  # the completed SGD anchor's cost: final/flops_rel
        self._files: dict[str, tuple[Path, int]] = {}  # trial id -> (event file, start), this driver's

    def setup(self, **info) -> None:
        dest = Path(self.dest)
        if not any(dest.glob("events.out.tfevents.*")):  # a resumed search keeps its config
            t = int(time.time())
            self._write(event_file(dest, t), experiment_events(self.keys, t), append=False)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        event = epoch_event(result)
        if event is not None:
            self._write(self._run_file(trial, result)[0], [event], append=True)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._end(trial, failed=False)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._end(trial, failed=True)

    def _end(self, trial, failed: bool) -> None:
        last = trial.last_result or {}
        meta, config = trial.config.get(META, {}), trial.config.get("config", {})
        label = meta.get("label") or last.get("label") or ""
        status = trial_status(last, meta.get("epochs") or config.get("train", {}).get("epochs"), failed)
        cost = finite_number(last.get(self.cost_metric))
        if meta.get("kind") == "baseline" and label == "sgd" and status == "completed" and cost:
            self.sgd_cost = cost
        path, t0 = self._run_file(trial, last)
        t1 = int(finite_number(last.get("timestamp")) or t0)
        epoch = last.get("epoch") if isinstance(last.get("epoch"), int) else 0
        hp = trial_hparams(config, label, meta.get("kind", ""), status, self.keys)
        self._write(path, end_events(path.parent.name, hp, final_metrics(last, self.cost_metric, self.sgd_cost),
                                     t0, t1, epoch), append=True)
        self._files.pop(trial.trial_id, None)

    def get_state(self) -> dict:
        return {"sgd_cost": self.sgd_cost}

    def set_state(self, state: dict) -> None:
        self.sgd_cost = state.get("sgd_cost")

    def _run_file(self, trial, result: dict) -> tuple[Path, int]:
        """The trial's event file of this driver, started with the trial's first result here."""
        if trial.trial_id not in self._files:
            t0 = int(finite_number(result.get("timestamp")) or time.time())
            label = trial.config.get(META, {}).get("label") or result.get("label") or ""
            run = Path(self.dest) / run_name(trial.config.get("config", {}), label, trial.trial_id)
            if run.is_dir():  # the trial ran under an earlier driver: it gets a new session
                try:
                    drop_sessions(run)
                except Exception as err:  # noqa: BLE001 - a bad file must not end the search
                    print(f"live TensorBoard: {run} not cleaned ({err})", file=sys.stderr, flush=True)
            path = event_file(run, t0)
            self._write(path, [header_event(t0)], append=False)
            self._files[trial.trial_id] = (path, t0)
        return self._files[trial.trial_id]

    def _write(self, path: Path, events: list, append: bool) -> None:
        # A full disk or a removed folder must not end the search: the export rewrites the tree.
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_events(path, events, append=append)
        except OSError as err:
            print(f"live TensorBoard: {path} not written ({err})", file=sys.stderr, flush=True)
