"""Data-parallel SSAM (ssam_tune/training/distributed.py) in real processes: 2 ranks on gloo (CPU),
spawned with torch.multiprocessing, against 1 process on the whole batch (float64, seeded).

The models have no BatchNorm: synchronised BatchNorm needs CUDA (see the module doc; the
SyncBatchNorm probe below checks that on CPU). Each spawned run has a deadline, and a rank
that fails ends its run with its traceback (test_failing_rank_fails_fast)."""

from __future__ import annotations

import contextlib
import copy
import os
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from ssam_tune import SAM, SSAM
from ssam_tune.method.fisher import fisher_scores
from ssam_tune.method.masks import random_mask, tensor_random_mask
from ssam_tune.training.distributed import (
    all_reduce_sums,
    average_gradients,
    fisher_scores_distributed,
    masks_identical,
    shard,
    world_size,
)

WORLD = 2
B, N_F, STEPS = 8, 9, 4  # global batch (4 per rank), Fisher samples (5 + 4: uneven), steps
SPARSITY = 0.5
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


# -- the harness ---------------------------------------------------------------------------------------
def _entry(rank: int, world: int, fn, out: str, kwargs: dict) -> None:
    """One rank: join the gloo group, run ``fn(rank, world, **kwargs)``, save its result.

    The ranks meet through a file store in the run's folder, not a TCP store: a TCP store
    lives in rank 0's process, and a rank 0 that finished and exited first while another
    rank was still tearing its group down made that rank abort ("terminate called without
    an active exception", SIGABRT; seen about once in 15 runs). A file needs no port either."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out, 'store')}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    try:
        result = fn(rank, world, **kwargs)
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    except BaseException:
        # Written before this rank leaves the group, so the root cause is on disk before
        # the other ranks' collectives fail with "connection reset".
        with open(os.path.join(out, f"rank{rank}.err"), "w") as fh:
            fh.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's teardown: about once in 15 runs of _mask_worker a rank
    # aborted *after* its result was saved and its group destroyed ("terminate called
    # without an active exception", no Python frame: a C++ thread still joinable at exit),
    # on either rank, with the TCP and the file store alike. The result is on disk already.
    os._exit(0)


def run_ranks(fn, out_dir, world: int = WORLD, timeout: float = 60.0, **kwargs) -> list:
    """Run ``fn`` on ``world`` spawned ranks; their results, by rank. A rank's exception
    ends the run (torch kills the other ranks) and fails here with every failed rank's
    traceback (the first to fail is the cause; the others' collectives then break); a run
    past ``timeout`` seconds is killed and fails."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "store").unlink(missing_ok=True)  # a store file is for one group only
    ctx = mp.start_processes(_entry, args=(world, fn, str(out_dir), kwargs), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{fn.__name__} on {world} ranks did not finish within {timeout:.0f} s")
    except Exception as exc:
        errors = sorted(out_dir.glob("rank*.err"))
        report = "".join(f"\n--- {e.stem} ---\n{e.read_text()}" for e in errors)
        raise RuntimeError(f"{fn.__name__} failed on {len(errors)} of {world} ranks:{report}") from exc
    finally:
        for p in ctx.processes:  # only the processes this run started
            if p.is_alive():
                p.kill()
            p.join(5)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(world)]


# -- model and data --------------------------------------------------------------------------------------
def mlp(seed: int = 0) -> nn.Module:
    """Six parameter tensors, float64, no BatchNorm; Tanh keeps the Fisher scores free of ties."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def batch(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)


def ssam(model: nn.Module, granularity: str = "element") -> SSAM:
    return SSAM(model.parameters(), torch.optim.SGD, rho=0.05, sparsity=SPARSITY,
                normalize="masked" if granularity == "tensor" else "full", granularity=granularity,
                tensor_score="total", lr=0.1, momentum=0.9, weight_decay=5e-4)


def clone_masks(opt: SSAM) -> list[torch.Tensor]:
    return [m.clone() for m in opt.masks()]


# -- code run on each rank (and, with world 1 and no process group, as the 1-worker reference) ----------
def _mask_worker(rank: int, world: int) -> dict:
    """Masks built on each rank from different data: Fisher over different shards, SSAM-D
    updates from different shards' gradients, random draws; each with a control that
    skips the step making them identical."""
    out: dict = {}
    gen = torch.Generator().manual_seed(1)
    xf, yf = batch(N_F, gen)
    x, y = batch(B, gen)
    xs, ys = shard(x, y, rank, world)
    xfs, yfs = shard(xf, yf, rank, world, even=False)
    for gran in ("element", "tensor"):
        model = mlp()
        opt = ssam(model, gran)
        params = list(model.parameters())
        # SSAM-F: each rank scores its own shard, the scores are summed (Eq. 5).
        scores = fisher_scores_distributed(model, None, xfs, yfs)
        opt.set_masks_from_scores(scores, params)
        out[f"fisher_{gran}"] = clone_masks(opt)
        out[f"fisher_{gran}_identical"] = masks_identical(opt.masks())
        out[f"fisher_{gran}_scores"] = scores
        opt.set_masks_from_scores(fisher_scores(model, None, xfs, yfs), params)  # control: own shard only
        out[f"fisher_{gran}_local_identical"] = masks_identical(opt.masks())
        # SSAM-D: a random start from the same seed, then an update from the averaged gradient at w.
        draw = tensor_random_mask if gran == "tensor" else random_mask
        for averaged in (True, False):  # False: the control, each rank's own gradient
            model.zero_grad()
            gen_mask = torch.Generator().manual_seed(2)
            opt.set_masks(draw(params, SPARSITY, generator=gen_mask))
            F.cross_entropy(model(xs), ys).backward()
            if averaged:
                average_gradients(params)
            opt.dynamic_update(1, 10, generator=gen_mask)
            key = f"dynamic_{gran}" + ("" if averaged else "_local")
            out[key] = clone_masks(opt)
            out[key + "_identical"] = masks_identical(opt.masks())
        # Random masks: the same seed on every rank; the control seeds from the rank.
        out[f"random_{gran}_identical"] = masks_identical(
            draw(params, SPARSITY, generator=torch.Generator().manual_seed(3)))
        out[f"random_{gran}_rank_seeded_identical"] = masks_identical(
            draw(params, SPARSITY, generator=torch.Generator().manual_seed(3 + rank)))
    out["none_identical"] = masks_identical(None)
    out["none_vs_masks_identical"] = masks_identical(None if rank == 0 else out["fisher_element"])
    # SyncBatchNorm on CPU: converting works; a training forward needs CUDA (module doc).
    bn = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4)).double())
    out["syncbn_converted"] = isinstance(bn[1], nn.SyncBatchNorm)
    try:
        bn.train()(xs)
        out["syncbn_train_error"] = ""
    except ValueError as exc:
        out["syncbn_train_error"] = str(exc)
    out["syncbn_eval_ok"] = bool(torch.isfinite(bn.eval()(xs)).all())
    return out


def _train_worker(rank: int, world: int, case: str) -> dict:
    """STEPS SAM/SSAM steps (momentum, weight decay) on this rank's shard of seeded global
    batches, as the module doc's recipe says. Cases: ``fisher_element`` (element SSAM-F,
    mask refreshed every step from N_F samples), ``fisher_tensor`` (tensor SSAM-F, masked
    normalisation, mask fixed, pass at w inside opt.first_pass()), ``dynamic_element``
    (SSAM-D: random start, updated every step from the averaged gradient), ``sam``."""
    model = mlp()
    params = list(model.parameters())
    if case == "sam":
        opt = SAM(params, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, weight_decay=5e-4)
    else:
        opt = ssam(model, "tensor" if case == "fisher_tensor" else "element")
    gen_data = torch.Generator().manual_seed(11)  # the global batches, the same on every rank
    gen_mask = torch.Generator().manual_seed(12)  # SSAM-D's stream, the same on every rank
    rec: dict = {"masks": [], "losses": [], "none_at_w": [], "identical": []}
    for step in range(STEPS):
        x, y = shard(*batch(B, gen_data), rank, world)
        xf, yf = batch(N_F, gen_data)
        if case == "fisher_element" or (case == "fisher_tensor" and step == 0):
            xf, yf = shard(xf, yf, rank, world, even=False)
            opt.set_masks_from_scores(fisher_scores_distributed(model, None, xf, yf), params)
        elif case == "dynamic_element" and step == 0:
            opt.set_masks(random_mask(params, SPARSITY, generator=gen_mask))
        update = case == "dynamic_element" and step > 0
        with opt.first_pass() if not update else contextlib.nullcontext():
            loss = F.cross_entropy(model(x), y)
            loss.backward()
        rec["none_at_w"].append(sum(p.grad is None for p in params))
        average_gradients(params)
        if update:
            opt.dynamic_update(step, STEPS, generator=gen_mask)
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        average_gradients(params)
        opt.second_step(zero_grad=True)
        # the global batch's mean loss at w: per-rank sums, summed
        rec["losses"].append(float(all_reduce_sums(loss.detach() * y.shape[0]) / B))
        if case != "sam":
            rec["masks"].append(clone_masks(opt))
            rec["identical"].append(masks_identical(opt.masks()))
    rec["params"] = [p.detach().clone() for p in params]
    rec["momentum"] = [opt.base_optimizer.state[p]["momentum_buffer"].clone() for p in params]
    return rec


def _train_all(rank: int, world: int) -> dict:
    return {case: _train_worker(rank, world, case) for case in CASES}


# eval_batch_size 1: every sample's float32 loss comes from the same kernels on the same shapes
# in every process, so the shares' float64 sums add up to the whole split's, to round-off
EVAL_CONFIG = {"seed": 3, "model": {"name": "resnet18", "width": 0.0625},
               "data": {"name": "embedded", "train_size": 64, "val_fraction": 0.1},
               "train": {"epochs": 1, "batch_size": 64, "eval_batch_size": 1, "device": "cpu"},
               "method": {"name": "sgd"}}


def _eval_worker(rank: int, world: int) -> dict:
    """The package's gathered evaluation: a Trainer inside the process group holds its rank's
    share of the validation split and ``Trainer.evaluate`` adds the sums over the ranks. On one
    worker, also the definition computed apart: the mean cross-entropy and the accuracy."""
    import dataclasses

    from ssam_tune.training.batches import iterate_batches
    from ssam_tune.training.config import config_from_dict
    from ssam_tune.training.trainer import Trainer, load_data

    cfg = config_from_dict(EVAL_CONFIG)
    data = load_data(cfg)
    data = dataclasses.replace(data, val=data.val.subset(torch.arange(11)))  # 6 + 5: sums need no even split
    trainer = Trainer(cfg, data=data, device="cpu")
    assert (trainer.rank, trainer.world) == (rank, world)
    loss, acc = trainer.evaluate(trainer.val_split)
    out = {"loss": loss, "acc": acc, "n": len(trainer.val_split)}
    if world == 1:
        model = trainer.model.eval()
        x, y = next(iter(iterate_batches(trainer.val_split, len(trainer.val_split))))
        with torch.no_grad():
            logits = [model(x[i:i + 1]).float() for i in range(len(y))]
        out["direct_loss"] = sum(F.cross_entropy(z, y[i:i + 1]).item() for i, z in enumerate(logits)) / len(y)
        out["direct_acc"] = sum(int(z.argmax(1).item() == y[i].item()) for i, z in enumerate(logits)) / len(y)
    return out


def _fail_worker(rank: int, world: int) -> dict:
    if rank == 1:
        raise RuntimeError("rank 1 fails on purpose")
    dist.barrier()  # rank 0 waits for a rank that never comes
    return {}


CASES = ("fisher_element", "fisher_tensor", "dynamic_element", "sam")


# -- tests -------------------------------------------------------------------------------------------------
def assert_close(a, b):
    torch.testing.assert_close(a, b, rtol=0.0, atol=1e-12)


@pytest.fixture(scope="module")
def mask_runs(tmp_path_factory):
    return run_ranks(_mask_worker, tmp_path_factory.mktemp("masks"))


@pytest.mark.parametrize("gran", ["element", "tensor"])
def test_fisher_masks_identical_and_equal_one_worker(mask_runs, gran):
    """SSAM-F: each rank scores a different shard; after the sum the masks are bitwise the
    same on both ranks, and the scores and mask are those of 1 worker on all N_F samples."""
    r0, r1 = mask_runs
    assert r0[f"fisher_{gran}_identical"] and r1[f"fisher_{gran}_identical"]
    for a, b in zip(r0[f"fisher_{gran}"], r1[f"fisher_{gran}"], strict=True):
        assert torch.equal(a, b)
    model = mlp()
    xf, yf = batch(N_F, torch.Generator().manual_seed(1))
    ref = fisher_scores(model, None, xf, yf)
    for a, b in zip(r0[f"fisher_{gran}_scores"], ref, strict=True):
        assert_close(a, b)
    opt = ssam(model, gran)
    opt.set_masks_from_scores(ref, list(model.parameters()))
    for a, b in zip(r0[f"fisher_{gran}"], opt.masks(), strict=True):
        assert torch.equal(a, b)
    if gran == "element":  # the control: each rank's own shard gives different masks
        assert not r0["fisher_element_local_identical"] and not r1["fisher_element_local_identical"]


@pytest.mark.parametrize("gran", ["element", "tensor"])
def test_dynamic_masks_identical_and_equal_one_worker(mask_runs, gran):
    """SSAM-D: the same seeded random start on each rank, then a drop-and-grow update from
    the averaged gradients at w: bitwise the same masks, equal to 1 worker's on the whole batch."""
    r0, r1 = mask_runs
    assert r0[f"dynamic_{gran}_identical"] and r1[f"dynamic_{gran}_identical"]
    gen = torch.Generator().manual_seed(1)
    batch(N_F, gen)
    x, y = batch(B, gen)
    model = mlp()
    opt = ssam(model, gran)
    params = list(model.parameters())
    gen_mask = torch.Generator().manual_seed(2)
    draw = tensor_random_mask if gran == "tensor" else random_mask
    opt.set_masks(draw(params, SPARSITY, generator=gen_mask))
    F.cross_entropy(model(x), y).backward()
    opt.dynamic_update(1, 10, generator=gen_mask)
    for a, b, c in zip(r0[f"dynamic_{gran}"], r1[f"dynamic_{gran}"], opt.masks(), strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    if gran == "element":  # the control: updates from each rank's own gradient differ
        assert not r0["dynamic_element_local_identical"]


@pytest.mark.parametrize("gran", ["element", "tensor"])
def test_random_masks_need_only_the_same_seed(mask_runs, gran):
    r0, r1 = mask_runs
    assert r0[f"random_{gran}_identical"] and r1[f"random_{gran}_identical"]
    if gran == "element":  # the control: a rank-dependent seed gives different masks
        assert not r0["random_element_rank_seeded_identical"]


def test_masks_identical_edge_cases_and_syncbn_probe(mask_runs):
    for r in mask_runs:
        assert r["none_identical"] and not r["none_vs_masks_identical"]
        assert r["syncbn_converted"] and r["syncbn_eval_ok"]
        # If this starts failing, torch runs SyncBatchNorm on CPU: update the module doc.
        assert "expected input tensor to be on GPU" in r["syncbn_train_error"]


def test_two_workers_equal_one_worker(tmp_path):
    """2 ranks with B/2 samples each == 1 process with B samples, to 1e-12 in float64, over
    STEPS steps with momentum and weight decay (model without BatchNorm); the ranks agree
    bit for bit."""
    ranks = run_ranks(_train_all, tmp_path)
    for case in CASES:
        ref = _train_worker(0, 1, case)  # no process group: the plain 1-worker loop
        r0, r1 = ranks[0][case], ranks[1][case]
        for key in ("params", "momentum"):
            for a, b, c in zip(r0[key], r1[key], ref[key], strict=True):
                assert torch.equal(a, b), (case, key)
                assert_close(a, c)
        assert_close(torch.tensor(r0["losses"]), torch.tensor(ref["losses"]))
        assert r0["identical"] == r1["identical"] == [True] * len(r0["masks"])
        for ma, mc in zip(r0["masks"], ref["masks"], strict=True):
            assert all(torch.equal(a, c) for a, c in zip(ma, mc, strict=True)), case
        assert r0["none_at_w"] == ref["none_at_w"]
        if case == "fisher_tensor":  # the pass at w skipped some tensors on every rank
            assert all(n > 0 for n in r0["none_at_w"]) and r0["none_at_w"] == r1["none_at_w"]
        else:
            assert r0["none_at_w"] == [0] * STEPS


def test_gathered_evaluation_equals_one_worker(tmp_path):
    """Trainer.evaluate on 2 ranks (each its share of the split, sums gathered) returns, on
    every rank, the whole split's figures: those of 1 worker, and the definition's."""
    ranks = run_ranks(_eval_worker, tmp_path / "two")
    (one,) = run_ranks(_eval_worker, tmp_path / "one", world=1)
    assert one["n"] == 11 and [r["n"] for r in ranks] == [6, 5]
    assert abs(one["loss"] - one["direct_loss"]) <= 1e-12 and one["acc"] == one["direct_acc"]
    for r in ranks:
        assert abs(r["loss"] - one["loss"]) <= 1e-12 and r["acc"] == one["acc"]


def test_failing_rank_fails_fast(tmp_path):
    """A rank's exception reaches the test with its message; the waiting rank is killed."""
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="(?s)--- rank1 ---.*rank 1 fails on purpose"):
        run_ranks(_fail_worker, tmp_path, timeout=45)
    assert time.monotonic() - start < 40


