"""FLOPs accounting for SGD, SAM and Sparse SAM (Mi et al., NeurIPS 2022).

Two kinds of numbers are reported, and they must not be confused:

* **theoretical** -- the paper's idealisation (footnote to Tables 1-3: "The FLOPs is
  theoretically estimated by considering sparse multiplication compared to SGD"). Only the
  FIRST backward of an SSAM step (the gradient at w that builds the perturbation e) is
  taken as sparse, scaling the backward cost B by the density (1 - s); the forward and the
  dense pass at w + e are counted in full. Relative to SGD this is
        1 + (F + (1 - s) B) / (F + B),
  which with B / (F + B) = 0.7 is 2 - 0.7 s. The paper's FLOPs column (Table 1: 1.65x at
  50%, 1.36x at 90%, 1.30x at 99%) is this formula at B / (F + B) = 0.7, a ratio the paper
  assumes. With the ratio MEASURED here for CIFAR ResNet-18 (B / (F + B) = 0.666: the first
  layer needs no input gradient) the same formula gives 1.667x / 1.400x / 1.340x, which is
  what the suite reports. Even perfect sparse kernels would skip only the weight-gradient
  half of B, since input gradients must still flow, so both are optimistic.
* **executed** -- what the step's two passes actually run. With element masks (or
  ``normalize: full``) the pass at w computes every gradient, so a masked SSAM step costs a
  full SAM step, 2x SGD whatever the sparsity. With tensor masks and ``normalize: masked``
  (and SAM-ON) the pass at w runs with gradients only for the perturbed tensors
  (:meth:`ssam_tune.method.optim.SSAM.first_pass`): its backward B_1 is measured with exactly that
  requires-grad set (:func:`forward_backward_flops` with ``frozen``), and a step costs
  (F + B_1) + (F + B).

F and B are measured per sample with :class:`torch.utils.flop_counter.FlopCounterMode`
(which counts matmuls and convolutions, forward and backward; one multiply-add = 2 FLOPs;
element-wise ops, bias adds, BatchNorm and reductions are not counted). The paper counts no
mask-generation cost; :func:`fisher_mask_flops` and :func:`dynamic_mask_flops` add it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as nnF
from torch.utils.flop_counter import FlopCounterMode

from ssam_tune.method import methods
from ssam_tune.method.fisher import local_batchnorm_
from ssam_tune.method.masks import check_sparsity

__all__ = [
    "KINDS",
    "PAPER_BACKWARD_SHARE",
    "FlopsModel",
    "backward_flops_per_tensor",
    "clear_cache",
    "dynamic_mask_flops",
    "fisher_mask_flops",
    "forward_backward_flops",
    "random_mask_flops",
    "step_cost",
]

KINDS = ("theoretical", "executed")
# B / (F + B) behind the paper's FLOPs column (Tables 1-3); measured models differ (above).
PAPER_BACKWARD_SHARE = 0.7

_CACHE: dict = {}


def clear_cache() -> None:
    """Forget all cached :func:`forward_backward_flops` results."""
    _CACHE.clear()


def _signature(model: torch.nn.Module, input_shape: tuple, frozen: frozenset) -> tuple:
    params = tuple((n, tuple(p.shape)) for n, p in model.named_parameters())
    return (type(model).__name__, params, input_shape, frozen)


def _count(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """Forward and backward FLOPs of one train-mode step of ``model`` on the batch ``x``."""
    model.train()
    with FlopCounterMode(display=False) as fwd:
        out = model(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if out.dim() == 2:  # logits: the training loss; otherwise just sum the output
            target = torch.zeros(out.shape[0], dtype=torch.long, device=out.device)
            loss = nnF.cross_entropy(out.float(), target)
        else:
            loss = out.float().sum()
    with FlopCounterMode(display=False) as bwd:
        loss.backward()
    return fwd.get_total_flops(), bwd.get_total_flops()


def forward_backward_flops(model: torch.nn.Module, input_shape, *, device=None,
                           batch_size: int = 2, frozen=()) -> tuple[float, float]:
    """Measured per-SAMPLE forward FLOPs F and backward FLOPs B of ``model``.

    ``input_shape`` is the shape of ONE sample without the batch dimension, e.g.
    ``(3, 32, 32)``. One forward (with a cross-entropy loss) and one backward of a batch of
    ``batch_size`` inputs are run in train mode under ``FlopCounterMode`` and the totals
    divided by the batch size. The input does not require a gradient, as in training, so
    the first layer's input gradient is not counted in B.

    These are the measured (executed) FLOPs of one dense SGD step; the theoretical SSAM
    saving is applied afterwards by :func:`step_cost`.

    The measurement runs on a deep copy, so the model's parameters, buffers (BatchNorm
    running statistics and ``num_batches_tracked``), ``.grad`` and train/eval flags are left
    exactly as found. With ``device=None`` the copy is moved to the ``meta`` device (shapes
    only, no arithmetic: fast even for large models); if a layer has no meta kernel it is
    rerun on the model's own device. Pass ``device`` to run on that device instead.

    ``frozen``: names (as in ``named_parameters``) of parameters that do not require a
    gradient in the pass, as in SSAM's pass at w with tensor masks: their weight-gradient
    kernels are not run, and backward stops at the earliest parameter that still needs one.

    Results are cached per (class name, parameter names and shapes, input shape, frozen).
    Hooks registered on the model are copied with it and run during the measurement.
    """
    try:
        input_shape = tuple(int(v) for v in input_shape)
    except (TypeError, ValueError):
        raise ValueError(f"input_shape must be a tuple of ints, got input_shape={input_shape!r}") from None
    if not input_shape or min(input_shape) < 1:
        raise ValueError(f"input_shape must be non-empty with positive sizes, "
                         f"got input_shape={input_shape!r}")
    if not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(f"batch_size must be an int >= 2 (train-mode BatchNorm), "
                         f"got batch_size={batch_size!r}")
    frozen = frozenset(frozen)
    unknown = frozen - {n for n, _ in model.named_parameters()}
    if unknown:
        raise ValueError(f"frozen names no parameter of the model: {sorted(unknown)[:3]}")
    key = _signature(model, input_shape, frozen)
    if key in _CACHE:
        return _CACHE[key]

    first = next(model.parameters(), None)
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    own_device = first.device if first is not None else torch.device("cpu")
    targets = [torch.device(device)] if device is not None else [torch.device("meta"), own_device]
    for i, dev in enumerate(targets):
        clone = local_batchnorm_(copy.deepcopy(model).to(dev))  # SyncBatchNorm: no collective
        clone.zero_grad(set_to_none=True)
        for name, p in clone.named_parameters():
            if name in frozen:
                p.requires_grad_(False)
        x = torch.zeros((batch_size,) + input_shape, dtype=dtype, device=dev)
        try:
            f_total, b_total = _count(clone, x)
            break
        except (NotImplementedError, RuntimeError):
            if i == len(targets) - 1:
                raise
        finally:
            del clone
    result = (f_total / batch_size, b_total / batch_size)
    _CACHE[key] = result
    return result


def backward_flops_per_tensor(model: torch.nn.Module, input_shape, *, batch_size: int = 2) -> dict[str, float]:
    """For each parameter, the per-sample backward FLOPs of a pass in which only that
    parameter requires a gradient: its weight-gradient kernel plus every input gradient
    between the loss and its layer. SSAM-F's ``tensor_score: per_flop`` divides a tensor's
    Fisher information by it. Measured on one meta-device copy (shapes only)."""
    input_shape = tuple(int(v) for v in input_shape)
    names = [n for n, _ in model.named_parameters()]
    # One copy without data; forward_backward_flops's own copy of it per tensor costs nothing
    # (the cache key is the same as the model's: class, parameter names and shapes).
    meta = copy.deepcopy(model).to("meta")
    return {n: forward_backward_flops(meta, input_shape, batch_size=batch_size,
                                      frozen=[m for m in names if m != n])[1] for n in names}


def _check_positive(name: str, value) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {name}={value!r}")


def step_cost(method: str, *, sparsity: float = 0.0, F: float | None = None,
              B: float | None = None, kind: str = "theoretical") -> float:
    """Cost of one training step of ``method`` relative to one SGD step (1 forward + 1 backward).

    * ``"sgd"`` -> 1; ``"sam"`` -> 2 (two forward+backward passes).
    * SSAM (``"ssam_f"``, ``"ssam_d"``, ``"ssam_random"``), ``kind="theoretical"`` ->
      ``1 + (F + (1 - s) * B) / (F + B)``: the paper's idealisation, where only the first
      backward (gradient at w that builds e) is sparse and the pass at w + e is dense.
      With B / (F + B) = 0.7 this is ``2 - 0.7 s`` (paper: 1.65x at s = 0.5).
    * SSAM, ``kind="executed"`` -> 2: on dense hardware the masked step is a full SAM step.

    ``F`` and ``B`` (per-sample forward and backward FLOPs, see
    :func:`forward_backward_flops`) are needed only for theoretical SSAM. ``sparsity`` must
    be in [0, 1); it is ignored by sgd and sam.
    """
    method_row = methods.method(method)  # ValueError if unknown
    check_sparsity(sparsity)
    if kind not in KINDS:
        raise ValueError(f"unknown kind={kind!r}; choices: {list(KINDS)}")
    if method_row.cost == "one_pass":
        return 1.0
    if method_row.cost == "two_passes" or kind == "executed":
        return 2.0
    _check_positive("F", F)
    if not isinstance(B, (int, float)) or not math.isfinite(B) or B < 0:
        raise ValueError(f"B must be a non-negative finite number, got B={B!r}")
    return 1.0 + (F + (1.0 - sparsity) * B) / (F + B)


def fisher_mask_flops(n_samples: int, F: float, B: float) -> float:
    """Absolute FLOPs of one SSAM-F mask update: ``n_samples * (F + B)``.

    The empirical Fisher needs one per-sample gradient for each of the N_F samples, i.e. N_F
    per-sample forward+backward passes (paper, Sec. 4.1; Table 8 uses N_F = 16..4096). The
    squaring, summation and global top-k over d weights are O(d) and not counted.
    """
    if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < 0:
        raise ValueError(f"n_samples must be a non-negative int, got n_samples={n_samples!r}")
    _check_positive("F", F)
    if not isinstance(B, (int, float)) or not math.isfinite(B) or B < 0:
        raise ValueError(f"B must be a non-negative finite number, got B={B!r}")
    return float(n_samples) * (F + B)


def dynamic_mask_flops(d: int) -> float:
    """Order-of-magnitude FLOPs of one SSAM-D mask update over ``d`` weights: ``2 * d``.

    Dropping the flattest perturbed weights is a top-k on |gradient| over d values, and the
    random regrowth is of the same order. Negligible: for ResNet-18 (d = 11.2M) it is about
    22 MFLOP, against about 430 GFLOP for one SGD step at batch 128.
    """
    if not isinstance(d, int) or isinstance(d, bool) or d < 0:
        raise ValueError(f"d must be a non-negative int, got d={d!r}")
    return 2.0 * d


def random_mask_flops(d: int) -> float:
    """Order-of-magnitude FLOPs of drawing a random mask of exact density: ``2 * d``
    (d random numbers and a top-k). Negligible, like :func:`dynamic_mask_flops`."""
    return dynamic_mask_flops(d)


@dataclass(frozen=True)
class FlopsModel:
    """Per-sample forward/backward FLOPs ``F``, ``B`` of a model and the training batch size.

    :meth:`training_flops` gives the total FLOPs of a run, theoretical and executed.
    """

    F: float
    B: float
    batch_size: int

    def __post_init__(self):
        _check_positive("F", self.F)
        if not isinstance(self.B, (int, float)) or not math.isfinite(self.B) or self.B < 0:
            raise ValueError(f"B must be a non-negative finite number, got B={self.B!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got batch_size={self.batch_size!r}")

    @classmethod
    def from_model(cls, model: torch.nn.Module, input_shape, batch_size: int, **kw) -> FlopsModel:
        """Measure ``F``, ``B`` with :func:`forward_backward_flops` (``kw`` passed on)."""
        f, b = forward_backward_flops(model, input_shape, **kw)
        return cls(F=f, B=b, batch_size=batch_size)

    def executed_per_sample(self, method: str, first_backward: float | None = None) -> float:
        """FLOPs per sample of one step as its passes run: F + B for SGD; (F + B_1) + (F + B)
        for a perturbing method, B_1 being the measured backward of the pass at w (None: the
        full B, as with element masks)."""
        method_row = methods.method(method)
        if not method_row.perturbs:
            return self.F + self.B
        b1 = self.B if first_backward is None else first_backward
        return 2.0 * self.F + b1 + self.B

    def step_cost(self, method: str, sparsity: float = 0.0, kind: str = "theoretical") -> float:
        """:func:`step_cost` with this model's ``F`` and ``B``."""
        return step_cost(method, sparsity=sparsity, F=self.F, B=self.B, kind=kind)

    def mask_update_flops(self, method: str, *, n_params: int = 0,
                          fisher_samples: int = 0) -> float:
        """FLOPs of ONE mask update, by the method's mask kind: Fisher (N_F per-sample passes),
        O(d) for dynamic and random masks, 0 for dense methods."""
        kind = methods.method(method).mask
        if kind == "fisher":
            return fisher_mask_flops(fisher_samples, self.F, self.B)
        if kind == "dynamic":
            return dynamic_mask_flops(n_params)
        if kind == "random":
            return random_mask_flops(n_params)
        return 0.0

    def training_flops(self, method: str, steps: int, *, sparsity: float = 0.0,
                       mask_updates: int = 0, n_params: int = 0,
                       fisher_samples: int = 0, images: int | None = None) -> dict:
        """Total FLOPs of a run of ``steps`` optimizer steps (on ``images`` samples in all;
        default ``steps * batch_size``; a last partial batch makes them differ).

        Returns a dict of floats:

        * ``"theoretical"`` -- ``steps * batch_size * (F + B) * step_cost(kind="theoretical")``
          (the paper's counting);
        * ``"executed"`` -- the same with ``kind="executed"`` (dense hardware);
        * ``"mask"`` -- ``mask_updates`` times the cost of one mask update (Fisher:
          ``fisher_samples * (F + B)``; dynamic / random: ``2 * n_params``), which the paper
          does not count;
        * ``"theoretical_total"`` / ``"executed_total"`` -- the step FLOPs plus ``"mask"``.
        """
        method_row = methods.method(method)
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise ValueError(f"steps must be a non-negative int, got steps={steps!r}")
        if not isinstance(mask_updates, int) or isinstance(mask_updates, bool) or mask_updates < 0:
            raise ValueError(f"mask_updates must be a non-negative int, got mask_updates={mask_updates!r}")
        if mask_updates and not method_row.sparse:
            raise ValueError(f"mask_updates must be 0 for method={method!r}, got mask_updates={mask_updates!r}")
        if images is None:
            images = steps * self.batch_size
        elif not isinstance(images, int) or isinstance(images, bool) or images < 0:
            raise ValueError(f"images must be a non-negative int, got images={images!r}")
        base = images * (self.F + self.B)
        theoretical = base * self.step_cost(method, sparsity, "theoretical")
        executed = base * self.step_cost(method, sparsity, "executed")
        mask = 0.0
        if mask_updates:
            mask = mask_updates * self.mask_update_flops(method, n_params=n_params,
                                                         fisher_samples=fisher_samples)
        return {
            "theoretical": theoretical,
            "executed": executed,
            "mask": mask,
            "theoretical_total": theoretical + mask,
            "executed_total": executed + mask,
        }
