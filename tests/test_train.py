"""The training loop: short real runs on the embedded data, exact resume, divergence, CLI.

No test here asserts how well a tiny run learns (accuracy above chance, a falling loss): how
far a few epochs get depends on how the CPU rounds. They check what holds on every CPU: counts,
the FLOPs and mask bookkeeping, that the reported numbers are those of the trained model, and
runs compared with themselves (same process or machine: same kernels). A divergence is
injected at a known step (``train.inject_nan_at_step``), never provoked with a huge learning rate.
"""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from _helpers import run_module, steps_per_epoch, write_yaml

from ssam_tune.train import run_cli
from ssam_tune.training.config import config_from_dict
from ssam_tune.training.trainer import Trainer, load_checkpoint

TINY = {"model": {"width": 0.0625}, "data": {"train_size": 512, "val_fraction": 0.1},
        "train": {"epochs": 2, "batch_size": 64}}
TINY_STEPS = steps_per_epoch(TINY["data"]["train_size"], TINY["train"]["batch_size"])  # optimizer steps / epoch
TIMING = {"epoch_seconds", "images_per_second", "train_seconds", "flops_count_seconds"}


def tiny(name: str, **over) -> dict:
    cfg = json.loads(json.dumps(TINY))
    cfg["method"] = {"name": name, **over.pop("method", {})}
    for section, values in over.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def _finite_epoch(m: dict) -> None:
    """A good epoch's numbers: finite losses, accuracies in [0, 1]."""
    for key in ("train_loss", "val_loss", "test_loss"):
        assert math.isfinite(m[key]) and m[key] >= 0, (key, m[key])
    for key in ("train_acc", "val_acc", "test_acc"):
        assert 0 <= m[key] <= 1, (key, m[key])


@pytest.mark.parametrize("method", ["sgd", "sam", "ssam_f", "ssam_d", "ssam_random"])
def test_two_epochs_train_and_report_the_trained_model(method, embedded):
    cfg = config_from_dict(tiny(method, method={"sparsity": 0.7, "N_F": 64}))
    trainer = Trainer(cfg, data=embedded)
    init = [p.detach().clone() for p in trainer.model.parameters()]
    metrics = list(trainer.epochs())
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert [m["status"] for m in metrics] == ["running", "completed"]
    last = metrics[-1]
    assert trainer.global_step == 2 * TINY_STEPS
    for m in metrics:
        _finite_epoch(m)
    # every parameter was stepped (how far it got depends on the CPU's rounding; that it moved does not)
    assert all(not torch.equal(p, q) for p, q in zip(trainer.model.parameters(), init, strict=True))
    # the reported accuracies are the trained model's (same process, same kernels: bit for bit)
    assert (last["val_loss"], last["val_acc"]) == trainer.evaluate(trainer.val_split)
    assert (last["test_loss"], last["test_acc"]) == trainer.evaluate(trainer.test_split)
    assert 0 < last["best_epoch"] <= 2 and last["best_val_acc"] == max(m["val_acc"] for m in metrics)
    if method == "sgd":
        assert last["e_norm"] == 0.0 and last["mask_refreshes"] == 0
        assert last["flops_executed"] == pytest.approx(last["flops_theoretical"])
    else:
        assert all(m["e_norm"] > 0 for m in metrics)
    if method == "sam":
        assert all(m["e_norm"] == pytest.approx(0.1, rel=1e-3) for m in metrics)  # ||e|| = rho
    if method.startswith("ssam"):
        # density exactly 1 - s after every refresh; one refresh per epoch (T_m = 1)
        d = sum(p.numel() for p in trainer.model.parameters())
        for m in metrics:
            assert m["mask_density"] == math.floor(round(0.3 * d, 9)) / d
        assert [m["mask_refreshes"] for m in metrics] == [1, 2]
        assert sum(int(x.sum()) for x in trainer.opt.masks()) == math.floor(round(0.3 * d, 9))
        assert metrics[1]["mask_overlap"] is not None and 0 < metrics[1]["mask_overlap"] <= 1
        assert last["flops_mask"] > 0
        assert last["flops_theoretical"] < last["flops_executed"]  # sparse first backward
    if method == "ssam_f":
        assert last["flops_mask"] == pytest.approx(2 * 64 * (trainer.flops.F + trainer.flops.B))


def test_flops_accounting_matches_cost_model(embedded):
    cfg = config_from_dict(tiny("sam", train={"epochs": 1}))
    trainer = Trainer(cfg, data=embedded)
    (m,) = list(trainer.epochs())
    images = TINY_STEPS * 64
    assert m["flops_executed"] == pytest.approx(2 * images * (trainer.flops.F + trainer.flops.B))


def test_refresh_schedule_counts(embedded):
    cfg = config_from_dict(tiny("ssam_random", train={"epochs": 3}, method={"T_m": 2}))
    metrics = list(Trainer(cfg, data=embedded).epochs())
    assert [m["mask_refreshes"] for m in metrics] == [1, 1, 2]  # epochs 0 and 2
    cfg = config_from_dict(tiny("ssam_random", train={"epochs": 2}, method={"fixed_mask": True}))
    metrics = list(Trainer(cfg, data=embedded).epochs())
    assert [m["mask_refreshes"] for m in metrics] == [1, 1]
    assert metrics[-1]["mask_overlap"] is None  # never replaced


