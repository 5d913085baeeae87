"""A user's own model and data, by import string (training/user_code.py): every method on
models the project did not write (LayerNorm, GroupNorm, a layer of its own, float features),
exact resume, two workers, the refusals before Ray starts, ``--set`` on the search command
line, the Python API and the example package (examples/own_model/)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from _helpers import REPO, fast_space, run_module, write_yaml

from ssam_tune.method.fisher import fisher_scores
from ssam_tune.training.config import ConfigError, config_from_dict
from ssam_tune.training.trainer import Trainer, load_data

HERE = Path(__file__).resolve().parent
EXAMPLE = REPO / "examples" / "own_model"

FEATURES = {"model": {"name": "_own:mlp", "kwargs": {"hidden": 12}},
            "data": {"name": "_own:blobs", "val_fraction": 0.25}}
IMAGES = {"model": {"name": "_own:gn_cnn"}, "data": {"name": "_own:images", "val_fraction": 0.25}}
METHODS = [("sgd", "element"), ("sam", "element"), ("ssam_f", "element"), ("ssam_f", "tensor"),
           ("ssam_d", "element"), ("ssam_random", "element"), ("sam_on", "element")]


def _cfg(setting: dict, method: str = "ssam_f", granularity: str = "element", **train) -> dict:
    return {"seed": 1, **setting, "train": {"epochs": 2, "batch_size": 32, "device": "cpu", "lr": 0.05, **train},
            "method": {"name": method, "granularity": granularity, "rho": 0.05, "sparsity": 0.5, "N_F": 16}}


def _run(cfg: dict) -> list[dict]:
    return list(Trainer(config_from_dict(cfg)).epochs())


@pytest.mark.parametrize("setting", [FEATURES, IMAGES], ids=["features", "images"])
def test_every_method_trains_a_foreign_model_and_counts_its_flops(setting):
    runs = {m: _run(_cfg(setting, *m)) for m in METHODS}
    for (method, gran), ms in runs.items():
        assert [m["epoch"] for m in ms] == [1, 2] and ms[-1]["status"] == "completed", (method, gran)
        assert all(torch.isfinite(torch.tensor(m["train_loss"])) for m in ms)
    sgd, sam = runs[("sgd", "element")][-1], runs[("sam", "element")][-1]
    # the same steps: SAM's two passes are exactly twice SGD's one, theoretical and executed
    assert sam["flops_theoretical"] == pytest.approx(2 * sgd["flops_theoretical"], rel=1e-12)
    assert sgd["flops_executed"] == sgd["flops_theoretical"] and sam["flops_executed"] == sam["flops_theoretical"]
    # the cheaper first pass of tensor masks and SAM-ON is counted (fewer gradients at w)
    for cheap in (("ssam_f", "tensor"), ("sam_on", "element")):
        steps = runs[cheap][-1]["flops_executed"] - runs[cheap][-1]["flops_mask"]
        assert sgd["flops_executed"] < steps < sam["flops_executed"], cheap


def test_fisher_of_a_model_with_layernorm_falls_back_to_vmap_and_equals_a_loop():
    torch.manual_seed(0)
    from _own import mlp

    model = mlp(3, (8,), hidden=5).double()
    x, y = torch.randn(6, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    scores = fisher_scores(model, None, x, y, method="auto")
    with pytest.raises(ValueError, match="use method='vmap'"):
        fisher_scores(model, None, x, y, method="layers")
    ref = [torch.zeros_like(p) for p in model.parameters()]
    for i in range(len(y)):  # the definition: squared per-sample gradients of the NLL, summed
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        for r, p in zip(ref, model.parameters(), strict=True):
            r += p.grad.square()
    for a, b in zip(scores, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_resume_on_a_foreign_model_is_exact():
    cfg = config_from_dict(_cfg(FEATURES, "ssam_f", epochs=3))
    whole = list(Trainer(cfg).epochs())
    first = Trainer(cfg)
    gen = first.epochs()
    next(gen)
    state = first.state_dict()
    again = Trainer(cfg)
    again.load_state_dict(state)
    rest = list(again.epochs())
    keys = ("train_loss", "val_loss", "val_acc", "test_acc", "flops_theoretical", "flops_executed")
    assert [{k: m[k] for k in keys} for m in rest] == [{k: m[k] for k in keys} for m in whole[1:]]


def test_user_data_takes_the_built_in_path():
    noisy_cfg = _cfg({**FEATURES, "data": {**FEATURES["data"], "label_noise": 0.2}}) | {"seed": 3}
    data = load_data(config_from_dict(noisy_cfg))
    assert data.sample_shape == (8,) and data.num_classes == 3 and data.augment == "none"
    assert len(data.train) + len(data.val) == 192 and len(data.val) == 48 and len(data.test) == 48
    # a Dataset gives the same sets as the tensors
    same = load_data(config_from_dict(_cfg({**FEATURES, "data": {**FEATURES["data"], "name": "_own:blobs_datasets"}})
                                      | {"seed": 3}))
    plain = load_data(config_from_dict(_cfg(FEATURES) | {"seed": 3}))
    assert torch.equal(same.train.images, plain.train.images) and torch.equal(same.val.labels, plain.val.labels)
    # label noise flips training labels only, seeded
    noisy = data.train.labels != plain.train.labels
    assert 0 < int(noisy.sum()) and torch.equal(data.val.labels, plain.val.labels)
    # uint8 images: normalised with the training part's statistics, CIFAR augmentation by default
    img = load_data(config_from_dict(_cfg(IMAGES)))
    assert img.sample_shape == (3, 8, 8) and img.classes == ["nw", "ne", "sw", "se"] and img.augment == "cifar"
    assert len(img.train.mean) == 3 and all(0 < s < 1 for s in img.train.std)
    with pytest.raises(ConfigError, match="data.augment"):
        load_data(config_from_dict(_cfg({**FEATURES, "data": {**FEATURES["data"], "augment": "cifar"}})))


def _two_rank_trainer(rank: int, world: int) -> dict:
    sys.path.insert(0, str(HERE))
    cfg = _cfg(FEATURES, "ssam_f", batch_size=32)
    cfg["method"]["perturb_prob"] = 0.5  # a random perturbation schedule: every rank must draw the same
    trainer = Trainer(config_from_dict(cfg), device="cpu")
    assert (trainer.rank, trainer.world) == (rank, world)
    metrics = list(trainer.epochs())
    return {"val": [m["val_acc"] for m in metrics], "loss": [m["train_loss"] for m in metrics],
            "plan": trainer.perturb_plan, "perturbed": metrics[-1]["perturbed_steps"],
            "params": [p.detach().clone() for p in trainer.model.parameters()],
            "masks": [m.clone() for m in trainer.opt.masks()]}


def test_two_workers_on_a_foreign_model_equal_one(tmp_path):
    """No BatchNorm, so 2 ranks on 16 samples each step as 1 worker on 32 (float32 round-off),
    with a random perturbation schedule (perturb_prob 0.5) whose draws the ranks share."""
    from test_distributed import run_ranks

    r0, r1 = run_ranks(_two_rank_trainer, tmp_path, timeout=120)
    one = _two_rank_trainer(0, 1)
    assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(r0["masks"], r1["masks"], strict=True))
    assert r0["val"] == r1["val"]
    assert r0["plan"] == r1["plan"] == one["plan"] and 0 < r0["perturbed"] == sum(one["plan"]) < len(one["plan"])
    for a, b in zip(r0["params"], one["params"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    assert r0["loss"] == pytest.approx(one["loss"], abs=1e-4)


# -- refused before Ray starts: one line, exit 2, nothing written --------------------------------------
BAD = {
    "module": ({"model": {"name": "no_such_module_x:net"}}, "model.name: cannot import 'no_such_module_x'"),
    "attribute": ({"model": {"name": "_own:nothing"}}, "model.name: _own has no attribute 'nothing'"),
    "not callable": ({"model": {"name": "_own:NOT_CALLABLE"}}, "model.name: _own:NOT_CALLABLE is not callable"),
    "signature": ({"model": {"name": "_own:no_input_shape"}}, "model.name: _own:no_input_shape cannot be called as"),
    "kwargs": ({"model": {"name": "_own:mlp", "kwargs": {"depth": 3}}}, "unexpected keyword argument 'depth'"),
    "columns": ({"model": {"name": "_own:wrong_columns"}}, "must return N x num_classes logits; for 2 samples of 3"),
    "not a module": ({"model": {"name": "_own:not_a_module"}}, "must return a torch.nn.Module, got str"),
    "data type": ({"data": {"name": "_own:wrong_type"}}, "data.name: _own:wrong_type must return (train, test)"),
    "labels": ({"data": {"name": "_own:bad_labels"}}, "train labels must lie in [0, 3) (len(classes)), got 0..3"),
    "raises": ({"data": {"name": "_own:raises"}}, "data.name: _own:raises raised RuntimeError: no data here: mount"),
    "sam_on": ({"model": {"name": "_own:no_norm"}}, "method.name: sam_on perturbs only normalization layers"),
    "syntax": ({"model": {"name": "_own.mlp"}}, "or an import string 'package.module:function'; got '_own.mlp'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_user_code_is_refused_before_ray_starts(case, tmp_path, monkeypatch, capsys):
    from ssam_tune.run import main

    space = fast_space()
    space["model"], space["data"] = dict(FEATURES["model"]), dict(FEATURES["data"])
    space["search"]["method.name"]["values"] = ["sam", "ssam_f", "sam_on"]
    change, message = BAD[case]
    for section, values in change.items():
        space[section] = {**space[section], **values}
        if section == "model" and "kwargs" not in values:
            space[section].pop("kwargs", None)
    path = write_yaml(tmp_path / "own.yaml", space)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(HERE))
    assert main([str(path), "--storage", str(tmp_path / "ray"), "--results", str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["own.yaml"]  # nothing written, no Ray started


# -- --set on the search command line -----------------------------------------------------------------
def test_run_set_overrides_the_space_before_validation(tmp_path, capsys):
    from ssam_tune.run import main

    path = write_yaml(tmp_path / "s.yaml", fast_space())
    args = [str(path), "--dry-run", "--set", "train.epochs=3", "--set", "tune.num_samples=5",
            "--set", "search.method.rho={type: uniform, low: 0.05, high: 0.2}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "epochs: 3" in out and "method.rho: uniform [0.05, 0.2]" in out and "(3 fixed + 5 sampled)" in out
    for bad, message in ((["--set", "train.epochs=0"], "train.epochs: must be in [1, 100000], got 0"),
                         (["--set", "train.epochs"], "--set: expected key=value, got 'train.epochs'"),
                         (["--set", "train.epochs=[1"], "--set train.epochs: the value is not valid YAML"),
                         (["--set", "model.nme=x"], "model.nme: unknown key")):
        assert main([str(path), "--dry-run", *bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (bad, err)


# -- the example, end to end, through the Python API --------------------------------------------------
def test_example_runs_through_the_python_api_and_its_best_config_retrains(tmp_path, monkeypatch):
    """examples/own_model/space.yaml at smoke size through ``ssam_tune.tune`` (with an
    ``overrides`` item), then its best config through ``python -m ssam_tune.train``. The example's
    package is importable in this process only: the search must hand its folder to the Ray
    workers itself (``run.check_user_code``)."""
    import ssam_tune

    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # restored after the search adds to it
    monkeypatch.chdir(tmp_path)
    result = ssam_tune.tune(EXAMPLE / "space.yaml", smoke=True, overrides=["method.rho=0.03"], num_samples=2,
                            storage=str(tmp_path / "ray"), results=tmp_path / "results")
    assert isinstance(result, ssam_tune.SearchResult)
    assert result.export_dir == tmp_path / "results" / "own_model-smoke"
    assert (result.export_dir / "summary.md").is_file()
    assert Path(result.experiment) == tmp_path / "ray" / "own_model-smoke"
    trials = result.trials
    assert len(trials) == 5 and all(t["status"] == "completed" for t in trials), trials  # 2 sampled + 3 anchors
    assert {t["model.name"] for t in trials} == {"own_model.mixer:mixer"}
    assert {t["data.name"] for t in trials} == {"own_model.stripes:stripes"}
    assert {t["method.rho"] for t in trials if t["label"] in ("sam", "ssam")} == {0.03}  # the anchors' rho, --set
    assert result.front and all(isinstance(r["val_acc"], float) for r in result.front)
    assert result.best_config["model"]["name"] == "own_model.mixer:mixer"
    assert result.best_config["data"]["kwargs"] == {"n_train": 2000, "n_test": 500, "noise": 0.6}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(EXAMPLE), os.environ.get("PYTHONPATH", "")])}
    r = run_module("ssam_tune.train", str(result.export_dir / "best_config.yaml"), "--out", str(tmp_path / "rerun"),
                   cwd=tmp_path, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "rerun" / "metrics.json").read_text())["status"] == "completed"
