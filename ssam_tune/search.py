"""The search machinery on Ray Tune: an Optuna-backed searcher that knows pruned from
complete, an ASHA that never stops the anchor trials, and a callback that keeps ASHA's rung
records across a restore.

Two Ray Tune 2.60 traps this module exists to avoid (background notes, section 5):

- Ray's own OptunaSearch tells Optuna the LAST reported values of a trial that ASHA stopped
  early as COMPLETE, so the sampler learns from truncated accuracies and
  ``study.best_trials`` fills with low-fidelity points. :class:`SsamSearcher` tells Optuna
  PRUNED for those, COMPLETE only at full fidelity, and COMPLETE with accuracy 0 (marked
  ``status=diverged``) for diverged trials so the sampler learns to avoid them.
- ``Tuner.restore`` brings back the scheduler from ``tuner.pkl`` (written before the run), so
  ASHA's rungs are lost. Ray does save callback state with every experiment checkpoint and
  restores it before re-adding trials: :class:`RungStateCallback` carries the rungs across.

The Optuna study lives in a journal file (see :mod:`ssam_tune.study`) that survives driver
crashes and can be opened with ``optuna-dashboard``. Private Optuna and Ray attributes are
reached only through :mod:`ssam_tune._private`.
"""

from __future__ import annotations

import json
import logging
import pickle

import optuna
from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search import Searcher

from ssam_tune import _private
from ssam_tune.experiment import RUNGS_FILE, Experiment
from ssam_tune.space import SearchSpace, resolve_config, sample_params
from ssam_tune.study import close_orphans, open_study

__all__ = ["AnchoredASHA", "RungStateCallback", "SsamSearcher", "make_sampler"]

log = logging.getLogger(__name__)
META = "ssam_tune"  # key of the trial config that carries our bookkeeping


def make_sampler(kind: str, seed: int, n_startup: int):
    if kind == "tpe":
        # constant_liar: parallel trials do not all propose the same point
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup, constant_liar=True)
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


