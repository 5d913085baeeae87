"""The console during a search: one short line per result and per finished trial.

Ray's own reporter prints a table of every trial at every update (about 1,300 lines for the
quickstart) and its columns are not ours. This callback prints what a person follows:

    [   41s] optuna2       epoch 2/4   val_acc 0.412   cost 1.52x SGD
    [   52s] optuna2       stopped early at epoch 2/4 (pruned)   | 5 of 11 done: 3 completed, 2 pruned, 0 failed,
             2 running; ~1.5 min left at most

The cost is the trial's cost per epoch as a multiple of the SGD anchor's, which is what its
full run will cost relative to SGD (until the SGD anchor has reported, the cumulative cost;
after a resume, the SGD anchor's cost is restored with the callback's state). The time left
is the epochs still to run at the pace of the epochs run so far, as if no trial were stopped
early (so at most that).
"""

from __future__ import annotations

import math
import time
from collections import Counter

from ray.tune import Callback

from ssam_tune.storage.experiment import META

__all__ = ["Progress"]


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


class Progress(Callback):
    """Prints a line per result and per finished trial (see module doc); picklable, since Ray
    keeps the run's callbacks in ``tuner.pkl``."""

    def __init__(self, epochs: int, cost_metric: str, budget: int | None = None) -> None:
        self.epochs, self.cost_metric, self.budget = epochs, cost_metric, budget
        self.t0: float | None = None
        self.sgd_per_epoch: float | None = None
        self.counts: Counter = Counter()
        self.last: dict[str, dict] = {}
        self.epochs_run = 0  # results seen by this driver (one per epoch): the pace
        self.epochs_before = 0  # epochs run before a resume
        self.epochs_skipped = 0  # epochs that trials ended before (pruned, diverged, errored)

    # Ray keeps a callback's state with the experiment's checkpoints and restores it on resume
    def get_state(self) -> dict:
        return {"sgd_per_epoch": self.sgd_per_epoch, "counts": dict(self.counts),
                "epochs_done": getattr(self, "epochs_before", 0) + getattr(self, "epochs_run", 0),
                "epochs_skipped": getattr(self, "epochs_skipped", 0)}

    def set_state(self, state: dict) -> None:
        self.sgd_per_epoch = state.get("sgd_per_epoch")
        self.counts = Counter(state.get("counts") or {})
        self.epochs_before, self.epochs_skipped = state.get("epochs_done", 0), state.get("epochs_skipped", 0)

    def setup(self, **info) -> None:
        self.t0 = time.monotonic()

    def _say(self, trial, text: str) -> None:
        elapsed = time.monotonic() - (self.t0 or time.monotonic())
        label = trial.config.get(META, {}).get("label") or trial.trial_id
        # a sampled trial's label is its Optuna number (as optuna-dashboard numbers it); its
        # method says what it is
        method = (trial.config.get("config", {}).get("method") or {}).get("name")
        if method and method not in label:
            label = f"{label} {method}"
        print(f"[{elapsed:6.0f}s] {label:<13} {text}", flush=True)

    def _cost(self, result: dict) -> str:
        cost, epoch = result.get(self.cost_metric), result.get("epoch")
        if cost is None or not epoch:
            return "-"
        if self.sgd_per_epoch:
            return f"{cost / epoch / self.sgd_per_epoch:.2f}x SGD"
        return f"{cost:.3g}"

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        meta = trial.config.get(META, {})
        epoch, cost = result.get("epoch"), result.get(self.cost_metric)
        if meta.get("anchor") and meta.get("label") == "sgd" and cost and epoch:
            self.sgd_per_epoch = cost / epoch
        self.last[trial.trial_id] = result
        self.epochs_run = getattr(self, "epochs_run", 0) + 1  # (a Progress pickled by an older version)
        if result.get("status") == "diverged":
            return  # said once, when the trial ends
        self._say(trial, f"epoch {epoch}/{self.epochs}   val_acc {_fmt(result.get('val_acc'), '.3f')}   "
                         f"cost {self._cost(result)}")

    def _finished(self, trials, trial, status: str, text: str, reached: int | None = None) -> None:
        self.counts[status] += 1
        if status != "completed" and reached is not None:
            self.epochs_skipped = getattr(self, "epochs_skipped", 0) + max(0, self.epochs - reached)
        running = sum(1 for t in trials if t.status == "RUNNING" and t is not trial)
        c = self.counts
        budget = getattr(self, "budget", None)
        done = f"{sum(c.values())} of {budget} done: " if budget else ""
        tally = f"{done}{c['completed']} completed, {c['pruned']} pruned, {c['diverged'] + c['errored']} failed"
        self._say(trial, f"{text}   | {tally}" + (f", {running} running" if running else "") + self._left())

    def _left(self) -> str:
        """``; ~N min left at most``: the epochs not run yet at the pace so far (no budget: "")."""
        budget, run = getattr(self, "budget", None), getattr(self, "epochs_run", 0)
        if not budget or not run or self.t0 is None:
            return ""
        remaining = budget * self.epochs - getattr(self, "epochs_before", 0) - run - getattr(self, "epochs_skipped", 0)
        if remaining <= 0:
            return ""
        seconds = (time.monotonic() - self.t0) / run * remaining
        when = f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min" if seconds < 5400 else \
            f"{seconds / 3600:.1f} h"
        return f"; ~{when} left at most"

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        last = self.last.pop(trial.trial_id, None) or trial.last_result or {}
        epoch = last.get("epoch") or 0
        if last.get("status") == "diverged":
            self._finished(trials, trial, "diverged", f"diverged (NaN/inf loss) in epoch {epoch + 1}", epoch)
        elif epoch >= self.epochs:
            self._finished(trials, trial, "completed", f"completed   val_acc {_fmt(last.get('val_acc'), '.3f')}   "
                                               f"cost {self._cost(last)}")
        else:
            self._finished(trials, trial, "pruned", f"stopped early at epoch {epoch}/{self.epochs} (pruned)", epoch)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        last = self.last.pop(trial.trial_id, None) or trial.last_result or {}
        self._finished(trials, trial, "errored", "errored (see its error.txt; --resume retries it)",
                       last.get("epoch") or 0)
