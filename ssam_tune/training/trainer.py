"""One training run of SGD, SAM or SSAM (``python -m ssam_tune.train CONFIG.yaml``: see
:mod:`ssam_tune.train`).

:class:`Trainer` knows nothing of Ray: it takes a :class:`~ssam_tune.training.config.Config` (and,
to resume, a checkpoint dict) and yields one metrics dict per epoch. Everything random
(initialisation, data order, augmentation, masks, Fisher samples) comes from generators
seeded from ``config.seed`` and saved in every checkpoint, so a run resumed from epoch k in
a fresh process reproduces the uninterrupted run's non-timing metrics bit for bit on CPU.

Inside an initialised torch.distributed process group (a multi-worker trial: Ray Train starts
one Trainer per worker) the run is data-parallel and equals the 1-worker run on the same
``train.batch_size`` (:mod:`ssam_tune.training.distributed`): every rank draws the same global batch
from the same generators and trains on its ``batch_size / workers`` share; gradients are
averaged after both passes; masks come out bit-identical (Fisher scores summed over the
ranks' shares of the N_F samples); evaluation and the reported sums cover whole splits.
Without SyncBatchNorm (``train.sync_bn``, CUDA only) each rank normalises with its share's
batch statistics, and running statistics are averaged once per epoch.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ssam_tune.method import masks as M
from ssam_tune.method.flops import FlopsModel, backward_flops_per_tensor, forward_backward_flops
from ssam_tune.method.methods import method
from ssam_tune.method.optim import SAM, SSAM, freeze_bn_stats
from ssam_tune.method.schedule import PerturbSchedule
from ssam_tune.storage.files import atomic_write
from ssam_tune.training import distributed as D
from ssam_tune.training.batches import iterate_batches, sample_for_fisher
from ssam_tune.training.config import Config, ConfigError, config_to_dict
from ssam_tune.training.data import Data, Split, load_dataset, make_dataloader
from ssam_tune.training.models import build_model

__all__ = ["Trainer", "load_checkpoint", "load_data", "save_checkpoint"]

CHECKPOINT_FORMAT = 1
# Offsets of the independent random streams derived from config.seed.
_STREAMS = {"init": 0, "order": 1, "augment": 2, "mask": 3, "fisher": 4, "perturb": 5}


def resolve_device(name: str, *, assigned: torch.device | str | None = None,
                   gpu_ids: Sequence[object] = ()) -> torch.device:
    """``train.device`` as a torch device; the one place that resolves it (the training
    command line, Ray trials and Ray Train workers).

    ``auto``: the device a launcher ``assigned`` to this process (a Ray Train worker's), else
    the first visible GPU (a Ray trial sees only its own: Ray sets CUDA_VISIBLE_DEVICES), else
    the CPU, with a warning where GPUs were assigned (``gpu_ids``, Ray's) but CUDA is not
    available. A named device is checked: ``cuda`` without CUDA, or a malformed name, is a
    ConfigError."""
    if name == "auto":
        if assigned is not None:
            return torch.device(assigned)
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        if gpu_ids:
            warnings.warn(f"GPU {list(gpu_ids)} assigned but CUDA is not available here; training on the CPU",
                          stacklevel=2)
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("train.device", f"{name!r} requested but CUDA is not available; use auto or cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError("train.device", f"must be auto, cpu, cuda or cuda:N, got {name!r}") from None


def resolve_normalize(method_cfg) -> str:
    """``method.normalize`` as the optimizer takes it. SAM-ON always normalises over the
    layers it perturbs (Mueller et al., ||e|| = rho); ``auto`` is the paper's ``full`` for
    element masks and ``masked`` for tensor masks, whose pass at w then needs only the
    perturbed tensors' gradients (with ``full``, ||g|| needs all of them)."""
    if method(method_cfg.name).mask == "norm":
        return "masked"
    if method_cfg.normalize != "auto":
        return method_cfg.normalize
    return "masked" if method_cfg.granularity == "tensor" else "full"


def load_data(cfg: Config) -> Data:
    """Load the configured data set with its seeded validation split."""
    d = cfg.data
    return load_dataset(d.name, root=d.root, download=d.download, val_fraction=d.val_fraction,
                        seed=cfg.seed, augment=d.augment, label_noise=d.label_noise, kwargs=d.kwargs)


def _balanced_subset(split: Split, size: int, seed: int) -> Split:
    """A class-balanced, seeded subset of ``size`` images (reduced-scale runs)."""
    if size >= len(split):
        return split
    gen = torch.Generator().manual_seed(seed)
    labels = split.labels.cpu()
    classes = labels.unique()
    per = [torch.nonzero(labels == c).flatten() for c in classes]
    per = [idx[torch.randperm(len(idx), generator=gen)] for idx in per]
    take, i = [], 0
    while len(take) < size:  # round robin over classes keeps the balance exact
        idx = per[i % len(per)]
        j = i // len(per)
        if j < len(idx):
            take.append(int(idx[j]))
        i += 1
    return split.subset(torch.tensor(sorted(take)))


def _cosine_lr(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warm-up, then cosine decay to 0 (Section 5.1)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


class Trainer:
    """A training run. Iterate :meth:`epochs` for metrics; :meth:`state_dict` checkpoints it."""

    def __init__(self, cfg: Config, *, data: Data | None = None, device: torch.device | str | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.log = log or (lambda msg: None)
        # the method's row (methods.py): optimizer, mask kind, cost rule; its settings are the
        # MethodConfig cfg.method (method_cfg below)
        self.method_row = method(cfg.method.name)
        self.sparse = self.method_row.sparse
        self.rank, self.world = D.rank(), D.world_size()  # (0, 1) outside a process group
        self._set_device(device)
        self._place_data(data if data is not None else load_data(cfg))
        self._check_workers()
        self._build_model()
        self._make_generators()
        self._build_optimizer()
        self._build_schedules()
        self.epoch = 0  # completed epochs
        self.global_step = 0
        self.resumed = False  # whether load_state_dict ran
        self._count_seconds = 0.0  # FLOPs counting in this process (_counting), left out of epoch times
        self.tracker = {"best_val_acc": -1.0, "best_epoch": 0, "refreshes": 0, "flops_theoretical": 0.0,
                        "flops_executed": 0.0, "flops_mask": 0.0, "images": 0, "status": "running",
                        "last_good": None, "last_overlap": None, "last_density": None, "train_seconds": 0.0}

    # -- construction, one concern each ------------------------------------------------------------
    def _set_device(self, device: torch.device | str | None) -> None:
        """The device, and the GPU-only speed settings (bf16 autocast, channels_last)."""
        t = self.cfg.train
        self.device = torch.device(device) if device is not None else resolve_device(t.device)
        on_gpu = self.device.type == "cuda"
        self.amp_dtype = torch.bfloat16 if (t.precision == "bf16" or (t.precision == "auto" and on_gpu)) else None
        self.channels_last = on_gpu if t.channels_last is None else t.channels_last

    def _place_data(self, data: Data) -> None:
        """The splits: in-memory data sets live on the training device (augmented there)."""
        self.data = data
        if data.in_memory:
            train = data.train
            if self.cfg.data.train_size:
                train = _balanced_subset(train, self.cfg.data.train_size, self.cfg.seed)
            self.train_split = train.to(self.device)
            self.val_split = self._share(data.val).to(self.device)
            self.test_split = self._share(data.test).to(self.device)
        else:
            self.train_split = data.train
            self.val_split, self.test_split = self._share(data.val), self._share(data.test)

    def _share(self, split):
        """This rank's share of an evaluation split (the whole split on one worker); the
        shares' sums add up to the split's (:meth:`evaluate`)."""
        if self.world == 1 or split is None:
            return split
        index = D.share(len(split), self.rank, self.world)
        if isinstance(split, Split):
            return split.subset(torch.arange(index.start, index.stop))
        return torch.utils.data.Subset(split, list(index))

    def _check_workers(self) -> None:
        """What data parallelism needs of the config, refused before any work."""
        if self.world == 1:
            return
        t = self.cfg.train
        if t.batch_size % self.world:
            raise ConfigError("train.batch_size", f"{t.batch_size} does not split evenly over {self.world} workers: "
                              f"use a multiple of {self.world} (train.batch_size is the global batch; each worker "
                              "takes batch_size / workers of it)")
        if not self._drop_last() and len(self.train_split) % self.world:
            raise ConfigError("data.train_size", f"the training set ({len(self.train_split)} images) is smaller "
                              f"than one batch and does not split evenly over {self.world} workers")
        if t.sync_bn and self.device.type != "cuda":
            raise ConfigError("train.sync_bn", "needs CUDA (torch's SyncBatchNorm trains on GPUs only); set "
                              "train.sync_bn: false, or train on GPUs")

    def _build_model(self) -> None:
        """The model from the init stream (paired seeds: the same init across methods), and
        its measured per-sample FLOPs."""
        m, data = self.cfg.model, self.data
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed + _STREAMS["init"])
            kw = {"depth": m.depth, "widen_factor": m.widen_factor} if m.name == "wrn28_10" else {}
            self.model = build_model(m.name, data.num_classes, width=m.width, input_shape=data.sample_shape,
                                     **kw, **m.kwargs)
        self.input_shape = data.sample_shape  # one sample, for FLOPs counts
        self.flops = FlopsModel.from_model(self.model, self.input_shape, self.cfg.train.batch_size)
        if self.cfg.train.sync_bn and self.world > 1:
            # batch statistics over the global batch, as one worker computes them
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.model.to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.n_params = sum(p.numel() for p in self.model.parameters())
        # The compiled module shares the model's parameters and buffers: state dicts, masks,
        # Fisher scores and FLOPs keep using the eager model. Each requires-grad pattern of
        # the pass at w (tensor masks) and BatchNorm mode is one more compiled graph.
        self.forward = torch.compile(self.model) if self.cfg.train.compile else self.model

    def _make_generators(self) -> None:
        """One seeded generator per random stream; all of them are saved in checkpoints."""
        seed = self.cfg.seed
        gen_dev = self.device if self.device.type == "cuda" else torch.device("cpu")
        self.gens = {name: torch.Generator(device=gen_dev).manual_seed(seed + _STREAMS[name])
                     for name in ("order", "augment", "mask", "fisher")}
        self.dl_gen = torch.Generator().manual_seed(seed + _STREAMS["order"])  # ImageFolder path

    def _build_optimizer(self) -> None:
        """SGD, SAM or SSAM around SGD, as the method's cost rule says (methods.py)."""
        t, method_cfg = self.cfg.train, self.cfg.method
        base = dict(lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, nesterov=t.nesterov)
        params = self.model.parameters()
        if not self.method_row.perturbs:
            self.opt = torch.optim.SGD(params, **base)
        elif not self.method_row.sparse:
            self.opt = SAM(params, torch.optim.SGD, rho=method_cfg.rho, **base)
        else:
            normalize = resolve_normalize(method_cfg)
            if normalize == "full" and method_cfg.granularity == "tensor":
                self.log("method.normalize: full with granularity: tensor needs every weight gradient at w, "
                         "so the first pass costs as much as SAM's; use normalize: masked (or auto) to save it")
            self.opt = SSAM(params, torch.optim.SGD, rho=method_cfg.rho, sparsity=method_cfg.sparsity,
                            normalize=normalize, granularity=method_cfg.granularity,
                            tensor_score=method_cfg.tensor_score, **base)
        self._names = {p: n for n, p in self.model.named_parameters()}
        self._exec_flops: float | None = None  # per sample, for the current masks (_executed_flops)

    def _build_schedules(self) -> None:
        """The mask refresh schedule (Alg. 1, T_m), the perturbation schedule, the LR schedule
        and the loss."""
        t, method_cfg = self.cfg.train, self.cfg.method
        # SAM-ON's mask is the model's normalization layers: built once.
        fixed = method_cfg.fixed_mask or self.method_row.mask == "norm"
        self.mask_schedule = M.MaskSchedule(interval=method_cfg.T_m, unit=method_cfg.mask_unit, fixed=fixed)
        self.steps_per_epoch = self._steps_per_epoch()
        total = t.epochs * self.steps_per_epoch
        # Which steps perturb (method/schedule.py): a pure function of the config and the seed,
        # so every rank and a resumed run take the same decisions without saved state.
        schedule = PerturbSchedule(every=method_cfg.perturb_every, start=method_cfg.perturb_from,
                                   prob=method_cfg.perturb_prob, seed=self.cfg.seed + _STREAMS["perturb"])
        self.perturb_plan = schedule.plan(total) if self.method_row.perturbs else [False] * total
        self.perturb_first = schedule.first_step(total) if self.method_row.perturbs else total
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.opt, _cosine_lr(total, t.warmup_epochs * self.steps_per_epoch))
        self.criterion = nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)

    # -- sizes -------------------------------------------------------------------------------
    def _drop_last(self) -> bool:
        return len(self.train_split) >= self.cfg.train.batch_size  # never a batch of 1 for BN

    def _steps_per_epoch(self) -> int:
        n, bs = len(self.train_split), self.cfg.train.batch_size
        steps = n // bs if self._drop_last() else -(-n // bs)
        cap = self.cfg.train.max_steps_per_epoch
        return min(steps, cap) if cap else steps

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue bit for bit; loadable with weights_only=True."""
        return {
            "format": CHECKPOINT_FORMAT,
            "config": config_to_dict(self.cfg),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.lr_schedule.state_dict(),
            "rng": {name: g.get_state() for name, g in self.gens.items()} | {
                "dataloader": self.dl_gen.get_state(), "torch": torch.get_rng_state()},
            "tracker": dict(self.tracker),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"unknown checkpoint format {state.get('format')!r}")
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["scheduler"])
        for name, g in self.gens.items():
            g.set_state(state["rng"][name])
        self.dl_gen.set_state(state["rng"]["dataloader"])
        torch.set_rng_state(state["rng"]["torch"])
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.tracker = dict(state["tracker"])
        self.resumed = True

    # -- masks -------------------------------------------------------------------------------
    def _fisher_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The N_F Fisher samples (Eq. 5), the same draw on every rank; this rank's share of
        them (its scores are summed with the other ranks', distributed.fisher_scores_distributed)."""
        n = self.cfg.method.N_F
        if isinstance(self.train_split, Split):
            x, y = sample_for_fisher(self.train_split, n, self.gens["fisher"])
            return D.shard(x, y, self.rank, self.world, even=False)
        # ImageFolder: the same files with the evaluation transform (no augmentation).
        subset = self.train_split
        base = getattr(self.data.val, "dataset", None)
        perm = torch.randperm(len(subset), generator=self.gens["fisher"], device=self.gens["fisher"].device)[:n]
        index = D.share(len(perm), self.rank, self.world)  # load only this rank's share
        items = [(base or subset.dataset)[subset.indices[int(i)]] for i in perm[index.start:index.stop].cpu()]
        if not items:  # more workers than Fisher samples
            return torch.zeros(0, *self.input_shape, device=self.device), torch.zeros(0, dtype=torch.long,
                                                                                    device=self.device)
        x = torch.stack([it[0] for it in items]).to(self.device)
        y = torch.tensor([it[1] for it in items], device=self.device)
        return x, y

    def _refresh_mask(self, before_grad: bool) -> None:
        """Build the next mask; Fisher and random masks before the step's forward pass,
        dynamic updates after it (they read the gradient at w, Eq. 7)."""
        kind = self.method_row.mask
        method_cfg = self.cfg.method
        opt: SSAM = self.opt  # type: ignore[assignment]
        previous = opt.masks()
        params = opt.params()
        tensor = method_cfg.granularity == "tensor"
        cost_only = tensor and method_cfg.tensor_score == "cost"  # the control without the Fisher
        if kind == "fisher" and before_grad:
            if cost_only:  # the ranking reads only each tensor's size and cost
                scores = [torch.ones_like(p) for p in self.model.parameters()]
            else:
                x, y = self._fisher_batch()
                # model.parameters() order; summed over the ranks' shares (one worker: its own)
                scores = D.fisher_scores_distributed(self.model, None, x, y, bn=method_cfg.fisher_bn)
            costs = None
            if tensor and method_cfg.tensor_score in ("per_flop", "cost"):
                with self._counting():
                    per_tensor = backward_flops_per_tensor(self.model, self.input_shape)
                costs = [per_tensor[n] for n, _ in self.model.named_parameters()]
            opt.set_masks_from_scores(scores, list(self.model.parameters()), costs)
        elif kind in ("random", "dynamic") and before_grad:  # the initial mask of SSAM-D is random
            draw = M.tensor_random_mask if tensor else M.random_mask
            opt.set_masks(draw(params, method_cfg.sparsity, generator=self.gens["mask"]))
        elif kind == "norm" and before_grad:
            opt.set_masks(M.norm_mask(self.model, params))
        elif kind == "dynamic":
            opt.dynamic_update(self.epoch, self.cfg.train.epochs, alpha=method_cfg.alpha, strategy=method_cfg.drop,
                               generator=self.gens["mask"])
        else:
            return
        stats = M.mask_stats(opt.masks(), previous)
        self._exec_flops = None
        self.tracker["refreshes"] += 1
        self.tracker["last_density"] = stats["density"]
        self.tracker["last_overlap"] = stats["overlap"]
        self.tracker["flops_mask"] += self.flops.mask_update_flops(
            self.method_row.name, n_params=self.n_params,
            fisher_samples=0 if cost_only else min(method_cfg.N_F, len(self.train_split)))

    def _executed_flops(self) -> float:
        """FLOPs per sample of a step with the current masks, as its passes run: the pass at
        w is measured with the same requires-grad set as :meth:`SSAM.first_pass` gives it
        (flops.forward_backward_flops on a meta-device copy); cached until the next refresh."""
        if self._exec_flops is None:
            first = None
            skipped = self.opt.skipped() if self.sparse else []
            if skipped:
                with self._counting():
                    first = forward_backward_flops(self.model, self.input_shape,
                                                   frozen=[self._names[p] for p in skipped])[1]
            self._exec_flops = self.flops.executed_per_sample(self.method_row.name, first)
        return self._exec_flops

    @contextlib.contextmanager
    def _counting(self):
        """Time spent counting FLOPs (on a meta-device copy: accounting, not training), which
        the epoch's seconds leave out: the per-tensor cost table of tensor masks alone takes
        seconds once per process and would otherwise land in epoch 1's time."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._count_seconds += time.perf_counter() - start

    def _theoretical_sparsity(self) -> float:
        """s in the paper's cost formula: the configured sparsity for element masks, the
        measured one where whole tensors make the density differ (tensor masks, SAM-ON)."""
        if not self.sparse:
            return 0.0
        if self.method_row.mask != "norm" and self.cfg.method.granularity == "element":
            return self.cfg.method.sparsity
        return 1.0 - self.tracker["last_density"]

    # -- one epoch ---------------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _train_batches(self):
        """This rank's share of each global batch (the whole batch on one worker)."""
        t = self.cfg.train
        if isinstance(self.train_split, Split):
            augment = self.data.augment == "cifar" and self.cfg.data.augment != "none"
            # Every rank draws the whole global batch and its augmentation from the same
            # generators and keeps its share: the 1-worker batch, split (augmenting the
            # whole batch costs little next to the passes).
            batches = iterate_batches(self.train_split, t.batch_size, shuffle=True, generator=self.gens["order"],
                                      augment=augment, drop_last=self._drop_last(), cutout=self.cfg.data.cutout,
                                      channels_last=self.channels_last)
            return batches if self.world == 1 else (D.shard(x, y, self.rank, self.world) for x, y in batches)
        return make_dataloader(self.train_split, t.batch_size, shuffle=True, generator=self.dl_gen,
                               num_workers=self.cfg.data.num_workers, drop_last=self._drop_last(),
                               pin_memory=self.device.type == "cuda", rank=self.rank, world=self.world)

    def _to_device(self, x, y):
        x = x.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.device, non_blocking=True)

    def _loss(self, x, y):
        with self._autocast():
            logits = self.forward(x)
            return self.criterion(logits.float(), y), logits

    def _perturbs(self) -> bool:
        """Whether the coming step perturbs (the perturbation schedule; every step by default)."""
        g = self.global_step
        return self.perturb_plan[g] if g < len(self.perturb_plan) else self.method_row.perturbs

    def _refresh_masks_before_step(self, step: int) -> bool:
        """Alg. 1's mask refresh (every T_m), where it comes before the step's forward pass:
        Fisher and random masks, and SSAM-D's initial random mask, so the very first step is
        already sparse. (The reference starts from an all-zero mask and builds its first one
        after step 0, so only its step 0 is unperturbed, i.e. plain SGD.) Returns True where
        the refresh is an SSAM-D update instead, which :meth:`_step` makes from the step's
        gradient at w.

        With ``method.perturb_from``, no mask is kept while no step perturbs: the first mask
        is built before the first step that may perturb, and T_m's rule applies from there."""
        if not self.sparse or self.global_step < self.perturb_first:
            return False
        initial = self.global_step == self.perturb_first
        if not (initial or self.mask_schedule.due(self.epoch, step, self.global_step)):
            return False
        if self.method_row.mask == "dynamic" and not initial:
            return True
        self._refresh_mask(before_grad=True)
        return False

    def _step_flops(self, mask_update: bool, perturb: bool) -> float:
        """Executed FLOPs per sample of the coming step, as its passes run: one pass (SGD, and a
        step the perturbation schedule skips), the pass at w with the current masks
        (:meth:`_executed_flops`), or in full (dense methods, and a step whose gradient at w
        makes an SSAM-D update)."""
        if not perturb:
            return self.flops.executed_per_sample("sgd")
        if self.sparse and not mask_update:
            return self._executed_flops()
        return self.flops.executed_per_sample(self.method_row.name)

    def _inject_faults(self, loss: torch.Tensor) -> torch.Tensor:
        """The fault-injection hook, called once per step, between the forward pass at w and its
        backward. ``train.inject_kill_at_step``: the last worker SIGKILLs itself at that global
        step, in a run that did not start from a checkpoint. ``train.inject_nan_at_step``: from
        that global step on, the loss is NaN (a divergence)."""
        t = self.cfg.train
        kill_at, nan_at = t.inject_kill_at_step, t.inject_nan_at_step
        if kill_at is not None and self.global_step == kill_at and not self.resumed \
                and self.rank == self.world - 1:
            os.kill(os.getpid(), signal.SIGKILL)
        if nan_at is not None and self.global_step >= nan_at:
            return loss * float("nan")
        return loss

    def _average_gradients(self) -> None:
        """With several workers, each parameter's gradient averaged over the ranks: the
        global batch's, on every rank (one worker: nothing to do)."""
        if self.world > 1:
            D.average_gradients(self.model.parameters())

    def _step(self, x: torch.Tensor, y: torch.Tensor, mask_update: bool,
              perturb: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One optimizer step on this rank's share of a batch: SGD's one pass, or SAM's and
        SSAM's two (the gradient at w gives e, Eq. 2; the gradient at w + e the update, Eq. 3),
        each pass's gradients averaged over the workers; then the LR schedule's step.
        ``mask_update``: SSAM-D's mask update from this step's gradient at w (Eq. 7).
        ``perturb``: False for a step the perturbation schedule skips (the base optimizer's
        plain step, one pass).

        Returns the loss and logits of the pass at w (detached) and ||e|| (None where the step
        did not perturb)."""
        opt = self.opt
        # The pass at w computes only the gradients e needs (tensor masks with normalize
        # masked, SAM-ON); an SSAM-D update reads this pass's gradients to pick the next
        # mask, so that pass runs in full (once per T_m), as does a step without perturbation
        # (its gradient at w is the update).
        with opt.first_pass() if self.sparse and perturb and not mask_update else contextlib.nullcontext():
            loss, logits = self._loss(x, y)
            loss = self._inject_faults(loss)
            loss.backward()
        self._average_gradients()  # g at w, before e and mask updates read it
        if mask_update:  # drop by |g| at w from this minibatch (Eq. 7)
            self._refresh_mask(before_grad=False)
        e_norm = None
        if not self.method_row.perturbs:
            opt.step()
            opt.zero_grad(set_to_none=True)
        elif not perturb:
            opt.plain_step(zero_grad=True)
        else:
            opt.first_step(zero_grad=True)
            frozen_bn = self.cfg.method.bn_second_pass == "freeze"
            with freeze_bn_stats(self.model) if frozen_bn else contextlib.nullcontext():
                self._loss(x, y)[0].backward()
            self._average_gradients()  # the gradient at w + e
            opt.second_step(zero_grad=True)
            e_norm = opt.last_e_norm
        self.lr_schedule.step()
        self.global_step += 1
        return loss.detach(), logits.detach(), e_norm

    def _diverged_anywhere(self, loss_sum: torch.Tensor) -> bool:
        """Whether the loss summed so far is NaN or infinite on any rank (one all-reduce):
        every rank must stop at the same step."""
        return not torch.isfinite(D.all_reduce_sums(loss_sum.clone()))

    def _charge_flops(self, steps: int, images: int, executed: float, perturbed: tuple[int, int]) -> None:
        """An epoch's FLOPs into the run's totals: the paper's theoretical cost of ``steps``
        steps on ``images`` samples (the method's cost rule for the ``perturbed`` (steps,
        images), an SGD step's for the rest), and the ``executed`` FLOPs its passes ran (mask
        updates are charged as they happen, :meth:`_refresh_mask`)."""
        p_steps, p_images = perturbed
        theoretical = self.flops.training_flops("sgd", steps - p_steps, images=images - p_images)["theoretical"]
        if p_steps:
            theoretical += self.flops.training_flops(self.method_row.name, p_steps, images=p_images,
                                                     sparsity=self._theoretical_sparsity())["theoretical"]
        self.tracker["flops_theoretical"] += theoretical
        self.tracker["flops_executed"] += executed
        self.tracker["perturbed_steps"] = self.tracker.get("perturbed_steps", 0) + p_steps

    def _train_epoch(self) -> dict | None:
        """One epoch; returns train metrics, or None if the loss became NaN/inf."""
        self.model.train()
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)  # this rank's shares
        correct = torch.zeros((), device=self.device, dtype=torch.int64)
        e_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        seen, steps, executed = 0, 0, 0.0  # global batches
        p_steps, p_seen = 0, 0  # the steps that perturbed, and their images
        for step, (x, y) in enumerate(self._train_batches()):
            if step >= self.steps_per_epoch:
                break
            x, y = self._to_device(x, y)
            mask_update = self._refresh_masks_before_step(step)
            perturb = self._perturbs()
            n = y.shape[0] * self.world  # the global batch: shares are equal (_check_workers)
            executed += n * self._step_flops(mask_update, perturb)
            loss, logits, e_norm = self._step(x, y, mask_update, perturb)
            if e_norm is not None:
                e_sum += e_norm
                p_steps, p_seen = p_steps + 1, p_seen + n
            loss_sum += loss.double() * y.shape[0]
            correct += (logits.argmax(1) == y).sum()
            seen += n
            steps += 1
            if steps % 25 == 0 and self._diverged_anywhere(loss_sum):
                return None
        loss_sum, correct = D.all_reduce_sums(torch.stack([loss_sum, correct.double()]))  # whole batches
        if seen == 0 or not torch.isfinite(loss_sum):
            return None
        self.tracker["images"] += seen
        self._charge_flops(steps, seen, executed, (p_steps, p_seen))
        # ||e|| averaged over the steps that perturbed (0 where none did)
        return {"train_loss": loss_sum.item() / seen, "train_acc": correct.item() / seen,
                "e_norm": e_sum.item() / p_steps if p_steps else 0.0, "train_images": seen,
                "perturbed_share": p_steps / steps}

    @torch.no_grad()
    def evaluate(self, split) -> tuple[float, float]:
        """(loss, accuracy) on a split; (nan, nan) for an empty one. With several workers
        ``split`` is this rank's share, and the sums are added over ranks: every rank
        returns the whole split's figures."""
        if split is None or (self.world == 1 and len(split) == 0):
            return float("nan"), float("nan")
        self.model.eval()
        bs = self.cfg.train.eval_batch_size
        if isinstance(split, Split):
            batches = iterate_batches(split, bs, channels_last=self.channels_last)
        else:
            batches = make_dataloader(split, bs, num_workers=self.cfg.data.num_workers)
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.int64)
        n = 0
        for x, y in batches:
            x, y = self._to_device(x, y)
            with self._autocast():
                logits = self.forward(x).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
            correct += (logits.argmax(1) == y).sum()
            n += y.shape[0]
        loss_sum, correct, n = D.all_reduce_sums(torch.stack([loss_sum, correct.double(),
                                                              torch.tensor(float(n), device=self.device,
                                                                           dtype=torch.float64)])).tolist()
        if n == 0:
            return float("nan"), float("nan")
        return loss_sum / n, correct / n

    # -- the run ---------------------------------------------------------------------------------
    def _check_replicas(self) -> None:
        """Once per epoch on several workers: the ranks' BatchNorm running statistics
        averaged (each rank updated them from its share; SyncBatchNorm's are equal already),
        and the masks checked bit for bit (one broadcast of d bytes): ranks whose masks
        differ would train different models, so the run stops with an error."""
        if not self.cfg.train.sync_bn:
            D.average_buffers(self.model)
        if self.sparse and not D.masks_identical(self.opt.masks()):
            raise RuntimeError(f"epoch {self.epoch + 1}: the workers' masks differ; data-parallel SSAM needs "
                               "identical masks on every rank (see training/distributed.py)")

    def epochs(self) -> Iterator[dict]:
        """Train the remaining epochs, yielding metrics after each; stops on divergence."""
        while self.epoch < self.cfg.train.epochs and self.tracker["status"] == "running":
            lr = self.opt.param_groups[0]["lr"]
            start, counted = time.perf_counter(), self._count_seconds
            train = self._train_epoch()
            if train is None:
                self.tracker["status"] = "diverged"
                last = dict(self.tracker["last_good"] or {"epoch": self.epoch})
                last["status"] = "diverged"
                self.log(f"epoch {self.epoch + 1}: loss is NaN or infinite; run stopped as diverged")
                yield last
                return
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            counting = self._count_seconds - counted  # reported apart (flops_count_seconds)
            seconds = time.perf_counter() - start - counting
            if self.world > 1:
                self._check_replicas()
            val_loss, val_acc = self.evaluate(self.val_split)
            self.epoch += 1
            every = self.cfg.train.test_every
            improved = not math.isnan(val_acc) and val_acc > self.tracker["best_val_acc"]
            # The test set is only reported: it is skipped between test_every epochs to save
            # time, except at a new best validation accuracy, so test_acc_at_best is defined.
            if improved or self.epoch >= self.cfg.train.epochs or (every and self.epoch % every == 0):
                test_loss, test_acc = self.evaluate(self.test_split)
            else:
                test_loss, test_acc = float("nan"), float("nan")
            self.tracker["train_seconds"] += seconds
            if improved:
                self.tracker["best_val_acc"], self.tracker["best_epoch"] = val_acc, self.epoch
                self.tracker["test_acc_at_best"] = test_acc  # reported, never used to select
            tr = self.tracker
            done = self.epoch >= self.cfg.train.epochs
            metrics = {
                "epoch": self.epoch,
                "train_loss": train["train_loss"], "train_acc": train["train_acc"],
                "val_loss": val_loss, "val_acc": val_acc, "test_loss": test_loss, "test_acc": test_acc,
                "lr": lr,
                # a sparse method's mask share; 0 before its first mask (perturb_from: nothing perturbed yet)
                "mask_density": (tr["last_density"] or 0.0) if self.sparse else 1.0,
                "mask_overlap": tr["last_overlap"] if self.sparse else None,
                "mask_refreshes": tr["refreshes"],
                "e_norm": train["e_norm"],
                "perturbed_share": train["perturbed_share"],  # of this epoch's steps
                "perturbed_steps": tr.get("perturbed_steps", 0),  # in the run so far
                "epoch_seconds": seconds,
                "flops_count_seconds": counting,
                "images_per_second": train["train_images"] / seconds if seconds > 0 else float("nan"),
                "flops_theoretical": tr["flops_theoretical"] + tr["flops_mask"],
                "flops_executed": tr["flops_executed"] + tr["flops_mask"],
                "flops_mask": tr["flops_mask"],
                "flops_steps_theoretical": tr["flops_theoretical"],
                "flops_steps_executed": tr["flops_executed"],
                "best_val_acc": tr["best_val_acc"] if tr["best_val_acc"] >= 0 else float("nan"),
                "best_epoch": tr["best_epoch"],
                "test_acc_at_best": tr.get("test_acc_at_best", float("nan")),
                "train_seconds": tr["train_seconds"],
                "status": "completed" if done else "running",
            }
            if done:
                tr["status"] = "completed"
            tr["last_good"] = metrics
            self.log(_progress_line(metrics, self.cfg.train.epochs))
            yield metrics


def _progress_line(m: dict, total: int) -> str:
    parts = [f"epoch {m['epoch']}/{total}", f"loss {m['train_loss']:.4f}", f"train {m['train_acc']:.3f}"]
    if not math.isnan(m["val_acc"]):
        parts.append(f"val {m['val_acc']:.3f}")
    if not math.isnan(m["test_acc"]):
        parts.append(f"test {m['test_acc']:.3f}")
    parts += [f"lr {m['lr']:.4g}", f"{m['images_per_second']:.0f} img/s"]
    if m["mask_overlap"] is not None or m["mask_density"] != 1.0:
        parts.append(f"density {m['mask_density']:.3f}")
    return "  ".join(parts)


# -- checkpoint files -------------------------------------------------------------------------------
def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write atomically and durably: a temporary file in the same folder, fsync, rename."""
    atomic_write(path, lambda fh: torch.save(state, fh), fsync=True)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint with torch.load(weights_only=True): no code runs from the file."""
    return torch.load(path, map_location="cpu", weights_only=True)
