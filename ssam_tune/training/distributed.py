"""Exact SSAM under data parallelism: small torch.distributed helpers (Mi et al., NeurIPS 2022).

A data-parallel SAM/SSAM step on W workers is the 1-worker step on the global batch when
every rank holds the same weights, masks and optimizer state and both passes see the
gradient of the global mean loss. With ``B % W == 0`` (:func:`shard`), the mean of the W
per-rank mean losses is the global mean loss, so averaging gradients gives its gradient::

    x, y = shard(X, Y, rank, world)              # B / W samples of the global batch X, Y
    with opt.first_pass():                       # tensor masks: skipped grads stay None
        loss_fn(model(x), y).backward()
    average_gradients(model.parameters())        # g of Eq. 2 is the global-batch gradient
    # SSAM-D update steps only: opt.dynamic_update(...), which reads that averaged g (Eq. 7)
    opt.first_step(zero_grad=True)               # the same e * m on every rank
    loss_fn(model(x), y).backward()
    average_gradients(model.parameters())        # the gradient at w + e, global batch
    opt.second_step(zero_grad=True)              # the same base-optimizer step everywhere

"Exact" means equal up to floating-point round-off (sums taken in another order):
tests/test_distributed.py checks 2 workers against 1 worker to 1e-12 in float64, and the
ranks against each other bit for bit.

Masks must be bitwise identical on every rank, or the ranks' weights drift apart:

- SSAM-F: :func:`fisher_scores_distributed`. Every rank draws the same N_F samples (the
  same seeded generator), scores its own share (:func:`shard` with ``even=False``), and
  the scores are summed over ranks, so Eq. 5's sum over samples is exactly the 1-worker sum
  over the union of the shards and every rank takes Eq. 6's top-k of the same numbers.
- SSAM-D and random masks need no communication: ``random_mask``, ``tensor_random_mask``
  and the dynamic updates draw from a torch.Generator, and every rank seeds it identically
  (the Trainer seeds its mask stream from ``config.seed``, never from the rank) and makes
  the same draws in the same order. A dynamic update reads the gradients at w (Eq. 7),
  which must be averaged first.
- :func:`masks_identical` checks it (tests, or an optional debug check).

BatchNorm: without synchronisation each rank normalises with its shard's batch statistics
and keeps its own running statistics, so a BatchNorm model's data-parallel step is not the
1-worker step. ``torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)`` converts on the
CPU, but (torch 2.14) a training-mode forward with an initialised process group raises
``ValueError: SyncBatchNorm expected input tensor to be on GPU ...`` on CPU tensors: synced
BatchNorm needs CUDA (NCCL); eval-mode forwards run. (The per-layer Fisher path in
:mod:`ssam_tune.method.fisher` does not know SyncBatchNorm and falls back to torch.func.) The
equivalence tests therefore use models without BatchNorm. Fisher scores with
``bn="per_sample"`` (the default) have no cross-sample dependence, so their sum over shards
stays exact; ``bn="eval"`` reads running statistics, which must then be the same on every
rank.

Without an initialised process group, or with one rank, every helper is the 1-worker
identity, so a training loop may call them unconditionally. Collectives run on the tensors'
device (CPU tensors for gloo, CUDA tensors for NCCL); importing this module has no side
effects.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ssam_tune.method.fisher import fisher_scores

__all__ = [
    "all_reduce_sums", "average_buffers", "average_gradients", "fisher_scores_distributed", "masks_identical",
    "rank", "shard", "share", "world_size",
]


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """The number of ranks in ``group``; 1 when no process group is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def rank(group: dist.ProcessGroup | None = None) -> int:
    """This process's rank in ``group``; 0 when no process group is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank(group)


def _all_reduce_coalesced_(tensors: Sequence[torch.Tensor], group: dist.ProcessGroup | None,
                           average: bool) -> None:
    """Sum (or average) ``tensors`` over ranks in place: one flat buffer and one all_reduce
    per (dtype, device), in first-seen order, so every rank issues the same collectives
    when it passes the same tensor shapes in the same order."""
    world = world_size(group)
    if world == 1:
        return
    buckets: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        if t.is_sparse:
            raise ValueError("sparse gradients are not supported: all-reduce dense tensors only")
        buckets.setdefault((t.dtype, t.device), []).append(t)
    for bucket in buckets.values():
        flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        if average:
            flat.div_(world)
        for t, v in zip(bucket, flat.split([t.numel() for t in bucket]), strict=True):
            t.copy_(v.view_as(t))


@torch.no_grad()
def average_gradients(params: Iterable[torch.Tensor], group: dist.ProcessGroup | None = None) -> None:
    """Replace each ``.grad`` by its mean over ranks (call after BOTH passes of a step).

    After the pass at w this makes g, and so e = rho g / ||g|| (Eq. 2) and its mask, the
    global batch's on every rank; after the pass at w + e, the base optimizer's step.
    Parameters whose grad is None (frozen, unused, or skipped by ``SSAM.first_pass``) are
    left out; which ones they are must be the same on every rank, as it is when the masks
    are identical. Coalesced: one all_reduce per gradient dtype and device.
    """
    grads = [p.grad for p in params if p.grad is not None]
    _all_reduce_coalesced_(grads, group, average=True)


def fisher_scores_distributed(model: nn.Module, loss_fn: Callable | None, inputs: torch.Tensor,
                              targets: torch.Tensor, *, group: dist.ProcessGroup | None = None,
                              **fisher_kwargs) -> list[torch.Tensor]:
    """SSAM-F's empirical Fisher (Eq. 5) over the union of the ranks' shards of N_F samples.

    Each rank passes its own share of the N_F samples (:func:`shard` with ``even=False``;
    a share may be empty); :func:`ssam_tune.method.fisher.fisher_scores` scores it and the scores
    are summed over ranks (all_reduce SUM). Eq. 5 is a sum over samples of squared
    per-sample gradients, so the result is exactly the 1-worker sum over the union of the
    shards (up to summation order), identical on every rank, and the top-k of Eq. 6
    (``SSAM.set_masks_from_scores``) picks the same mask everywhere. ``fisher_kwargs`` go to
    ``fisher_scores`` (``bn``, ``chunk_size``, ``method``). One tensor per
    ``model.parameters()`` entry.
    """
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(f"need one target per input, got {inputs.shape[0]} inputs and {targets.shape[0]} targets")
    if inputs.shape[0] == 0:  # more ranks than samples: this rank adds nothing to the sum
        scores = [torch.zeros_like(p, memory_format=torch.contiguous_format) for p in model.parameters()]
    else:
        scores = fisher_scores(model, loss_fn, inputs, targets, **fisher_kwargs)
    _all_reduce_coalesced_(scores, group, average=False)
    return scores


def shard(x: torch.Tensor, y: torch.Tensor, rank: int, world: int, *,
          even: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s contiguous slice of a global batch (views, no copy).

    Shard sizes differ by at most one, the first ``B % world`` ranks taking one more. With
    ``even=True`` (training batches) ``B`` must be a multiple of ``world``: only equal
    shards make the mean of the per-rank mean losses, and so the averaged gradient, the
    1-worker mean over the global batch. ``even=False`` suits sums (Fisher scores,
    evaluation sums), which are exact whatever the split.
    """
    n = x.shape[0]
    if y.shape[0] != n:
        raise ValueError(f"x and y must hold the same number of samples, got {n} and {y.shape[0]}")
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
    if even and n % world:
        raise ValueError(
            f"a batch of {n} samples does not split evenly over {world} workers: train.batch_size "
            f"must be a multiple of the number of workers (got train.batch_size={n}, workers={world}), "
            "or the mean of the workers' mean losses is not the mean loss of the batch")
    index = share(n, rank, world)
    return x[index.start:index.stop], y[index.start:index.stop]