def test_shard_and_single_process_identity():
    x, y = torch.arange(7.0).unsqueeze(1), torch.arange(7)
    with pytest.raises(ValueError, match="train.batch_size must be a multiple"):
        shard(x, y, 0, 2)
    parts = [shard(x, y, r, 3, even=False) for r in range(3)]
    assert [p[0].shape[0] for p in parts] == [3, 2, 2]
    assert torch.equal(torch.cat([p[1] for p in parts]), y)
    xs, ys = shard(x[:6], y[:6], 1, 2)
    assert torch.equal(ys, torch.tensor([3, 4, 5]))
    with pytest.raises(ValueError, match="rank"):
        shard(x, y, 2, 2, even=False)
    # Without a process group the helpers are the 1-worker identity.
    assert world_size() == 1
    model = mlp()
    F.cross_entropy(model(torch.randn(4, 6, dtype=torch.float64)), torch.tensor([0, 1, 2, 0])).backward()
    before = [p.grad.clone() for p in model.parameters()]
    average_gradients(model.parameters())
    assert all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters(), strict=True))
    assert masks_identical(None) and torch.equal(all_reduce_sums(torch.ones(2)), torch.ones(2))
    empty = fisher_scores_distributed(model, None, x[:0].expand(0, 6).double(), y[:0])
    assert all(torch.count_nonzero(s) == 0 for s in empty)


