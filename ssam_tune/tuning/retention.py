"""Which trial checkpoints stay once trials finish (``tune.retain_checkpoints``).

Every trial checkpoints every epoch (Ray keeps its last ``keep_checkpoints``), so without
clean-up the disk grows with the number of trials: ~100 MB per ResNet-18 checkpoint, ~0.8 TB
for 2,000 trials. With ``retain_checkpoints: front`` (the default):

- a trial that ends below full fidelity (pruned, diverged) has its checkpoints deleted while
  the search runs: it is never a point of a front (fronts are built from full-fidelity
  trials only), and Ray does not run a finished trial again; a completed trial keeps only
  its newest;
- after the export, the completed trials that are neither on the Pareto front nor the best
  lose theirs too (:func:`prune_after_export`).

A trial's checkpoints are deleted only once Ray's experiment state on the storage says the
trial is finished: a driver killed before that is resumed from that state, which restores
the trial from its checkpoint. (Ray writes its state to a local staging folder and uploads
it in the background, file by file: a snapshot written is not yet a snapshot stored, and a
killed upload can leave this callback's own state newer than the experiment state.) Errored
trials keep theirs (``--resume`` re-runs them from it). ``all`` keeps every trial's.
"""

from __future__ import annotations

import logging
import posixpath
import time

from ray.tune import Callback

from ssam_tune.storage.experiment import RAY_CHECKPOINT_PREFIX, Experiment, full_fidelity

__all__ = ["PruneCheckpoints", "RestoreFromNewest", "prune_after_export"]

log = logging.getLogger(__name__)


class PruneCheckpoints(Callback):
    """Deletes the checkpoints of trials that finished below full fidelity (see module doc)."""

    _next_check = 0.0  # a class default: callbacks pickled (in tuner.pkl) by older versions lack it

    def __init__(self, exp: Experiment, epochs: int) -> None:
        self.exp_root = exp.root
        self.epochs = epochs
        # (trial id, whether its newest Ray checkpoint stays): finished, checkpoints not deleted yet
        self._finished: list[tuple[str, bool]] = []

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        # the trial's own copy goes in every case, and Ray's older checkpoints; the newest
        # stays for a full-fidelity trial (it may be on the front: decided after the export)
        self._finished.append((trial.trial_id, full_fidelity(trial.last_result, self.epochs)))

    def get_state(self) -> dict:
        # Ray calls this with every snapshot it writes: the stored state is read again when
        # some trial waits, with at most ~5% of the driver's time spent on it (as Ray's own
        # snapshots do; the state holds ~50 KB per trial).
        if self._finished and time.monotonic() >= self._next_check:
            start = time.monotonic()
            self._prune()
            self._next_check = time.monotonic() + 19 * (time.monotonic() - start)
        return {"finished": [list(x) for x in self._finished]}

    def _prune(self) -> None:
        exp = Experiment(self.exp_root)
        try:
            stored = exp.trial_statuses()
        except OSError as err:  # a lost clean-up costs disk, not results
            log.warning("experiment state not read, no checkpoints deleted now: %s", err)
            return
        waiting = []
        for trial_id, keep_newest in self._finished:
            if stored.get(trial_id) != "TERMINATED":
                waiting.append((trial_id, keep_newest))
                continue
            try:
                exp.delete_checkpoints(trial_id, keep_newest=keep_newest)
            except OSError as err:
                log.warning("checkpoints of trial %s not deleted: %s", trial_id, err)
        self._finished = waiting

    def set_state(self, state: dict) -> None:
        self._finished = [(str(t), bool(r)) for t, r in state.get("finished", [])]


class RestoreFromNewest(Callback):
    """A resumed trial whose recorded checkpoint is gone is restored from the newest one left
    in its folder. Ray deletes a trial's checkpoints beyond ``keep_checkpoints`` as the trial
    reports new ones, and uploads the experiment state that stops pointing at them only
    afterwards, in the background: a driver killed in between leaves a state that points at
    a deleted checkpoint, and Ray's restore fails on it at every retry ("does not exist on
    storage anymore"). The newer ones it kept are there."""

    def __init__(self) -> None:
        self._checked = False

    def on_step_begin(self, iteration, trials, **info) -> None:
        # the first step of a driver, before Ray starts (and restores) any trial
        if self._checked:
            return
        self._checked = True
        from pyarrow import fs as pafs
        from ray import tune

        from ssam_tune.tuning._private import trial_restore_checkpoint, trial_set_restore_checkpoint

        for trial in trials:
            ckpt = trial_restore_checkpoint(trial) if trial.status == "PENDING" else None
            if ckpt is None or ckpt.filesystem.get_file_info(ckpt.path).type != pafs.FileType.NotFound:
                continue
            listing = ckpt.filesystem.get_file_info(pafs.FileSelector(posixpath.dirname(ckpt.path),
                                                                      allow_not_found=True))
            found = sorted(i.path for i in listing
                           if i.type == pafs.FileType.Directory and i.base_name.startswith(RAY_CHECKPOINT_PREFIX))
            if found:
                log.warning("trial %s: its recorded checkpoint %s is gone; restoring it from %s", trial.trial_id,
                            posixpath.basename(ckpt.path), posixpath.basename(found[-1]))
                trial_set_restore_checkpoint(trial, tune.Checkpoint(found[-1], filesystem=ckpt.filesystem))


def prune_after_export(exp: Experiment, trial_ids: list[str], keep: set[str]) -> int:
    """Delete the checkpoints of every trial in ``trial_ids``, except the newest of those in
    ``keep`` (front points and the best; trials that finished after Ray's last snapshot were
    not trimmed by :class:`PruneCheckpoints`); returns how many of Ray's folders went."""
    deleted = 0
    for trial_id in trial_ids:
        try:
            deleted += exp.delete_checkpoints(trial_id, keep_newest=trial_id in keep)
        except OSError as err:
            log.warning("checkpoints of trial %s not deleted: %s", trial_id, err)
    return deleted
