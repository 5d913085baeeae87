"""SAM and Sparse SAM (SSAM) as torch.optim-shaped wrappers around a base optimizer.

SAM: Foret et al., ICLR 2021. SSAM: Mi et al., "Make Sharpness-Aware Minimization Stronger:
A Sparsified Perturbation Approach", NeurIPS 2022.

One SAM/SSAM step, given the minibatch gradient g at w (paper Eq. 2 and Algorithm 1):

    e = rho * g / (||g||_2 + eps)        # climb towards the local maximum (Eq. 2)
    e = e * m                            # SSAM only: sparse perturbation (Alg. 1, line 9)
    w <- w + e ; g' = grad L(w + e) ; w <- w (restored by copy) ; base_optimizer.step(g')

The perturbation is built from the loss gradient alone; weight decay, momentum and any other
transform belong to the base optimizer's step (as in the reference code). The wrappers never
see a model, a data loader or an epoch: masks come from :mod:`ssam_tune.method.masks`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

__all__ = ["SAM", "SSAM", "freeze_bn_stats"]

NORMALIZE_MODES = ("full", "masked")


def _check_rho(rho: float) -> float:
    if not isinstance(rho, (int, float)) or isinstance(rho, bool) or not rho >= 0.0:
        raise ValueError(f"rho must be a number >= 0, got rho={rho!r}")
    return float(rho)


class SAM(torch.optim.Optimizer):
    """Sharpness-Aware Minimization around any base optimizer.

    ``SAM(params, base_optimizer=torch.optim.SGD, *, rho=0.05, eps=1e-7, **base_kwargs)``

    Use it with two forward/backward passes per step::

        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)    # w -> w + e
        loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)   # w restored, base optimizer steps with grad at w + e

    or ``opt.step(closure)`` where the closure computes the loss and calls backward.

    ``param_groups`` is the base optimizer's own list, so an LR scheduler attached to this
    wrapper drives the real learning rate; ``rho`` may differ per group. ``eps`` is the
    constant in ``rho / (||g|| + eps)`` that keeps a zero gradient from dividing by zero; the
    reference code uses 1e-7, which is the default here. ``||g||`` is the norm over every
    parameter with a gradient (all groups together). Parameters whose ``grad`` is None are
    neither perturbed nor restored. The old weights are restored by copy, not by subtracting
    e, so the restore is exact.
    """

    def __init__(
        self,
        params: Iterable,
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
        *,
        rho: float = 0.05,
        eps: float = 1e-7,
        **base_kwargs,
    ) -> None:
        rho = _check_rho(rho)
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got eps={eps!r}")
        defaults = dict(rho=rho, **base_kwargs)
        super().__init__(params, defaults)
        self.eps = float(eps)
        # The base optimizer takes our groups, so both share the same dicts; then we adopt
        # its list, so schedulers and load_state_dict stay in one place.
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self._perturbed: list[torch.Tensor] = []
        self._backups: list[torch.Tensor] = []
        # Device tensor with ||e|| of the last first_step (read it only when logging).
        self.last_e_norm: torch.Tensor | None = None

    # -- helpers -----------------------------------------------------------------------
    def _grad_params(self) -> list[tuple[dict, list[torch.Tensor]]]:
        return [(g, [p for p in g["params"] if p.grad is not None]) for g in self.param_groups]

    @staticmethod
    def _stack_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
        """Per-tensor L2 norms (fused multi-tensor kernel) as one vector on the first device."""
        norms = torch._foreach_norm(tensors)
        device = norms[0].device
        return torch.stack([n.to(device) for n in norms])

    def _backup(self, params: list[torch.Tensor]) -> None:
        """Copy w into per-parameter buffers allocated once (exact restore, no realloc)."""
        backups = []
        for p in params:
            buf = self.state[p].get("w_backup")
            if buf is None or buf.shape != p.shape or buf.dtype != p.dtype:
                buf = torch.empty_like(p, memory_format=torch.preserve_format)
                self.state[p]["w_backup"] = buf
            backups.append(buf)
        torch._foreach_copy_(backups, params)
        self._perturbed = params
        self._backups = backups

    def _perturb(self, groups, vectors, norms, denom, scratch: bool = False) -> None:
        """w += rho_g * v / denom for each group g; ``norms`` are the per-tensor norms of v.

        Unless ``scratch`` says that ``vectors`` are the caller's own temporaries (then they
        are scaled in place, saving an allocation), a new list is made for e, so p.grad is
        never scaled in place.
        """
        e_sq, start = [], 0
        for group, ps in groups:
            if not ps:
                continue
            stop = start + len(ps)
            scale = group["rho"] / denom
            if scale.device.type == "cpu":
                # On the CPU reading the scale costs no device sync, and w += s * v in one
                # fused pass saves writing and re-reading e (a memory-bound step).
                torch._foreach_add_(ps, vectors[start:stop], alpha=scale.item())
            elif scratch:
                e = vectors[start:stop]
                torch._foreach_mul_(e, scale)
                torch._foreach_add_(ps, e)
            else:
                torch._foreach_add_(ps, torch._foreach_mul(vectors[start:stop], scale))
            e_sq.append(scale.square() * norms[start:stop].square().sum())
            start = stop
        # ||e||^2 = sum over groups of scale_g^2 ||v_g||^2: no extra pass over the weights.
        self.last_e_norm = torch.stack(e_sq).sum().sqrt()

    # -- the two phases ------------------------------------------------------------------
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Climb to w + e(w), e = rho * g / (||g|| + eps) (paper Eq. 2)."""
        groups = self._grad_params()
        params_all = [p for _, ps in groups for p in ps]
        if not params_all:
            self._perturbed, self._backups, self.last_e_norm = [], [], None
            if zero_grad:  # the pass at w + e must not add to these gradients
                self.zero_grad()
            return
        grads = [p.grad for p in params_all]
        norms = self._stack_norms(grads)
        self._backup(params_all)
        self._perturb(groups, grads, norms, torch.linalg.vector_norm(norms) + self.eps)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Return to w (by copy) and let the base optimizer step with the gradient at w + e."""
        if self._perturbed:
            torch._foreach_copy_(self._perturbed, self._backups)
        self._perturbed, self._backups = [], []
        self.base_optimizer.step()
        # An LR scheduler attached to this wrapper watches for our step(); a
        # first_step/second_step loop is a real step too, so don't let it warn.
        self._opt_called = True
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def plain_step(self, zero_grad: bool = False) -> None:
        """A step without the perturbation: the base optimizer's step on the gradient at w,
        i.e. exactly what the base optimizer alone would do (an SGD step for SGD). The
        perturbation schedules (:mod:`ssam_tune.method.schedule`) take it on the steps they skip;
        it costs one forward-backward pass on any hardware."""
        if self._perturbed:
            raise RuntimeError("plain_step() after first_step(): call second_step() to finish that step")
        self.base_optimizer.step()
        self._opt_called = True  # a real step, for an attached LR scheduler (as in second_step)
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[[], torch.Tensor] | None = None):  # type: ignore[override]
        """One full SAM step. The closure must compute the loss and call ``backward()``.

        Gradients are cleared before each of the two closure calls. Returns the loss at w.
        """
        if closure is None:
            raise ValueError(
                "SAM.step needs a closure that computes the loss and calls backward(); "
                "or call first_step() and second_step() yourself"
            )
        closure = torch.enable_grad()(closure)
        self.zero_grad()
        with self.first_pass():
            loss = closure()
        self.first_step(zero_grad=True)
        closure()
        self.second_step()
        return loss

    def first_pass(self):
        """Context for the forward and backward at w. SAM needs every gradient there; see
        :meth:`SSAM.first_pass` for what a sparse perturbation can skip."""
        return contextlib.nullcontext()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The base optimizer's state dict (momentum buffers, param_groups incl. rho)."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        state_dict.pop("ssam", None)
        self.base_optimizer.load_state_dict(state_dict)
        # torch rebuilds the group dicts on load: adopt the new list again.
        self.param_groups = self.base_optimizer.param_groups

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rho={self.defaults['rho']}, base={self.base_optimizer!r})"


class SSAM(SAM):
    """Sparse SAM: the SAM perturbation multiplied by a binary mask (Algorithm 1, line 9).

    ``SSAM(params, base_optimizer=torch.optim.SGD, *, rho=0.05, sparsity=0.5,
    normalize="full", eps=1e-7, **base_kwargs)``

    - ``sparsity`` s is the fraction of weights NOT perturbed; mask builders in
      :mod:`ssam_tune.method.masks` keep exactly floor((1 - s) * d) ones. The optimizer applies
      whatever mask it is given (:meth:`set_masks`); ``sparsity`` is the target the mask
      helpers (:meth:`set_masks_from_scores`, :meth:`dynamic_update`) read.
    - ``normalize="full"`` (the paper's and the reference's choice): e = rho * g / ||g|| with
      g the whole gradient, then masked, so ||e|| <= rho. ``"masked"``: e = rho * (g * m) /
      ||g * m||, so ||e|| = rho (as SAM-ON does).
    - Until masks are set, SSAM perturbs every weight, i.e. it is SAM.
    - ``granularity="tensor"``: :meth:`set_masks_from_scores`, :meth:`dynamic_update` build
      whole-tensor masks (:mod:`ssam_tune.method.masks`); with ``normalize="masked"`` the pass at w
      then needs only the perturbed tensors' gradients (:meth:`first_pass`).

    Masks are bool tensors, one per parameter in param_groups order, kept on the
    parameter's device; they are part of :meth:`state_dict`. For the step itself a 0/1 copy
    in the gradient's dtype is kept (as the reference code keeps float32 masks; rebuilt after
    :meth:`set_masks` or an in-place change to a mask): g * m with a bool m is a mixed-dtype
    multiply, an unvectorised casting loop on CPU and a per-tensor launch loop on CUDA, while
    the same-dtype product is bitwise the same and much faster.
    """

    def __init__(
        self,
        params: Iterable,
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
        *,
        rho: float = 0.05,
        sparsity: float = 0.5,
        normalize: str = "full",
        granularity: str = "element",
        tensor_score: str = "per_flop",
        eps: float = 1e-7,
        **base_kwargs,
    ) -> None:
        from ssam_tune.method.masks import GRANULARITIES, TENSOR_SCORES, check_sparsity

        self.sparsity = check_sparsity(sparsity)
        if normalize not in NORMALIZE_MODES:
            raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got normalize={normalize!r}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got granularity={granularity!r}")
        if tensor_score not in TENSOR_SCORES:
            raise ValueError(f"tensor_score must be one of {TENSOR_SCORES}, got tensor_score={tensor_score!r}")
        self.normalize = normalize
        self.granularity = granularity
        self.tensor_score = tensor_score
        super().__init__(params, base_optimizer, rho=rho, eps=eps, **base_kwargs)
        self._masks: list[torch.Tensor] | None = None
        self._mask_of: dict[torch.Tensor, torch.Tensor] = {}
        self._mask_cast: dict[torch.Tensor, tuple] = {}  # p -> (mask version, mask in grad dtype)
        self._empty: tuple[tuple[int, ...], list[torch.Tensor]] | None = None  # (mask versions, empty)

    # -- masks -----------------------------------------------------------------------------
    def params(self) -> list[torch.Tensor]:
        """All parameters in param_groups order (the order masks follow)."""
        return [p for g in self.param_groups for p in g["params"]]

    def masks(self) -> list[torch.Tensor] | None:
        """The current masks (bool, one per parameter), or None while SSAM is plain SAM."""
        return None if self._masks is None else list(self._masks)

    def set_masks(self, masks: list[torch.Tensor] | None) -> None:
        """Install masks (one per parameter, in param_groups order); None removes them."""
        self._mask_cast = {}
        self._empty = None
        if masks is None:
            self._masks, self._mask_of = None, {}
            return
        params = self.params()
        masks = list(masks)
        if len(masks) != len(params):
            raise ValueError(f"masks must have one tensor per parameter: got {len(masks)}, expected {len(params)}")
        out = []
        for i, (p, m) in enumerate(zip(params, masks, strict=True)):
            if not isinstance(m, torch.Tensor) or m.shape != p.shape:
                shape = getattr(m, "shape", type(m).__name__)
                raise ValueError(f"masks[{i}] must be a tensor of shape {tuple(p.shape)}, got {shape}")
            out.append(m.to(device=p.device, dtype=torch.bool))
        self._masks = out
        self._mask_of = dict(zip(params, out, strict=True))

    def set_masks_from_scores(self, scores: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                              costs: Sequence[float] | None = None) -> None:
        """Keep the top floor((1 - sparsity) * d) scores globally (SSAM-F, Eq. 6).

        ``scores[i]`` belongs to ``params[i]`` (for :func:`~ssam_tune.method.masks.fisher_scores`,
        ``list(model.parameters())``); the scores are matched to this optimizer's parameters
        by identity, so a param_groups order that differs from the model's cannot misplace
        them. ``params`` must hold each of the optimizer's parameters exactly once. With
        ``granularity="tensor"`` whole tensors are chosen (:func:`~ssam_tune.method.masks.tensor_topk_mask`
        by ``tensor_score``; ``costs[i]``, for ``params[i]``, is needed by ``"per_flop"``)."""
        from ssam_tune.method.masks import tensor_topk_mask, topk_mask

        scores, params = list(scores), list(params)
        if len(scores) != len(params):
            raise ValueError(f"scores and params must have the same length, got {len(scores)} and {len(params)}")
        by_param = {p: sc for p, sc in zip(params, scores, strict=True)}
        mine = self.params()
        if len(by_param) != len(params) or set(by_param) != set(mine):
            raise ValueError("params must hold each of the optimizer's parameters exactly once "
                             f"(got {len(params)} tensors for {len(mine)} parameters)")
        ordered = [by_param[p] for p in mine]
        if self.granularity == "tensor":
            cost_of = None if costs is None else dict(zip(params, costs, strict=True))
            self.set_masks(tensor_topk_mask(ordered, self.sparsity, self.tensor_score,
                                            None if cost_of is None else [cost_of[p] for p in mine]))
        else:
            self.set_masks(topk_mask(ordered, self.sparsity))

    def dynamic_update(self, t: float, total: float, *, alpha: float = 0.5, strategy: str = "flattest",
                       generator: torch.Generator | None = None) -> None:
        """SSAM-D mask update (Eq. 7-9) from the current gradients at w (call before first_step)."""
        from ssam_tune.method.masks import dynamic_mask_update, tensor_dynamic_update

        if self._masks is None:
            raise ValueError("dynamic_update needs an initial mask: call set_masks(random_mask(...)) first")
        params = self.params()
        grads = [p.grad for p in params]
        update = tensor_dynamic_update if self.granularity == "tensor" else dynamic_mask_update
        self.set_masks(update(self._masks, grads, sparsity=self.sparsity, t=t, total=total,
                                           alpha=alpha, strategy=strategy, generator=generator))

    def _masks_like(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """The masks as 0/1 tensors of each gradient's dtype and device.

        Cached per parameter; rebuilt after set_masks or an in-place change to a mask tensor
        (its version counter moves), so the cache never changes what is applied.
        """
        out = []
        for p, g in zip(params, grads, strict=True):
            mask = self._mask_of[p]
            version, m = self._mask_cast.get(p, (None, None))
            if m is None or version != mask._version or m.dtype != g.dtype or m.device != g.device:
                m = mask.to(device=g.device, dtype=g.dtype)
                self._mask_cast[p] = (mask._version, m)
            out.append(m)
        return out

    def skipped(self) -> list[torch.Tensor]:
        """The parameters whose gradient at w the perturbation does not use: those with an
        all-False mask, when ``normalize="masked"`` (with ``"full"``, ||g|| needs every
        gradient). Empty while no masks are set, and when no parameter would be left."""
        if self._masks is None or self.normalize != "masked":
            return []
        params = self.params()
        empty = [p for p in self._unperturbed() if p.requires_grad]
        if len(empty) == sum(p.requires_grad for p in params):
            return []  # nothing would need a gradient: keep the pass as it is
        return empty

    def _unperturbed(self) -> list[torch.Tensor]:
        """Parameters whose mask is all False (one device sync per new mask)."""
        versions = tuple(m._version for m in self._masks)
        if self._empty is None or self._empty[0] != versions:
            device = self._masks[0].device
            anys = torch.stack([m.any().to(device) for m in self._masks]).tolist()
            self._empty = (versions, [p for p, a in zip(self.params(), anys, strict=True) if not a])
        return self._empty[1]

    @contextlib.contextmanager
    def first_pass(self):
        """Run the forward and backward at w inside this block: parameters the perturbation
        does not touch (:meth:`skipped`) stop requiring gradients until the block ends, so
        autograd skips their weight-gradient kernels and backward stops at the earliest
        perturbed layer. The gradients it computes, and so e, BatchNorm's running statistics
        and the step, are those of the full pass (tests/test_structured.py, in float64);
        the skipped parameters' ``grad`` stays None. Masks must be the ones
        :meth:`first_step` will use: an SSAM-D update that reads this pass's gradients must
        run the pass in full.
        """
        frozen = self.skipped()
        for p in frozen:
            p.requires_grad_(False)
        try:
            yield self
        finally:
            for p in frozen:
                p.requires_grad_(True)

    # -- the first phase, masked --------------------------------------------------------------
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Climb to w + e * m (Alg. 1 line 9), normalising as ``normalize`` says."""
        if self._masks is None:
            return super().first_step(zero_grad)
        groups = self._grad_params()
        if self.normalize == "masked":
            # Tensors with an all-False mask add nothing to e or to ||g * m||: leave them out,
            # so a pass that computed their gradients and one that skipped them
            # (first_pass) compute e from the same numbers, in the same order.
            empty = {id(p) for p in self._unperturbed()}
            groups = [(g, [p for p in ps if id(p) not in empty]) for g, ps in groups]
        params_all = [p for _, ps in groups for p in ps]
        if not params_all:
            self._perturbed, self._backups, self.last_e_norm = [], [], None
            if zero_grad:  # the pass at w + e must not add to these gradients
                self.zero_grad()
            return
        grads = [p.grad for p in params_all]
        # Masked gradients g * m (scratch tensors, scaled in place into e below).
        masked = torch._foreach_mul(grads, self._masks_like(params_all, grads))
        masked_norms = self._stack_norms(masked)
        if self.normalize == "full":  # paper / reference: ||g|| of the whole gradient
            denom = torch.linalg.vector_norm(self._stack_norms(grads)) + self.eps
        else:  # "masked": ||g * m||, so that ||e|| = rho
            denom = torch.linalg.vector_norm(masked_norms) + self.eps
        self._backup(params_all)
        self._perturb(groups, masked, masked_norms, denom, scratch=True)
        if zero_grad:
            self.zero_grad()

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Base optimizer state plus ``"ssam": {"masks": [...] or None}`` (bool tensors)."""
        sd = super().state_dict()
        sd["ssam"] = {"masks": None if self._masks is None else [m.clone() for m in self._masks]}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        masks = (state_dict.get("ssam") or {}).get("masks")
        super().load_state_dict(state_dict)
        self.set_masks(masks)
        # set_masks keys masks by parameter object; the parameters did not change on load.


@contextlib.contextmanager
def freeze_bn_stats(model: nn.Module):
    """Keep BatchNorm running statistics (and num_batches_tracked) untouched inside the block.

    Common SAM practice for the second forward pass at w + e: train-mode BatchNorm still
    normalises with the batch statistics, but the running estimates are not updated a second
    time (the reference code updates them twice per step). Opt-in; use it around the second
    forward only::

        with freeze_bn_stats(model):
            loss_fn(model(x), y).backward()
    """
    saved = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            saved.append(m)
            m.track_running_stats = False  # batch stats used, running buffers not passed in
    try:
        yield model
    finally:
        for m in saved:
            m.track_running_stats = True
