"""Early stopping on Ray Tune: multi-objective ASHA (MO-ASHA) and ASHA on accuracy, both
never stopping the anchor trials, and a callback that keeps their rungs across a restore.

MO-ASHA (``tune.scheduler.type: mo_asha``, the default under ``objective: multi``) keeps the
asynchronous successive-halving schedule of ASHA (rungs at ``grace_period * rf**k`` epochs)
but decides who goes on at a rung by non-dominated sorting and crowding distance on
(validation accuracy, full-run cost): the rule is :func:`ssam_tune.tuning.ranking.promote`.

Ray Tune restores a scheduler from ``tuner.pkl`` (written before the run), so the rungs
would be lost on ``--resume``. Ray does save callback state with every experiment
checkpoint and restores it before re-adding trials: :class:`RungStateCallback` carries the
rungs across. Both schedulers keep a readable copy in ``asha_rungs.json``, rewritten only
when a rung changes.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence

from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from ssam_tune.storage.experiment import META, RUNGS_FILE, Experiment
from ssam_tune.tuning import _private
from ssam_tune.tuning.ranking import promote
from ssam_tune.tuning.space import milestones

__all__ = ["MOASHA", "AnchoredASHA", "RungStateCallback", "make_scheduler"]

log = logging.getLogger(__name__)


# -- the schedulers -----------------------------------------------------------------------------
def _is_anchor(trial) -> bool:
    return bool(trial.config.get(META, {}).get("anchor"))


def _rungs_text(readable: dict) -> str:
    """The text of ``asha_rungs.json``: the settings, then one line per rung (sorted keys).
    ``json.dumps(indent=...)`` runs Python's pure-Python encoder: ~40 ms for the ~4,000
    records of a 2,000-trial search, at every rung decision; one compact line per rung goes
    through the C encoder (~5 ms)."""
    rungs = readable["rungs"]
    head = json.dumps({k: v for k, v in readable.items() if k != "rungs"}, sort_keys=True)
    if isinstance(rungs, dict):
        body = ",\n".join(f" {json.dumps(str(m))}: {json.dumps(rec, sort_keys=True)}" for m, rec in rungs.items())
        return f'{head[:-1]}, "rungs": {{\n{body}\n}}}}\n'
    body = ",\n".join(f" {json.dumps(b, sort_keys=True)}" for b in rungs)
    return f'{head[:-1]}, "rungs": [\n{body}\n]}}\n'


class _RungFile:
    """A readable copy of a scheduler's rungs in the experiment, written when it changes."""

    def _write_rungs(self, readable: dict) -> None:
        exp = getattr(self, "exp", None)
        if exp is None and getattr(self, "exp_dir", None):  # pickled by an older version
            exp = Experiment(self.exp_dir)
        if exp is None or not exp.is_local or not exp.path.is_dir():
            return
        text = _rungs_text(readable)
        if text == getattr(self, "_written", None):
            return
        try:
            exp.write_text(RUNGS_FILE, text)
            self._written = text
        except OSError as err:  # a read-only or vanished folder must not stop the search
            log.warning("could not write %s: %s", exp.join(RUNGS_FILE), err)


