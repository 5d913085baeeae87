"""Data-parallel trials through the real Ray Train (TorchTrainer, gloo, 2 CPU workers).

1. Ray Train runs the data-parallel SSAM code of tests/test_distributed.py (float64, models
   without BatchNorm, so 2 workers on B/2 each equal 1 worker on B): masks are bit-identical
   across the workers, and 4 steps match the 1-process run to 1e-12.
2. The product's trainer in a Ray Train run (float32, a BatchNorm-free stand-in model patched
   in on each worker): SAM and random-mask SSAM match the 1-worker Trainer; SSAM-F's masks
   are the same on both workers (the Trainer also checks that itself every epoch).
3. Searches from a YAML with ``tune.resources.workers: 2`` (the CLI, a local Ray with its
   dashboard): a search with early stopping completes, frees the stopped trial's workers
   and exports; a worker SIGKILLed mid-epoch (``train.inject_kill_at_step``) is restored
   from the last checkpoint and the trial ends bit-equal to an uninterrupted twin, whose
   reported validation accuracy is that of its checkpoint evaluated by one worker on the
   whole split.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from _helpers import WAIT, fast_space, read_rows, reports, run_module, steps_per_epoch, wait_for, write_yaml
from _trivial import worker_pythonpath

WORKERS = 2


# -- 1-2. Ray Train directly ---------------------------------------------------------------------
@pytest.fixture(scope="class")
def ray_local():
    """A local Ray for the Ray Train runs (class TestRayTrain), shut down before the search tests:
    they start their own, and two local instances on one machine make Ray's state API (by
    which Ray Train frees stopped trials' workers) refuse to guess which one it serves."""
    import ray

    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = worker_pythonpath(os.environ)  # workers import the test modules
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


# Every worker function the Ray Train tests compare, run in ONE Ray Train run of 2 workers
# (a run's start-up, ~10 s, dominates each): name -> (module, function, kwargs).
JOBS = {"masks": ("test_distributed", "_mask_worker", {}),
        "train": ("test_distributed", "_train_all", {}),
        **{f"trainer_{m}": ("test_parallel", "_trainer_worker", {"method": m})
           for m in ("sam", "ssam_random", "ssam_f")}}


@pytest.fixture(scope="class")
def ray_train_results(ray_local, tmp_path_factory) -> dict:
    """name -> [rank 0's result, rank 1's result] for every job of :data:`JOBS`."""
    return run_ray_train(JOBS, tmp_path_factory.mktemp("ray_train"))


def _ray_entry(config: dict) -> None:
    """One Ray Train worker: run ``module.fn(rank, world, **kwargs)`` for every job, one after
    the other in the same process group, and save each result."""
    import importlib

    import ray.train

    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    for name, (module, fn, kwargs) in config["jobs"].items():
        result = getattr(importlib.import_module(module), fn)(rank, world, **kwargs)
        torch.save(result, os.path.join(config["out"], f"{name}_rank{rank}.pt"))


def run_ray_train(jobs: dict, out: Path) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out.mkdir(parents=True, exist_ok=True)
    TorchTrainer(_ray_entry, train_loop_config={"jobs": jobs, "out": str(out)},
                 scaling_config=ScalingConfig(num_workers=WORKERS, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(name=out.name, storage_path=str(out.parent / "train"))).fit()
    return {name: [torch.load(out / f"{name}_rank{r}.pt", weights_only=True) for r in range(WORKERS)]
            for name in jobs}


def _close(a, b, atol):
    torch.testing.assert_close(a, b, rtol=0.0, atol=atol)


def _stand_in(name, num_classes, *, width=1.0, input_size=32, **kw):
    """A BatchNorm-free conv net, so that 2 workers' batches equal 1 worker's batch."""
    from torch import nn

    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, num_classes))


def _trainer_config(method: str) -> dict:
    return {"seed": 3, "model": {"name": "resnet18", "width": 0.0625},
            "data": {"name": "embedded", "train_size": 256, "val_fraction": 0.1},
            "train": {"epochs": 2, "batch_size": 64, "eval_batch_size": 100, "lr": 0.05},
            "method": {"name": method, "rho": 0.05, "sparsity": 0.5, "N_F": 16}}


def _trainer_worker(rank: int, world: int, method: str) -> dict:
    """The product's Trainer on the stand-in model: per-epoch metrics, final params, masks."""
    import ssam_tune.training.trainer as T
    from ssam_tune.training.config import config_from_dict

    original, T.build_model = T.build_model, _stand_in  # the test process (1 worker) gets it back
    try:
        trainer = T.Trainer(config_from_dict(_trainer_config(method)), device="cpu")
    finally:
        T.build_model = original
    assert (trainer.rank, trainer.world) == (rank, world)
    metrics = list(trainer.epochs())
    return {"metrics": [{k: m[k] for k in ("train_loss", "val_loss", "val_acc", "test_loss")} for m in metrics],
            "params": [p.detach().clone() for p in trainer.model.parameters()],
            "masks": [m.clone() for m in trainer.opt.masks()] if trainer.sparse else []}


