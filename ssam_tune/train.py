"""One training run of SGD, SAM or SSAM (``python -m ssam_tune.train CONFIG.yaml``: see
:mod:`ssam_tune.train_cli`).

:class:`Trainer` knows nothing of Ray: it takes a :class:`~ssam_tune.config.Config` (and,
to resume, a checkpoint dict) and yields one metrics dict per epoch. Everything random
(initialisation, data order, augmentation, masks, Fisher samples) comes from generators
seeded from ``config.seed`` and saved in every checkpoint, so a run resumed from epoch k in
a fresh process reproduces the uninterrupted run's non-timing metrics bit for bit on CPU.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ssam_tune import masks as M
from ssam_tune.batches import iterate_batches, sample_for_fisher
from ssam_tune.config import Config, ConfigError, config_to_dict
from ssam_tune.data import Data, Split, load_dataset, make_dataloader
from ssam_tune.experiment import atomic_write
from ssam_tune.flops import FlopsModel
from ssam_tune.methods import method
from ssam_tune.models import build_model
from ssam_tune.optim import SAM, SSAM, freeze_bn_stats

__all__ = ["Trainer", "load_checkpoint", "load_data", "save_checkpoint"]

CHECKPOINT_FORMAT = 1
# Offsets of the independent random streams derived from config.seed.
_STREAMS = {"init": 0, "order": 1, "augment": 2, "mask": 3, "fisher": 4}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("train.device", f"{name!r} requested but CUDA is not available; use auto or cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError("train.device", f"must be auto, cpu, cuda or cuda:N, got {name!r}") from None


def load_data(cfg: Config) -> Data:
    """Load the configured data set with its seeded validation split."""
    d = cfg.data
    augment = None if d.augment in (None, "none") else d.augment
    return load_dataset(d.name, root=d.root, download=d.download, val_fraction=d.val_fraction,
                        seed=cfg.seed, augment=augment, label_noise=d.label_noise)


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
        self.spec = method(cfg.method.name)  # the method's row: optimizer, mask kind, cost rule
        self.method = self.spec.name
        self.sparse = self.spec.sparse
        self._set_device(device)
        self._place_data(data if data is not None else load_data(cfg))
        self._build_model()
        self._make_generators()
        self._build_optimizer()
        self._build_schedules()
        self.epoch = 0  # completed epochs
        self.global_step = 0
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
            self.val_split = data.val.to(self.device)
            self.test_split = data.test.to(self.device)
        else:
            self.train_split, self.val_split, self.test_split = data.train, data.val, data.test

    def _build_model(self) -> None:
        """The model from the init stream (paired seeds: the same init across methods), and
        its measured per-sample FLOPs."""
        m, data = self.cfg.model, self.data
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed + _STREAMS["init"])
            kw = {"depth": m.depth, "widen_factor": m.widen_factor} if m.name == "wrn28_10" else {}
            self.model = build_model(m.name, data.num_classes, width=m.width, input_size=data.image_size, **kw)
        input_shape = (3, data.image_size, data.image_size)
        self.flops = FlopsModel.from_model(self.model, input_shape, self.cfg.train.batch_size)
        self.model.to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.n_params = sum(p.numel() for p in self.model.parameters())

    def _make_generators(self) -> None:
        """One seeded generator per random stream; all of them are saved in checkpoints."""
        seed = self.cfg.seed
        gen_dev = self.device if self.device.type == "cuda" else torch.device("cpu")
        self.gens = {name: torch.Generator(device=gen_dev).manual_seed(seed + _STREAMS[name])
                     for name in ("order", "augment", "mask", "fisher")}
        self.dl_gen = torch.Generator().manual_seed(seed + _STREAMS["order"])  # ImageFolder path

    def _build_optimizer(self) -> None:
        """SGD, SAM or SSAM around SGD, as the method's cost rule says (methods.py)."""
        t, meth = self.cfg.train, self.cfg.method
        base = dict(lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, nesterov=t.nesterov)
        params = self.model.parameters()
        if not self.spec.perturbs:
            self.opt = torch.optim.SGD(params, **base)
        elif not self.spec.sparse:
            self.opt = SAM(params, torch.optim.SGD, rho=meth.rho, **base)
        else:
            self.opt = SSAM(params, torch.optim.SGD, rho=meth.rho, sparsity=meth.sparsity,
                            normalize=meth.normalize, **base)

    def _build_schedules(self) -> None:
        """The mask refresh schedule (Alg. 1, T_m), the LR schedule and the loss."""
        t, meth = self.cfg.train, self.cfg.method
        self.schedule = M.MaskSchedule(interval=meth.T_m, unit=meth.mask_unit, fixed=meth.fixed_mask)
        self.steps_per_epoch = self._steps_per_epoch()
        total = t.epochs * self.steps_per_epoch
        self.sched = torch.optim.lr_scheduler.LambdaLR(
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
            "scheduler": self.sched.state_dict(),
            "rng": {name: g.get_state() for name, g in self.gens.items()} | {
                "dataloader": self.dl_gen.get_state(), "torch": torch.get_rng_state()},
            "tracker": dict(self.tracker),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"unknown checkpoint format {state.get('format')!r}")
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        for name, g in self.gens.items():
            g.set_state(state["rng"][name])
        self.dl_gen.set_state(state["rng"]["dataloader"])
        torch.set_rng_state(state["rng"]["torch"])
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.tracker = dict(state["tracker"])

    # -- masks -------------------------------------------------------------------------------
    def _fisher_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.cfg.method.N_F
        if isinstance(self.train_split, Split):
            return sample_for_fisher(self.train_split, n, self.gens["fisher"])
        # ImageFolder: the same files with the evaluation transform (no augmentation).
        subset = self.train_split
        base = getattr(self.data.val, "dataset", None)
        perm = torch.randperm(len(subset), generator=self.gens["fisher"], device=self.gens["fisher"].device)[:n]
        items = [(base or subset.dataset)[subset.indices[int(i)]] for i in perm.cpu()]
        x = torch.stack([it[0] for it in items]).to(self.device)
        y = torch.tensor([it[1] for it in items], device=self.device)
        return x, y

    def _refresh_mask(self, before_grad: bool) -> None:
        """Build the next mask; Fisher and random masks before the step's forward pass,
        dynamic updates after it (they read the gradient at w, Eq. 7)."""
        kind = self.spec.mask
        meth = self.cfg.method
        opt: SSAM = self.opt  # type: ignore[assignment]
        previous = opt.masks()
        params = opt.params()
        if kind == "fisher" and before_grad:
            x, y = self._fisher_batch()
            scores = M.fisher_scores(self.model, None, x, y, bn=meth.fisher_bn)  # model.parameters() order
            opt.set_masks_from_scores(scores, list(self.model.parameters()))
        elif kind == "random" and before_grad:
            opt.set_masks(M.random_mask(params, meth.sparsity, generator=self.gens["mask"]))
        elif kind == "dynamic" and before_grad:  # the initial mask of SSAM-D is random
            opt.set_masks(M.random_mask(params, meth.sparsity, generator=self.gens["mask"]))
        elif kind == "dynamic":
            opt.dynamic_update(self.epoch, self.cfg.train.epochs, alpha=meth.alpha, strategy=meth.drop,
                               generator=self.gens["mask"])
        else:
            return
        stats = M.mask_stats(opt.masks(), previous)
        self.tracker["refreshes"] += 1
        self.tracker["last_density"] = stats["density"]
        self.tracker["last_overlap"] = stats["overlap"]
        self.tracker["flops_mask"] += self.flops.mask_update_flops(
            self.method, n_params=self.n_params, fisher_samples=min(meth.N_F, len(self.train_split)))

    # -- one epoch ---------------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _train_batches(self):
        t = self.cfg.train
        if isinstance(self.train_split, Split):
            augment = self.data.augment == "cifar" and self.cfg.data.augment != "none"
            return iterate_batches(self.train_split, t.batch_size, shuffle=True, generator=self.gens["order"],
                                   augment=augment, drop_last=self._drop_last(), cutout=self.cfg.data.cutout,
                                   channels_last=self.channels_last)
        return make_dataloader(self.train_split, t.batch_size, shuffle=True, generator=self.dl_gen,
                               num_workers=self.cfg.data.num_workers, drop_last=self._drop_last(),
                               pin_memory=self.device.type == "cuda")

    def _to_device(self, x, y):
        x = x.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.device, non_blocking=True)

    def _loss(self, x, y):
        with self._autocast():
            logits = self.model(x)
            return self.criterion(logits.float(), y), logits

    def _train_epoch(self) -> dict | None:
        """One epoch; returns train metrics, or None if the loss became NaN/inf."""
        model, opt, meth = self.model, self.opt, self.cfg.method
        model.train()
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.int64)
        e_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        seen, steps = 0, 0
        for step, (x, y) in enumerate(self._train_batches()):
            if step >= self.steps_per_epoch:
                break
            x, y = self._to_device(x, y)
            refresh = self.sparse and self.schedule.due(self.epoch, step, self.global_step)
            # Fisher/random masks and SSAM-D's initial random mask come before the forward
            # pass, so the very first step is already sparse. (The reference starts from an
            # all-zero mask and builds its first one after step 0, so only its step 0 is
            # unperturbed, i.e. plain SGD.)
            dynamic_update = refresh and self.spec.mask == "dynamic" and self.global_step > 0
            if refresh and not dynamic_update:
                self._refresh_mask(before_grad=True)
            loss, logits = self._loss(x, y)
            nan_at = self.cfg.train.inject_nan_at_step
            if nan_at is not None and self.global_step >= nan_at:
                loss = loss * float("nan")  # fault injection (config.TrainConfig.inject_nan_at_step)
            loss.backward()
            if not self.spec.perturbs:
                opt.step()
                opt.zero_grad(set_to_none=True)
            else:
                if dynamic_update:  # drop by |g| at w from this minibatch (Eq. 7)
                    self._refresh_mask(before_grad=False)
                opt.first_step(zero_grad=True)
                guard = freeze_bn_stats(model) if meth.bn_second_pass == "freeze" else contextlib.nullcontext()
                with guard:
                    self._loss(x, y)[0].backward()
                opt.second_step(zero_grad=True)
                if opt.last_e_norm is not None:
                    e_sum += opt.last_e_norm
            self.sched.step()
            n = y.shape[0]
            loss_sum += loss.detach().double() * n
            correct += (logits.detach().argmax(1) == y).sum()
            seen += n
            steps += 1
            self.global_step += 1
            if steps % 25 == 0 and not torch.isfinite(loss_sum):
                return None
        if seen == 0 or not torch.isfinite(loss_sum):
            return None
        self.tracker["images"] += seen
        spent = self.flops.training_flops(self.method, steps, images=seen,
                                          sparsity=meth.sparsity if self.sparse else 0.0)
        self.tracker["flops_theoretical"] += spent["theoretical"]
        self.tracker["flops_executed"] += spent["executed"]
        return {"train_loss": loss_sum.item() / seen, "train_acc": correct.item() / seen,
                "e_norm": e_sum.item() / steps if self.spec.perturbs else 0.0, "train_images": seen}

    @torch.no_grad()
    def evaluate(self, split) -> tuple[float, float]:
        """(loss, accuracy) on a split; (nan, nan) for an empty one."""
        if split is None or len(split) == 0:
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
                logits = self.model(x).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
            correct += (logits.argmax(1) == y).sum()
            n += y.shape[0]
        return loss_sum.item() / n, correct.item() / n

    # -- the run ---------------------------------------------------------------------------------
    def epochs(self) -> Iterator[dict]:
        """Train the remaining epochs, yielding metrics after each; stops on divergence."""
        while self.epoch < self.cfg.train.epochs and self.tracker["status"] == "running":
            lr = self.opt.param_groups[0]["lr"]
            start = time.perf_counter()
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
            seconds = time.perf_counter() - start
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
                "mask_density": tr["last_density"] if self.sparse else 1.0,
                "mask_overlap": tr["last_overlap"] if self.sparse else None,
                "mask_refreshes": tr["refreshes"],
                "e_norm": train["e_norm"],
                "epoch_seconds": seconds,
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


if __name__ == "__main__":  # python -m ssam_tune.train: the command line lives in train_cli.py
    from ssam_tune.train_cli import main

    main()