class MOASHA(FIFOScheduler, _RungFile):
    """Asynchronous successive halving that ranks by non-dominated sorting (see module doc).

    ``objectives`` are ``(metric, mode, per_epoch)``: ``mode`` "max" or "min"; ``per_epoch``
    True for a cumulative cost, which is scaled to the full run (``value * max_t / epoch``).
    Anchor trials are recorded (they are what the others are compared with) but never stopped.
    """

    def __init__(self, objectives: Sequence[tuple[str, str, bool]], *, max_t: int, grace_period: int,
                 reduction_factor: float, time_attr: str = "epoch", exp: Experiment | None = None) -> None:
        super().__init__()
        if not objectives or any(mode not in ("max", "min") for _, mode, _ in objectives):
            raise ValueError(f"objectives must be (metric, 'max'|'min', per_epoch) tuples, got {objectives!r}")
        self.objectives = [tuple(o) for o in objectives]
        self.max_t, self.rf, self.time_attr, self.exp = int(max_t), float(reduction_factor), time_attr, exp
        self.rungs: list[tuple[int, dict[str, list[float]]]] = [
            (m, {}) for m in milestones(grace_period, reduction_factor, max_t)]
        self.num_stopped = 0
        self.decisions: list[tuple[str, int, bool]] = []  # (trial id, rung, went on): for tests and logs

    def point(self, result: dict) -> list[float] | None:
        """The result as a point to maximise, or None if a value is missing or not finite."""
        t = result.get(self.time_attr)
        if t is None or t <= 0 or result.get("status") == "diverged":
            return None
        out = []
        for metric, mode, per_epoch in self.objectives:
            v = result.get(metric)
            if v is None or isinstance(v, bool):
                return None
            try:
                v = float(v)
            except (TypeError, ValueError):
                return None
            if not math.isfinite(v):
                return None
            if per_epoch:
                v = v * self.max_t / float(t)
            out.append(v if mode == "max" else -v)
        return out

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        t = result.get(self.time_attr)
        point = self.point(result)
        if point is None or t >= self.max_t:
            return TrialScheduler.CONTINUE
        reached = [(m, rec) for m, rec in self.rungs if m <= t]
        if not reached:
            return TrialScheduler.CONTINUE
        milestone, recorded = reached[-1]
        if trial.trial_id in recorded:  # judged here already (e.g. a result reported again after a restore)
            return TrialScheduler.CONTINUE
        goes_on = promote(list(recorded.values()), point, self.rf)
        recorded[trial.trial_id] = point
        self.decisions.append((trial.trial_id, milestone, goes_on))
        self._write_rungs(self.readable())
        if goes_on or _is_anchor(trial):
            return TrialScheduler.CONTINUE
        self.num_stopped += 1
        return TrialScheduler.STOP

    def on_trial_remove(self, tune_controller, trial) -> None:
        pass  # a finished trial keeps its records: later newcomers are compared with it

    def readable(self) -> dict:
        names = [f"{metric} ({mode}{', full run' if per_epoch else ''})" for metric, mode, per_epoch in self.objectives]
        signs = [1.0 if mode == "max" else -1.0 for _, mode, _ in self.objectives]
        return {"scheduler": "mo_asha", "objectives": names, "num_stopped": self.num_stopped,
                "rungs": {str(m): {tid: [s * v for s, v in zip(signs, p, strict=True)] for tid, p in rec.items()}
                          for m, rec in self.rungs}}

    # -- state for RungStateCallback ----------------------------------------------------------
    def rung_state(self) -> dict:
        return {"rungs": [[m, {tid: list(p) for tid, p in rec.items()}] for m, rec in self.rungs],
                "num_stopped": self.num_stopped}

    def load_rung_state(self, state: dict) -> None:
        saved = {int(m): rec for m, rec in state["rungs"]}
        self.rungs = [(m, {tid: list(p) for tid, p in saved.get(m, {}).items()}) for m, _ in self.rungs]
        self.num_stopped = int(state["num_stopped"])

    def debug_string(self) -> str:
        sizes = ", ".join(f"epoch {m}: {len(rec)}" for m, rec in self.rungs)
        return f"MO-ASHA: {self.num_stopped} stopped; trials per rung: {sizes}"


class AnchoredASHA(ASHAScheduler, _RungFile):
    """Ray's ASHA on validation accuracy over epochs (``tune.scheduler.type: asha``), except
    that anchor trials (the SGD/SAM/SSAM baselines every front needs) always run to full
    fidelity. With ``exp`` it keeps a readable copy of its rungs in the experiment."""

    def __init__(self, *args, exp: Experiment | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.exp = exp

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        state = self.rung_state()
        # Ray's ASHA only adds records (and counts stops): the file changes iff these counts do.
        # Comparing them, not the JSON text, keeps a result at a few microseconds when the rungs
        # hold thousands of trials.
        changed = (state["num_stopped"], sum(len(rec) for bracket in state["rungs"] for _, rec in bracket))
        if changed != getattr(self, "_counts", None):
            self._write_rungs({"scheduler": "asha", "num_stopped": state["num_stopped"],
                               "rungs": [{str(m): rec for m, rec in bracket} for bracket in state["rungs"]]})
            self._counts = changed
        if action == TrialScheduler.STOP and _is_anchor(trial):
            return TrialScheduler.CONTINUE
        return action

    def rung_state(self) -> dict:
        return _private.asha_rungs(self)

    def load_rung_state(self, state: dict) -> None:
        _private.asha_load_rungs(self, state)


class RungStateCallback(Callback):
    """Saves the scheduler's rung records with every experiment checkpoint and puts them back
    on restore (Ray restores callback state before it re-adds the trials)."""

    def __init__(self, scheduler: MOASHA | AnchoredASHA | None) -> None:
        self.scheduler = scheduler

    def get_state(self) -> dict | None:
        return None if self.scheduler is None else self.scheduler.rung_state()

    def set_state(self, state: dict) -> None:
        if self.scheduler is not None and state:
            self.scheduler.load_rung_state(state)


def make_scheduler(space, exp: Experiment | None = None):
    """The scheduler that ``space.tune.scheduler`` names (None for ``none``)."""
    t = space.tune
    if t.scheduler == "mo_asha":
        objectives = [("val_acc", "max", False)]
        if t.objective == "multi":
            objectives.append((t.flops_metric, "min", True))
        return MOASHA(objectives, max_t=space.epochs, grace_period=t.grace_period,
                      reduction_factor=t.reduction_factor, exp=exp)
    if t.scheduler == "asha":
        return AnchoredASHA(time_attr="epoch", metric="val_acc", mode="max", max_t=space.epochs,
                            grace_period=t.grace_period, reduction_factor=t.reduction_factor, exp=exp)
    return None