class TestRayTrain:
    """The Ray Train runs: one Ray and one 2-worker run for the class (see JOBS)."""

    def test_masks_bit_identical_across_ray_train_workers(self, ray_train_results):
        r0, r1 = ray_train_results["masks"]
        for gran in ("element", "tensor"):
            for kind in ("fisher", "dynamic"):
                key = f"{kind}_{gran}"
                assert r0[f"{key}_identical"] and r1[f"{key}_identical"], key
                assert all(torch.equal(a, b) for a, b in zip(r0[key], r1[key], strict=True)), key
                assert not r0[f"{key}_local_identical"], f"{key}: the control (no sum/average) should differ"
            assert r0[f"random_{gran}_identical"] and not r0[f"random_{gran}_rank_seeded_identical"]

    def test_two_ray_train_workers_equal_one_worker(self, ray_train_results):
        """4 SAM/SSAM steps (momentum, weight decay) on 2 workers with B/2 each vs 1 process on B."""
        import test_distributed as td

        ranks = ray_train_results["train"]
        ref = td._train_all(0, 1)
        for case in td.CASES:
            a, b = ranks[0][case], ranks[1][case]
            for p0, p1, pr in zip(a["params"], b["params"], ref[case]["params"], strict=True):
                assert torch.equal(p0, p1), case  # the replicas are bitwise the same
                _close(p0, pr, 1e-12)
            for m0, mr in zip(a["momentum"], ref[case]["momentum"], strict=True):
                _close(m0, mr, 1e-12)
            _close(torch.tensor(a["losses"]), torch.tensor(ref[case]["losses"]), 1e-12)
            for step_masks, ref_masks in zip(a["masks"], ref[case]["masks"], strict=True):
                assert all(torch.equal(x, y) for x, y in zip(step_masks, ref_masks, strict=True)), case

    @pytest.mark.parametrize("method", ["sam", "ssam_random", "ssam_f"])
    def test_trainer_on_two_ray_train_workers_equals_one(self, ray_train_results, method):
        """float32, so up to round-off; Fisher masks (ssam_f) are compared across the workers
        only: a float32 tie at the top-k boundary could differ from the 1-worker sum."""
        r0, r1 = ray_train_results[f"trainer_{method}"]
        assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"], strict=True))
        assert all(torch.equal(a, b) for a, b in zip(r0["masks"], r1["masks"], strict=True))
        assert r0["metrics"] == r1["metrics"]  # gathered: every worker reports the whole splits
        if method == "ssam_f":
            return
        one = _trainer_worker(0, 1, method)
        for a, b in zip(r0["params"], one["params"], strict=True):
            _close(a, b, 1e-4)
        for a, b in zip(r0["masks"], one["masks"], strict=True):
            assert torch.equal(a, b)
        for ma, mb in zip(r0["metrics"], one["metrics"], strict=True):
            for key in ma:
                assert abs(ma[key] - mb[key]) <= 1e-4 + 0.01 * (key == "val_acc"), (key, ma[key], mb[key])


# -- 3. searches from a YAML ------------------------------------------------------------------------
def _space(name: str, **tune) -> dict:
    space = fast_space()
    space["name"] = name
    space["train"]["epochs"] = 3
    space["tune"].update({"resources": {"workers": WORKERS, "cpu": 1}, **tune})
    space["tune"].pop("max_concurrent_trials")  # auto: as many as fit (one trial on 2 CPUs)
    return space


def _own_ray() -> dict:
    """The environment for a search CLI: without the RAY_ADDRESS that this module's Ray set,
    so the CLI starts its own local Ray (with its dashboard) as a user's would."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def _run(tmp_path: Path, space: dict) -> str:
    path = write_yaml(tmp_path / f"{space['name']}.yaml", space)
    r = run_module("ssam_tune.run", str(path), "--storage", str(tmp_path / "ray"), "--results", str(tmp_path),
                   cwd=tmp_path, timeout=WAIT, env=_own_ray())
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    return out


# A driver whose Tune stops every sampled trial at epoch 2 of 3: the same stop (Tune removes
# the trial's actor) as a scheduler's, at a known epoch, whatever the accuracies.
_STOPPING_DRIVER = """
import sys
from ssam_tune.run import run_search
from ssam_tune.tuning.space import load_space

def stop(trial_id, result):
    return result.get("label", "").startswith("optuna") and result.get("epoch", 0) >= 2