def _syncbn_fisher_worker(rank: int, world: int) -> dict:
    """Fisher scores and FLOPs counts of a SyncBatchNorm model inside a process group, on the
    CPU: they need no other rank's statistics (each sample alone, running statistics, or
    shapes only), so they equal the plain BatchNorm model's and no collective runs (the
    group would need CUDA)."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 3)).double()
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain))
    x = torch.randn(5, 3, 6, 6, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
    y = torch.arange(5) % 3
    out = {}
    for bn in ("per_sample", "eval"):
        for method in ("layers", "vmap"):
            a = fisher_scores(plain, None, x, y, bn=bn, method=method)
            b = fisher_scores(synced, None, x, y, bn=bn, method=method)
            out[f"{bn}_{method}"] = all(torch.allclose(p, q, rtol=0, atol=1e-12) for p, q in zip(a, b, strict=True))
    # FLOPs of the pass at w as it runs (a meta-device copy in train mode): no collective either
    from ssam_tune.method.flops import backward_flops_per_tensor, forward_backward_flops

    frozen = ["0.weight", "0.bias"]
    out["flops"] = forward_backward_flops(synced, (3, 6, 6), frozen=frozen) == \
        forward_backward_flops(plain, (3, 6, 6), frozen=frozen)
    shape = (3, 6, 6)
    out["flops_per_tensor"] = backward_flops_per_tensor(synced, shape) == backward_flops_per_tensor(plain, shape)
    out["synced_kept"] = isinstance(synced[1], nn.SyncBatchNorm)
    return out


def test_fisher_scores_and_flops_of_a_syncbn_model_need_no_collective(tmp_path):
    for result in run_ranks(_syncbn_fisher_worker, tmp_path / "syncbn"):
        assert result == {"per_sample_layers": True, "per_sample_vmap": True, "eval_layers": True,
                          "eval_vmap": True, "flops": True, "flops_per_tensor": True, "synced_kept": True}, result