def test_diverging_run_ends_as_diverged(embedded):
    # a 3-epoch run whose loss is NaN from a step in the middle of epoch 3
    nan_step = 2 * TINY_STEPS + TINY_STEPS // 2
    cfg = config_from_dict(tiny("sam", train={"epochs": 3, "inject_nan_at_step": nan_step}))
    trainer = Trainer(cfg, data=embedded)
    assert trainer.steps_per_epoch == TINY_STEPS
    metrics = list(trainer.epochs())
    # two good epochs, then one record: the last good epoch marked diverged, nothing after it
    assert len(metrics) == 3, metrics
    first, second, diverged = metrics
    assert (first["epoch"], first["status"]) == (1, "running")
    assert (second["epoch"], second["status"]) == (2, "running")
    for m in (first, second):
        _finite_epoch(m)
        assert m["e_norm"] > 0  # SAM perturbed
    assert second["flops_theoretical"] > first["flops_theoretical"] > 0
    assert diverged["status"] == "diverged" and diverged["epoch"] == 2
    # no number of the NaN epoch is reported: everything else is epoch 2's record
    assert {k: v for k, v in diverged.items() if k != "status"} == {k: v for k, v in second.items() if k != "status"}
    assert trainer.epoch == 2 and trainer.tracker["status"] == "diverged"
    assert list(trainer.epochs()) == []  # stopped for good


@pytest.mark.parametrize("nan_step, reached", [
    (0, 0),                   # the very first step: no epoch finished
    (TINY_STEPS - 1, 0),      # the last step of epoch 1
    (TINY_STEPS, 1),          # the first step of epoch 2
])
def test_injected_nan_diverges_in_the_epoch_of_its_step(nan_step, reached, embedded):
    cfg = config_from_dict(tiny("sgd", train={"epochs": 3, "inject_nan_at_step": nan_step}))
    trainer = Trainer(cfg, data=embedded)
    assert trainer.steps_per_epoch == TINY_STEPS
    *good, last = trainer.epochs()
    assert [(m["epoch"], m["status"]) for m in good] == [(e, "running") for e in range(1, reached + 1)]
    for m in good:
        _finite_epoch(m)
    assert last["status"] == "diverged" and last["epoch"] == reached
    if reached == 0:
        assert last == {"epoch": 0, "status": "diverged"}
    assert trainer.epoch == reached and trainer.tracker["status"] == "diverged"


def test_same_seed_same_run_and_paired_init(embedded):
    a = Trainer(config_from_dict(tiny("sam", train={"epochs": 1})), data=embedded)
    b = Trainer(config_from_dict(tiny("ssam_f", train={"epochs": 1})), data=embedded)
    for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(p, q)  # paired seeds: same initialisation across methods
    c = Trainer(config_from_dict(tiny("sam", train={"epochs": 1})), data=embedded)
    ma, mc = next(a.epochs()), next(c.epochs())
    assert {k: v for k, v in ma.items() if k not in TIMING} == {k: v for k, v in mc.items() if k not in TIMING}


def _cli(*args, cwd):
    return run_module("ssam_tune.train", *args, cwd=cwd)