def share(n: int, rank: int, world: int) -> range:
    """The indices ``shard`` gives rank ``rank`` of ``n`` samples (uneven: the first
    ``n % world`` ranks take one more); for data sets sliced by index (evaluation splits)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


@torch.no_grad()
def average_buffers(module: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Replace each floating-point buffer (BatchNorm running statistics) by its mean over
    ranks. Without SyncBatchNorm every rank updates its running statistics from its own
    shard; averaging them once per epoch, before evaluation and the checkpoint, keeps the
    replicas identical, so the checkpoint rank 0 writes is every rank's state. Integer
    buffers (``num_batches_tracked``) advance alike on every rank and are left alone."""
    _all_reduce_coalesced_([b for b in module.buffers() if b.is_floating_point()], group, average=True)


def all_reduce_sums(sums: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum a tensor of per-rank sums over ranks, in place, and return it (gathered
    evaluation, ``Trainer.evaluate``: loss sum, correct count and sample count of each rank's
    share)."""
    if world_size(group) > 1:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    return sums


def _comm_device(masks: Sequence[torch.Tensor] | None, group: dist.ProcessGroup | None) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return masks[0].device if masks else torch.device("cpu")


@torch.no_grad()
def masks_identical(masks: Sequence[torch.Tensor] | None, group: dist.ProcessGroup | None = None) -> bool:
    """Whether every rank holds bitwise the same masks (``SSAM.masks()``; None counts as
    "no masks"), the same answer on every rank. Compares the tensor count, the total size
    and the flattened contents against the group's first rank (one all_gather of a
    header, one broadcast of d bytes, one all_reduce): a debug check, not for every step."""
    world = world_size(group)
    if world == 1:
        return True
    device = _comm_device(masks, group)
    flat = (torch.cat([m.reshape(-1).to(device=device, dtype=torch.uint8) for m in masks]) if masks
            else torch.zeros(0, dtype=torch.uint8, device=device))
    header = torch.tensor([-1 if masks is None else len(masks), flat.numel()], dtype=torch.int64, device=device)
    headers = [torch.empty_like(header) for _ in range(world)]
    dist.all_gather(headers, header, group=group)
    if any(not torch.equal(h, headers[0]) for h in headers):
        return False  # every rank saw the same headers, so every rank returns False
    if flat.numel() == 0:
        return True
    first = flat.clone()
    dist.broadcast(first, src=0 if group is None else dist.get_global_rank(group, 0), group=group)
    same = torch.tensor([int(torch.equal(first, flat))], dtype=torch.int64, device=device)
    dist.all_reduce(same, op=dist.ReduceOp.MIN, group=group)
    return bool(same.item())
