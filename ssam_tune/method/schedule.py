"""When a perturbing method perturbs: the perturbation schedule.

SAM, SSAM and SAM-ON pay a second forward-backward pass on every step they perturb. Perturbing
less often saves that pass on any hardware, dense GPUs included: a step without the
perturbation is exactly the base optimizer's step on the gradient at w (an SGD step).
Three published rules, combinable:

- ``every`` k: perturb on every k-th step (LookSAM, CVPR 2022; MosaicML Composer's SAM
  ``interval``);
- ``start`` f: train without perturbation for the first fraction f of the steps, then
  perturb (SAM in the late phase of training, ICLR 2025);
- ``prob`` p: each step perturbs with probability p (randomized SAM steps, RST 2022).

A step perturbs when all three say so: it is at or after step ``ceil(f T)`` (T = the run's
optimizer steps), it is a multiple of k steps after that step, and its draw is below p. The
draws come from a generator seeded by the run (one per step, drawn for every step), so the
plan is a pure function of (rule, T, seed): data-parallel ranks take the same decisions and
a resumed run continues the same plan without saving any state.

Pure torch; nothing here knows about models or epochs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["PerturbSchedule"]


@dataclass(frozen=True)
class PerturbSchedule:
    """The rule; :meth:`plan` turns it into one decision per step."""

    every: int = 1
    start: float = 0.0
    prob: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"every (perturb_every) must be an integer >= 1, got {self.every!r}")
        if not 0.0 <= self.start < 1.0:
            raise ValueError(f"start (perturb_from) must be in [0, 1), got {self.start!r}")
        if not 0.0 < self.prob <= 1.0:
            raise ValueError(f"prob (perturb_prob) must be in (0, 1], got {self.prob!r}")

    @property
    def always(self) -> bool:
        """Whether every step perturbs (the methods as published)."""
        return self.every == 1 and self.start == 0.0 and self.prob == 1.0

    def first_step(self, total_steps: int) -> int:
        """The first step that may perturb: ceil(f T), so at least the fraction f runs plain."""
        # the small tolerance keeps f T = 5.000000001 (float noise) at 5
        return min(total_steps, math.ceil(self.start * total_steps - 1e-9))

    def plan(self, total_steps: int) -> list[bool]:
        """One decision per optimizer step 0 .. total_steps - 1: True where the step perturbs."""
        first = self.first_step(total_steps)
        on = [t >= first and (t - first) % self.every == 0 for t in range(total_steps)]
        if self.prob < 1.0:
            draws = torch.rand(total_steps, generator=torch.Generator().manual_seed(self.seed),
                               dtype=torch.float64).tolist()
            on = [o and d < self.prob for o, d in zip(on, draws, strict=True)]
        return on

    def expected_share(self) -> float:
        """The share of steps that perturb in a long run: (1 - f) p / k."""
        return (1.0 - self.start) * self.prob / self.every