run_search(load_space(sys.argv[1]), storage=sys.argv[2], resume=False, results=sys.argv[3], stop=stop)
"""


def test_two_worker_search_stops_early_frees_workers_and_exports(tmp_path):
    space = _space("dp-search", num_samples=2, n_startup_trials=1, baselines=["sgd"])
    path = write_yaml(tmp_path / "dp-search.yaml", space)
    (tmp_path / "driver.py").write_text(_STOPPING_DRIVER)
    r = run_module("driver", str(path), str(tmp_path / "ray"), str(tmp_path), cwd=tmp_path, timeout=WAIT,
                   env=_own_ray())
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    rows = read_rows(tmp_path / "dp-search" / "trials.csv")
    status = {r["label"]: (r["status"], int(r["epochs_reached"])) for r in rows}
    first, second = sorted((label for label in status if label.startswith("optuna")), key=lambda x: int(x[6:]))
    # stopped by the driver at epoch 2, or by MO-ASHA's rung at epoch 1 (the fast space's
    # grace period), depending on what TPE sampled: either way Tune stopped the trial
    assert status["sgd"] == ("completed", 3) and len(status) == 3, status
    assert status[first] in (("pruned", 1), ("pruned", 2)) and status[second] in (("pruned", 1), ("pruned", 2)), \
        status
    exp = tmp_path / "ray" / "dp-search"
    runs = {reps[-1]["label"]: reps for reps in (reports(d) for d in exp.glob("trial_*"))}
    for label, reps in runs.items():  # one result per epoch (rank 0's), not one per worker
        assert [r["epoch"] for r in reps] == list(range(1, len(reps) + 1)), (label, reps)
        assert all(r["workers"] == WORKERS for r in reps), label
    # One trial at a time fits on 2 CPUs, so the second sampled trial ran on the workers' CPUs
    # that Ray Train freed when Tune stopped the first (held, the search would wait for ever).
    assert runs[second][0]["timestamp"] >= runs[first][-1]["timestamp"]
    for name in ("pareto.csv", "summary.md", "best_config.yaml"):
        assert (tmp_path / "dp-search" / name).is_file(), name
    assert wait_for(lambda: "RayTrainWorker" not in os.popen("ps -eo args").read(), timeout=60)


def test_worker_killed_mid_epoch_resumes_bit_exact(tmp_path):
    spe = steps_per_epoch(fast_space()["data"]["train_size"], fast_space()["train"]["batch_size"])
    space = _space("dp-kill", scheduler="none")
    space.pop("search")
    space["method"] = {"name": "ssam_f", "rho": 0.1, "N_F": 16}
    space["cases"] = [{"label": "twin"}, {"label": "victim", "train": {"inject_kill_at_step": spe + spe // 2}}]
    out = _run(tmp_path, space)
    assert "2 data-parallel workers" in out  # the run's header names the resources
    exp = tmp_path / "ray" / "dp-kill"
    last = {}
    for d in exp.glob("trial_*"):
        reps = reports(d)
        last[reps[-1]["label"].split("/")[0]] = (d, reps)
    (_, victim), (twin_dir, twin) = last["victim"], last["twin"]
    assert [r["epoch"] for r in twin] == [1, 2, 3]
    assert victim[-1]["epoch"] == 3 and victim[-1]["status"] == "completed"
    assert max(r["resumed_from"] for r in victim) == 1, victim  # restored from epoch 1's checkpoint
    assert re.search(r"resumed at epoch 1", out), out[-3000:]
    keys = ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "flops_executed")
    by_epoch = {r["epoch"]: {k: r[k] for k in keys} for r in twin}
    # killed in epoch 2, so epoch 2 is reported once, by the restored run; epoch 1's report is
    # lost when the kill comes before Ray Train's controller took it (its checkpoint is not)
    assert [r["epoch"] for r in victim] in ([1, 2, 3], [2, 3]), victim
    for r in victim:
        assert {k: r[k] for k in keys} == by_epoch[r["epoch"]], r["epoch"]
    # the checkpoint rank 0 wrote is the model: one worker evaluating it on the whole
    # validation split finds the accuracy the 2 workers reported
    from ssam_tune.training.config import config_from_dict
    from ssam_tune.training.trainer import Trainer, load_checkpoint

    ckpt = max(d for d in twin_dir.glob("checkpoint_*") if d.is_dir())  # checkpoint_000003
    state = load_checkpoint(ckpt / "checkpoint.pt")
    trainer = Trainer(config_from_dict(state["config"]), device="cpu")
    trainer.load_state_dict(state)
    assert trainer.evaluate(trainer.val_split)[1] == twin[-1]["val_acc"]
