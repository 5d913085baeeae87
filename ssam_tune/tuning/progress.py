"""The console during a search: one short line per result and per finished trial.

Ray's own reporter prints a table of every trial at every update (about 1,300 lines for the
quickstart) and its columns are not ours. This callback prints what a person follows:

    [   41s] optuna2       epoch 2/4   val_acc 0.412   cost 1.52x SGD
    [   52s] optuna2       stopped early at epoch 2/4 (pruned)   | 3 completed, 2 pruned, 0 failed

The cost is the trial's cost per epoch as a multiple of the SGD anchor's, which is what its
full run will cost relative to SGD (until the SGD anchor has reported, the cumulative cost).
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

    def __init__(self, epochs: int, cost_metric: str) -> None:
        self.epochs, self.cost_metric = epochs, cost_metric
        self.t0: float | None = None
        self.sgd_per_epoch: float | None = None
        self.counts: Counter = Counter()
        self.last: dict[str, dict] = {}

    def setup(self, **info) -> None:
        self.t0 = time.monotonic()

    def _say(self, trial, text: str) -> None:
        elapsed = time.monotonic() - (self.t0 or time.monotonic())
        label = trial.config.get(META, {}).get("label") or trial.trial_id
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
        if result.get("status") == "diverged":
            return  # said once, when the trial ends
        self._say(trial, f"epoch {epoch}/{self.epochs}   val_acc {_fmt(result.get('val_acc'), '.3f')}   "
                         f"cost {self._cost(result)}")

    def _finished(self, trials, trial, status: str, text: str) -> None:
        self.counts[status] += 1
        running = sum(1 for t in trials if t.status == "RUNNING" and t is not trial)
        c = self.counts
        tally = f"{c['completed']} completed, {c['pruned']} pruned, {c['diverged'] + c['errored']} failed"
        self._say(trial, f"{text}   | {tally}" + (f", {running} running" if running else ""))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        last = self.last.pop(trial.trial_id, None) or trial.last_result or {}
        epoch = last.get("epoch") or 0
        if last.get("status") == "diverged":
            self._finished(trials, trial, "diverged", f"diverged (NaN/inf loss) in epoch {epoch + 1}")
        elif epoch >= self.epochs:
            self._finished(trials, trial, "completed", f"completed   val_acc {_fmt(last.get('val_acc'), '.3f')}   "
                                               f"cost {self._cost(last)}")
        else:
            self._finished(trials, trial, "pruned", f"stopped early at epoch {epoch}/{self.epochs} (pruned)")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.last.pop(trial.trial_id, None)
        self._finished(trials, trial, "errored", "errored (see its error.txt; --resume retries it)")