class SsamSearcher(Searcher):
    """Fixed trials first (baselines, or the cases crossed with seeds), then Optuna's.

    Each suggested config is ``{"ssam_tune": {...bookkeeping...}, "config": {full training
    config}}``. Optuna sees only the sampled trials; its trial number is stored in the
    bookkeeping so exports can join the journal with Ray's results.
    """

    def __init__(self, space: SearchSpace, exp: Experiment) -> None:
        super().__init__(metric="val_acc", mode="max")
        self.space = space
        self.journal_path = exp.journal_path()
        self.exp_dir = exp.root
        self._fixed = [(label, cfg) for label, cfg in space.fixed_trials()]
        self._issued_fixed = 0
        self._sampled = 0
        self._trials: dict[str, dict] = {}  # ray trial id -> {"number": int|None, "last": result}
        self._study: optuna.Study | None = None

    # -- Optuna ------------------------------------------------------------------------------
    @property
    def study(self) -> optuna.Study:
        if self._study is None:
            t = self.space.tune
            sampler = make_sampler(t.sampler, t.seed, t.n_startup_trials)
            self._study = open_study(self.journal_path, self.space.name, t.objective, sampler)
        return self._study

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # metric and mode are ours; the space is the YAML's

    def suggest(self, trial_id: str) -> dict | None:
        if trial_id in self._trials:
            return self._trials[trial_id]["config"]
        meta = {"trial_id": trial_id, "exp_dir": self.exp_dir, "epochs": self.space.epochs}
        if self._issued_fixed < len(self._fixed):
            label, cfg = self._fixed[self._issued_fixed]
            self._issued_fixed += 1
            kind = "case" if self.space.mode == "cases" else "baseline"
            meta.update(kind=kind, label=label, anchor=kind == "baseline", optuna_number=None)
        elif self.space.mode == "search" and self._sampled < self.space.tune.num_samples:
            trial = self.study.ask()
            params = sample_params(self.space, trial)
            trial.set_user_attr("ray_trial_id", trial_id)
            cfg = resolve_config(self.space.base, params)
            self._sampled += 1
            meta.update(kind="search", label=f"optuna{trial.number}", anchor=False, optuna_number=trial.number,
                        params=params)
        else:
            return Searcher.FINISHED
        config = {META: meta, "config": cfg}
        self._trials[trial_id] = {"number": meta["optuna_number"], "config": config, "last": None, "done": False}
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        info = self._trials.get(trial_id)
        if info is None:
            return
        info["last"] = {k: result.get(k) for k in ("epoch", "val_acc", "status", self.space.tune.flops_metric)}
        if info["number"] is not None and self.space.tune.objective == "single" and result.get("val_acc") is not None:
            # intermediate values show learning curves in optuna-dashboard
            _private.optuna_set_intermediate(self.study, info["number"], int(result["epoch"]),
                                             float(result["val_acc"]))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        info = self._trials.get(trial_id)
        if info is None or info["done"]:
            return
        info["done"] = True
        last = result or info["last"] or {}
        if result:
            info["last"] = {k: result.get(k) for k in ("epoch", "val_acc", "status", self.space.tune.flops_metric)}
        number = info["number"]
        if number is None:
            return
        self.tell(number, last, error)

    def tell(self, number: int, last: dict, error: bool) -> None:
        t = self.space.tune
        status = last.get("status")
        flops = last.get(t.flops_metric)
        epoch = last.get("epoch") or 0
        study = self.study
        if _private.optuna_trial_finished(study, number):
            return

        def mark(key, value):
            _private.optuna_set_user_attr(study, number, key, value)

        if error:
            mark("status", "errored")
            self.study.tell(number, state=optuna.trial.TrialState.FAIL)
        elif status == "diverged":
            # accuracy 0 teaches the sampler to stay away; never on a front (status attr)
            mark("status", "diverged")
            values = [0.0] if t.objective == "single" else [0.0, float(flops or 0.0)]
            self.study.tell(number, values)
        elif status == "completed" and epoch >= self.space.epochs and last.get("val_acc") is not None:
            mark("status", "completed")
            values = [float(last["val_acc"])] if t.objective == "single" else [float(last["val_acc"]), float(flops)]
            self.study.tell(number, values)
        else:
            # stopped early (ASHA, time budget): a truncated accuracy is not a final value
            mark("status", "pruned")
            mark("epochs_reached", int(epoch))
            self.study.tell(number, state=optuna.trial.TrialState.PRUNED)

    # -- persistence ------------------------------------------------------------------------
    def save(self, checkpoint_path: str) -> None:
        state = {k: v for k, v in self.__dict__.items() if k != "_study"}
        with open(checkpoint_path, "wb") as fh:
            pickle.dump(state, fh)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as fh:
            state = pickle.load(fh)  # noqa: S301 - Ray's own searcher checkpoint, written by save()
        self.__dict__.update(state)
        self._study = None
        self.reconcile()

    def reconcile(self) -> int:
        """Fail the Optuna trials left RUNNING by a killed driver that Ray no longer knows
        (asked after Ray's last experiment checkpoint). Returns how many were closed."""
        known = {info["number"] for info in self._trials.values() if info["number"] is not None}
        closed = close_orphans(self.study, keep=known)
        if closed:
            log.warning("closed %d Optuna trial(s) left running by the previous driver", closed)
        return closed


class AnchoredASHA(ASHAScheduler):
    """ASHA on validation accuracy over epochs, except that anchor trials (the SGD/SAM/SSAM
    baselines every front needs) always run to full fidelity.

    With ``exp`` it keeps a readable copy of its rungs in the experiment (``asha_rungs.json``).
    """

    def __init__(self, *args, exp: Experiment | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.exp = exp

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        self._write_rungs()
        if action == TrialScheduler.STOP and trial.config.get(META, {}).get("anchor"):
            return TrialScheduler.CONTINUE
        return action

    def _write_rungs(self) -> None:
        exp = getattr(self, "exp", None)
        if exp is None and getattr(self, "exp_dir", None):  # pickled by an older version
            exp = Experiment(self.exp_dir)
        if exp is None or not exp.is_local or not exp.path.is_dir():
            return
        state = self.rung_state()
        readable = {"num_stopped": state["num_stopped"],
                    "rungs": [{str(m): rec for m, rec in bracket} for bracket in state["rungs"]]}
        try:
            exp.write_text(RUNGS_FILE, json.dumps(readable, indent=1, sort_keys=True))
        except OSError as err:  # a read-only or vanished folder must not stop the search
            log.warning("could not write %s: %s", exp.join(RUNGS_FILE), err)

    def rung_state(self) -> dict:
        return _private.asha_rungs(self)

    def load_rung_state(self, state: dict) -> None:
        _private.asha_load_rungs(self, state)


class RungStateCallback(Callback):
    """Saves ASHA's rung records with every experiment checkpoint and puts them back on
    restore (Ray restores callback state before it re-adds the trials)."""

    def __init__(self, scheduler: AnchoredASHA | None) -> None:
        self.scheduler = scheduler

    def get_state(self) -> dict | None:
        return None if self.scheduler is None else self.scheduler.rung_state()

    def set_state(self, state: dict) -> None:
        if self.scheduler is not None and state:
            self.scheduler.load_rung_state(state)