def _non_timing(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.mark.parametrize("method", ["ssam_d", "ssam_f"])
def test_resume_in_fresh_process_is_bit_exact(method, tmp_path, monkeypatch):
    cfg = tiny(method, train={"epochs": 3})
    cfg["method"]["N_F"] = 32
    write_yaml(tmp_path / "c.yaml", cfg)
    # the uninterrupted run and the interrupted one's first epoch through the CLI's code in this
    # process; the resume in a fresh process (only it must start from the files alone)
    monkeypatch.chdir(tmp_path)
    assert run_cli(["c.yaml", "--out", "full"]) == 0
    assert run_cli(["c.yaml", "--out", "part", "--stop-after", "1"]) == 0
    assert load_checkpoint(tmp_path / "part" / "checkpoint.pt")["epoch"] == 1
    rest = _cli("c.yaml", "--out", "part", "--resume", cwd=tmp_path)
    assert rest.returncode == 0, rest.stderr
    assert "resumed from" in rest.stdout
    a, b = _non_timing(tmp_path / "full" / "metrics.jsonl"), _non_timing(tmp_path / "part" / "metrics.jsonl")
    assert len(a) == len(b) == 3
    assert a == b
    sa = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["model"]
    sb = load_checkpoint(tmp_path / "part" / "checkpoint.pt")["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # outputs of a CLI run: TensorBoard events, final metrics, resolved config
    assert list((tmp_path / "full" / "tb").glob("events.out.tfevents.*"))
    final = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert final["status"] == "completed" and final["final"]["epoch"] == 3
    assert yaml.safe_load((tmp_path / "full" / "config.yaml").read_text())["method"]["name"] == method


def test_cli_rejects_bad_config_and_missing_data(tmp_path, monkeypatch, capsys):
    # in process (an exception would fail the test); tests/test_space.py runs the bad-input
    # corpus through the real command lines, exit code and stderr included
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text("method:\n  rho: -1\n")
    assert run_cli(["bad.yaml"]) == 2 and "method.rho" in capsys.readouterr().err
    (tmp_path / "typo.yaml").write_text("train:\n  epoch: 3\n")
    assert run_cli(["typo.yaml"]) == 2 and "train.epoch: unknown key" in capsys.readouterr().err
    (tmp_path / "cifar.yaml").write_text(f"data:\n  name: cifar10\n  root: {tmp_path / 'nodata'}\n")
    assert run_cli(["cifar.yaml"]) == 2 and str(tmp_path / "nodata") in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing written


def test_test_acc_at_best_is_the_best_epochs_test_accuracy(embedded):
    """With the test set only at the final epoch (test_every 0), an epoch with a new best
    validation accuracy still evaluates it, so test_acc_at_best is never NaN. The accuracies
    are scripted (a real run's best epoch depends on the CPU): val 0.5, 0.7, 0.6 -> best epoch 2."""
    trainer = Trainer(config_from_dict(tiny("sgd", train={"epochs": 3, "test_every": 0})), data=embedded)
    val = iter([(1.0, 0.5), (1.0, 0.7), (1.0, 0.6)])

    def scripted(split):  # the test accuracy names the epoch it was taken at
        return next(val) if split is trainer.val_split else (2.0, trainer.epoch / 10)

    trainer.evaluate = scripted
    metrics = list(trainer.epochs())
    assert [m["test_acc"] for m in metrics][:2] == [0.1, 0.2]  # new bests: evaluated
    assert math.isnan(metrics[2]["test_acc"]) is False and metrics[2]["test_acc"] == 0.3  # final epoch
    assert metrics[-1]["best_epoch"] == 2 and metrics[-1]["test_acc_at_best"] == 0.2


def test_test_set_is_skipped_between_test_epochs_without_a_new_best(embedded):
    trainer = Trainer(config_from_dict(tiny("sgd", train={"epochs": 3, "test_every": 0})), data=embedded)
    val = iter([(1.0, 0.7), (1.0, 0.6), (1.0, 0.5)])
    trainer.evaluate = lambda split: next(val) if split is trainer.val_split else (2.0, trainer.epoch / 10)
    metrics = list(trainer.epochs())
    assert math.isnan(metrics[1]["test_acc"])  # no new best, not a test epoch: skipped
    assert metrics[-1]["test_acc_at_best"] == 0.1 and metrics[-1]["test_acc"] == 0.3


def test_flops_counting_is_left_out_of_the_epoch_seconds(embedded, monkeypatch):
    """Counting FLOPs (the per-tensor cost table of tensor masks, the pass at w recounted) is
    accounting, not training: on a clock that only the counting advances, the epochs take 0 s
    and ``flops_count_seconds`` holds all of it, in the epoch where the counting happened."""
    import ssam_tune.training.trainer as T

    clock = [0.0]
    monkeypatch.setattr(T.time, "perf_counter", lambda: clock[0])
    table, recount = T.backward_flops_per_tensor, T.forward_backward_flops

    def slow(fn, seconds):
        def wrapped(*args, **kwargs):
            clock[0] += seconds
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(T, "backward_flops_per_tensor", slow(table, 100.0))
    cfg = config_from_dict(tiny("ssam_f", method={"granularity": "tensor", "N_F": 16, "T_m": 1}))
    trainer = Trainer(cfg, data=embedded)  # the model's own FLOPs count runs here, before any epoch
    monkeypatch.setattr(T, "forward_backward_flops", slow(recount, 1.0))
    metrics = list(trainer.epochs())
    assert [m["epoch_seconds"] for m in metrics] == [0.0, 0.0] and metrics[-1]["train_seconds"] == 0.0
    # one refresh per epoch: the cost table (100 s here) and the pass at w recounted (1 s)
    assert [m["flops_count_seconds"] for m in metrics] == [101.0, 101.0]


def test_cli_refuses_to_overwrite_a_run_without_resume_or_overwrite(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_yaml(tmp_path / "c.yaml", tiny("sgd", train={"epochs": 1, "max_steps_per_epoch": 2}))
    assert run_cli(["c.yaml", "--out", "r"]) == 0
    before = (tmp_path / "r" / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert run_cli(["c.yaml", "--out", "r"]) == 2
    err = capsys.readouterr().err
    assert "--out: r holds a run already (checkpoint.pt, metrics.jsonl, metrics.json); use --resume" in err
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == before  # nothing lost
    assert run_cli(["c.yaml", "--out", "r", "--resume", "--overwrite"]) == 2
    assert run_cli(["c.yaml", "--out", "r", "--overwrite"]) == 0
    assert len((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()) == 1  # the new run's epoch only
