"""The Optuna-backed searcher of a Ray Tune search: fixed trials first (the baselines, or
the cases crossed with seeds), then the sampler's, with an Optuna study that tells the truth.

What Ray's own OptunaSearch gets wrong, and what this searcher does instead (background
notes, section 5):

- Ray tells Optuna the LAST reported values of a trial the scheduler stopped early as
  COMPLETE, so ``study.best_trials`` fills with low-fidelity points. Here such trials are
  PRUNED; only full-fidelity trials are COMPLETE.
- Diverged and errored trials are FAIL (with ``status`` = diverged or errored): a trial that
  diverged early would otherwise be the cheapest point of the front, which nothing dominates.
- The baselines (SGD, SAM, SSAM anchors) enter the study with their values when they
  finish, and the objectives carry names, so ``study.best_trials`` is the completed part of
  ``pareto.csv`` and optuna-dashboard agrees with ``summary.md``.
- The sampler is rebuilt on every start of the driver; a resumed driver seeds it from the
  search seed AND the number of trials already in the study, so it does not replay the
  proposals of the first run.
- Ray re-runs an errored trial on ``--resume``; its Optuna trial is already FAIL, so it gets
  a fresh Optuna trial with the same parameters (``retry_of`` names the old one).
- Nothing in the searcher's callbacks raises out of Tune: a failure to write the study is
  logged and the search goes on (the exports are built from Ray's results).

The study lives in a journal file (see :mod:`ssam_tune.tuning.study`) that survives driver crashes
and can be opened with ``optuna-dashboard``; for a URI experiment it travels inside the
searcher state Ray saves (see :meth:`SsamSearcher.save`). Private Optuna attributes are reached only
through :mod:`ssam_tune.tuning._private`.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import logging
import math
import pickle
import time
import uuid
import warnings
from pathlib import Path

import optuna
from ray.tune.search import Searcher

from ssam_tune.storage.experiment import JOURNAL_FILE, META, Experiment, full_fidelity
from ssam_tune.storage.files import atomic_write
from ssam_tune.tuning import _private
from ssam_tune.tuning.space import SearchSpace, baseline_params, resolve_config, sample_params
from ssam_tune.tuning.study import close_orphans, objective_values, open_study, record

# META (the trial config's bookkeeping key) lives in storage.experiment; named here too, as before
__all__ = ["META", "SsamSearcher", "make_sampler", "sampler_seed"]

log = logging.getLogger(__name__)
_KEPT = ("epoch", "val_acc", "status")  # what the searcher keeps of a trial's last result


def make_sampler(kind: str, seed: int, n_startup: int, population_size: int | None = None):
    if kind == "tpe":
        # constant_liar: parallel trials do not all propose the same point. multivariate +
        # group: one joint density per method's set of keys (the space is conditional on
        # method.name), which beat independent TPE on real learning curves
        # (benchmarks/bench_replay_label_noise.txt). Both options are labelled experimental
        # (since Optuna 2.2); the label is all the warning says, so it is not shown.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup, constant_liar=True,
                                              multivariate=True, group=True)
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=population_size or 50)
    return optuna.samplers.RandomSampler(seed=seed)


def sampler_seed(seed: int, n_trials: int) -> int:
    """The sampler's seed: the search seed for a new study; for a study that already holds
    ``n_trials`` trials (a resumed driver), a seed derived from both, so the sampler does not
    replay the proposals it made before the restart."""
    if n_trials == 0:
        return seed
    digest = hashlib.sha256(f"{seed}:{n_trials}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _never_raises(method):
    """Searcher callbacks run inside Tune's loop: an exception there stops the whole search.
    The study is a record for the sampler and the dashboard; losing one write is better."""
    @functools.wraps(method)
    def wrapper(self, trial_id, *args, **kwargs):
        try:
            return method(self, trial_id, *args, **kwargs)
        except Exception:  # noqa: BLE001 - see above
            log.exception("Optuna study not updated for Ray trial %s (the search goes on)", trial_id)
            return None
    return wrapper


class SsamSearcher(Searcher):
    """Fixed trials first (baselines, or the cases crossed with seeds), then Optuna's.

    Each suggested config is ``{"ssam_tune": {...bookkeeping...}, "config": {full training
    config}}``. Sampled trials are Optuna trials from the start; baselines are added to the
    study when they finish. The Optuna number is kept in the bookkeeping so exports can join
    the journal with Ray's results.
    """

    max_concurrent: int | None = None  # class defaults: searchers pickled by older versions lack them
    journal_key: str | None = None

    def __init__(self, space: SearchSpace, exp: Experiment) -> None:
        super().__init__(metric="val_acc", mode="max")
        self.space = space
        self.exp_dir = exp.root
        # the study's own key: a URI experiment's journal is a local working copy named by it
        self.journal_key = None if exp.is_local else uuid.uuid4().hex
        self._fixed = [(label, cfg) for label, cfg in space.fixed_trials()]
        self._issued_fixed = 0
        self._sampled = 0
        self._trials: dict[str, dict] = {}  # ray trial id -> {"number", "config", "last", "done"}
        self._study: optuna.Study | None = None
        self._checked: set[str] = set()  # trials whose Optuna state this driver has looked at

    # -- Optuna ------------------------------------------------------------------------------
    @property
    def journal_path(self) -> str:
        """Computed, never stored: a new head (another HOME) has its own working copy.
        (A searcher pickled by an older version has no key: the URI-keyed file it used.)"""
        return Experiment(self.exp_dir).journal_path(getattr(self, "journal_key", None))

    @property
    def study(self) -> optuna.Study:
        if self._study is None:
            t = self.space.tune
            study = open_study(self.journal_path, self.space.name, t.objective, t.flops_metric)
            seed = sampler_seed(t.seed, len(study.get_trials(deepcopy=False)))
            # The anchors are COMPLETE trials of the study, and TPE counts every finished trial
            # towards its start-up: add them, so n_startup_trials sampled trials are random.
            # (A searcher pickled by an older version has no population_size: NSGA-II's 50.)
            study.sampler = make_sampler(t.sampler, seed, t.n_startup_trials + len(t.baselines),
                                         getattr(t, "population_size", None))
            self._study = study
        return self._study

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # metric and mode are ours; the space is the YAML's

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        """``max_concurrent_trials`` is enforced here, not by Ray's ConcurrencyLimiter: that
        wrapper drops the completion of a trial it no longer counts as live, which is every
        errored trial that Ray re-runs on ``--resume`` (its Optuna trial would stay RUNNING)."""
        self.max_concurrent = max_concurrent
        return True

    def suggest(self, trial_id: str) -> dict | None:
        if trial_id in self._trials:
            return self._trials[trial_id]["config"]
        live = sum(1 for info in self._trials.values() if not info["done"])
        if self.max_concurrent and live >= self.max_concurrent:
            return None  # asked again when a trial finishes
        meta = {"trial_id": trial_id, "exp_dir": self.exp_dir, "epochs": self.space.epochs}
        t = self.space.tune
        if t.workers > 1:  # a data-parallel trial: what its Ray Train run needs (ssam_tune.tuning.trainable)
            meta["train_run"] = {"workers": t.workers, "cpu": t.cpu, "gpu": t.gpu, "max_failures": t.max_failures,
                                 "keep_checkpoints": t.keep_checkpoints}
        if self._issued_fixed < len(self._fixed):
            label, cfg = self._fixed[self._issued_fixed]
            self._issued_fixed += 1
            kind = "case" if self.space.mode == "cases" else "baseline"
            meta.update(kind=kind, label=label, anchor=kind == "baseline", optuna_number=None)
        elif self.space.mode == "search" and self._sampled < self.space.tune.num_samples:
            first = getattr(self.space.tune, "enqueue", None) or []
            if self._sampled < len(first):
                # tune.enqueue: enqueued right before the ask that takes it, so a retry's
                # enqueue-and-ask (_retried) never meets a waiting trial of ours
                self.study.enqueue_trial(dict(first[self._sampled]), user_attrs={"enqueued": self._sampled},
                                         skip_if_exists=False)
            trial = self.study.ask()
            params = sample_params(self.space, trial)
            trial.set_user_attr("ray_trial_id", trial_id)
            trial.set_user_attr("kind", "search")
            cfg = resolve_config(self.space.base, params)
            self._sampled += 1
            meta.update(kind="search", label=f"optuna{trial.number}", anchor=False, optuna_number=trial.number,
                        params=params)
        else:
            return Searcher.FINISHED
        config = {META: meta, "config": cfg}
        self._trials[trial_id] = {"number": meta["optuna_number"], "config": config, "last": None, "done": False,
                                  "curve": {}, "started": time.time()}
        return config

    @_never_raises
    def on_trial_result(self, trial_id: str, result: dict) -> None:
        info = self._trials.get(trial_id)
        if info is None:
            return
        info["last"] = self._kept(result)
        self._first_sight(trial_id, info)
        self._curve_point(info, result)

    def _curve_point(self, info: dict, result: dict) -> None:
        """One epoch of the trial's learning curve."""
        if result.get("val_acc") is None or result.get("epoch") is None:
            return
        # intermediate values: the validation accuracy per epoch, optuna-dashboard's learning
        # curves (an anchor's are added with it when it finishes). Under objective multi only
        # a completed trial's, written when it is told (tell): Optuna's TPE ranks PRUNED
        # trials by their intermediate values through study.direction, which a
        # multi-objective study refuses (RuntimeError)
        info.setdefault("curve", {})[int(result["epoch"])] = float(result["val_acc"])
        if info["number"] is not None and self.space.tune.objective == "single":
            _private.optuna_set_intermediate(self.study, info["number"], int(result["epoch"]),
                                             float(result["val_acc"]))

    @_never_raises
    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        info = self._trials.get(trial_id)
        if info is None:
            return
        if not error:
            self._first_sight(trial_id, info)  # Ray skips on_trial_result for a result it stops on
        if info["done"]:
            return
        info["done"] = True
        if result:
            info["last"] = self._kept(result)
            if not error:
                self._curve_point(info, result)
        last = info["last"] or {}
        if info["number"] is not None:
            self.tell(info["number"], last, error, info.get("curve"))
        elif info["config"][META].get("kind") == "baseline" and self.space.mode == "search":
            self.add_baseline(trial_id, info, last, error)

    def _kept(self, result: dict) -> dict:
        return {k: result.get(k) for k in (*_KEPT, self.space.tune.flops_metric)}

    def _first_sight(self, trial_id: str, info: dict) -> None:
        """The first news of a trial since this driver started. A trial the searcher had
        closed is being re-run (an errored trial, retried by ``--resume``): open it again, with
        a fresh Optuna trial for a sampled one whose Optuna trial is FAIL."""
        if trial_id in self._checked:
            return
        self._checked.add(trial_id)
        if info["number"] is not None:
            self._retried(info)
        info["done"] = False

    def _retried(self, info: dict) -> bool:
        """Ray re-runs an errored trial on resume, but its Optuna trial was told FAIL: give it
        a fresh Optuna trial with the same parameters. True if that happened."""
        study, number = self.study, info["number"]
        frozen = _private.optuna_trial(study, number)
        if frozen.state != optuna.trial.TrialState.FAIL or frozen.user_attrs.get("status") != "errored":
            return False
        study.enqueue_trial(dict(frozen.params), user_attrs={"retry_of": number}, skip_if_exists=False)
        trial = study.ask()
        sample_params(self.space, trial)  # the enqueued values, through the same define-by-run path
        trial.set_user_attr("ray_trial_id", frozen.user_attrs.get("ray_trial_id"))
        trial.set_user_attr("kind", "search")
        info["number"] = trial.number
        info["config"][META]["optuna_number"] = trial.number
        log.info("Optuna trial %d (errored) is retried by Ray as Optuna trial %d", number, trial.number)
        return True

    def tell(self, number: int, last: dict, error: bool, curve: dict | None = None) -> None:
        status, epoch = last.get("status"), int(last.get("epoch") or 0)
        values = self._values(last)
        if error:
            status = "errored"
        elif status != "diverged":
            full = full_fidelity(last, self.space.epochs) and values is not None
            status = "completed" if full else "pruned"  # stopped early: scheduler, time budget
        if status == "completed" and self.space.tune.objective != "single":
            for e, v in sorted((curve or {}).items()):  # the learning curve (on_trial_result says why now)
                if math.isfinite(v):
                    _private.optuna_set_intermediate(self.study, number, e, v)
        record(self.study, number, status, epoch, values)

    def _values(self, last: dict) -> list[float] | None:
        return objective_values(self.space.tune.objective, last, self.space.tune.flops_metric)

    def add_baseline(self, trial_id: str, info: dict, last: dict, error: bool) -> None:
        """Put a finished anchor into the study (once, also across a resume), COMPLETE with its
        values at full fidelity, FAIL otherwise. Its settings are in the user attributes: an
        anchor's method (SGD, say) is usually outside the searched distributions."""
        study = self.study
        if any(t.user_attrs.get("ray_trial_id") == trial_id and t.user_attrs.get("status") != "errored"
               for t in study.get_trials(deepcopy=False)):
            return  # told already (an anchor that errored and was re-run is told again)
        label = info["config"][META]["label"]
        values = self._values(last)
        complete = not error and full_fidelity(last, self.space.epochs) and values is not None
        status = "completed" if complete else ("errored" if error else last.get("status") or "errored")
        attrs = {"ray_trial_id": trial_id, "kind": "baseline", "label": label, "status": status,
                 "baseline": {k: v for k, v in baseline_params(label, self.space.base).items()}}
        trial = optuna.trial.create_trial(
            state=optuna.trial.TrialState.COMPLETE if complete else optuna.trial.TrialState.FAIL,
            values=values if complete else None, user_attrs=attrs,
            intermediate_values={e: v for e, v in sorted(info.get("curve", {}).items()) if math.isfinite(v)})
        if info.get("started"):  # its real duration on the dashboard, not 0 ms
            trial.datetime_start = datetime.datetime.fromtimestamp(info["started"])
        study.add_trial(trial)

    # -- persistence ------------------------------------------------------------------------
    def save(self, checkpoint_path: str) -> None:
        """Ray's searcher checkpoint, saved with its experiment state (the trials' statuses).
        For a URI experiment it carries the Optuna journal too, so that the study travels
        with the experiment and matches the trials Ray restores; and the journal is written
        as ``optuna.journal`` next to it, which Ray uploads with the state (the exports read
        it). On local storage the journal is the live file in the experiment folder."""
        state = {k: v for k, v in self.__dict__.items() if k not in ("_study", "_checked", "journal_path")}
        if self.journal_key is not None:
            journal = Path(self.journal_path)
            state["_journal_bytes"] = journal.read_bytes() if journal.is_file() else b""
            atomic_write(Path(checkpoint_path).parent / JOURNAL_FILE, state["_journal_bytes"])
        with open(checkpoint_path, "wb") as fh:
            pickle.dump(state, fh)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as fh:
            state = pickle.load(fh)  # noqa: S301 - Ray's own searcher checkpoint, written by save()
        journal = state.pop("_journal_bytes", None)
        state.pop("journal_path", None)  # a searcher pickled by an older version stored the path
        self.__dict__.update(state)
        self.__dict__.pop("journal_path", None)
        self._study, self._checked = None, set()
        for f in dataclasses.fields(self.space.tune):  # a searcher pickled by an older version
            if not hasattr(self.space.tune, f.name):  # every TuneSettings field has a default
                setattr(self.space.tune, f.name,
                        f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
        if journal is not None:
            # The study as it was when Ray saved the trials it now restores (or newer: see
            # _forget_lost), also on a new head with an empty HOME. A newer local copy is
            # replaced: what it adds (trials asked or told after that save) Ray has forgotten
            # too, and re-runs or re-asks them.
            atomic_write(self.journal_path, journal)
        self._forget_lost()
        self.reconcile()

    def _forget_lost(self) -> None:
        """Forget the unfinished trials that Ray's restored experiment state does not hold, and
        issue them again: a fixed trial with its label, a sampled one as a new sample
        (``reconcile`` closes its Optuna trial). Ray uploads its experiment state and this
        searcher's state as separate files, so a driver killed in the middle of an upload can
        leave this state the newer one; its trials asked since would otherwise never run and
        count as running for ever (with ``max_concurrent_trials`` reached, the resumed search
        would wait for ever). A finished one stays as told: the study keeps its outcome."""
        exp = Experiment(self.exp_dir)
        if exp.state_file() is None:
            return  # not restored by Ray
        known = exp.trial_statuses()  # what Ray restored: its newest stored state
        lost = [trial_id for trial_id, info in self._trials.items() if trial_id not in known and not info["done"]]
        if not lost:
            return
        labels = set()
        for trial_id in lost:
            info = self._trials.pop(trial_id)
            if info["number"] is not None:
                self._sampled -= 1
            else:
                labels.add(info["config"][META]["label"])
        issued, rest = self._fixed[:self._issued_fixed], self._fixed[self._issued_fixed:]
        self._fixed = [f for f in issued if f[0] not in labels] + [f for f in issued if f[0] in labels] + rest
        self._issued_fixed -= len(labels)
        log.warning("%d trial(s) asked by the previous driver after Ray's last stored state are asked again",
                    len(lost))

    def reconcile(self) -> int:
        """Fail the Optuna trials left RUNNING by a killed driver that Ray no longer knows
        (asked after Ray's last experiment checkpoint). Returns how many were closed."""
        known = {info["number"] for info in self._trials.values() if info["number"] is not None}
        closed = close_orphans(self.study, keep=known)
        if closed:
            log.warning("closed %d Optuna trial(s) left running by the previous driver", closed)
        return closed
