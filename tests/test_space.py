"""Search-space validation: the bad-input corpus in-process, a handful through the real
CLIs, define-by-run sampling and the dry run."""

import optuna
import pytest
import yaml
from _helpers import FAST, HERE, REPO, fast_space, run_module, write_yaml

from ssam_tune.run import space_to_dict
from ssam_tune.training.config import ConfigError, load_config
from ssam_tune.tuning.space import load_space, sample_params, smoke

BAD = HERE / "bad_inputs"
CORPUS = yaml.safe_load((BAD / "expected.yaml").read_text())


def test_corpus_is_large_enough():
    assert len(CORPUS) >= 30
    assert {p.name for p in BAD.glob("*.yaml")} - {"expected.yaml"} == set(CORPUS)


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_bad_input_is_refused_with_its_message(name):
    entry = CORPUS[name]
    with pytest.raises(ConfigError) as info:
        if entry["kind"] == "space":
            load_space(BAD / name)
        else:
            load_config(BAD / name)
    msg = str(info.value)
    assert entry["error"] in msg, msg
    assert msg.startswith(str(BAD / name)) and "\n" not in msg


@pytest.mark.parametrize("name, module", [
    ("low_gt_high.yaml", "ssam_tune.run"),
    ("python_tag.yaml", "ssam_tune.run"),
    ("name_escapes_results.yaml", "ssam_tune.run"),
    ("conditional_wrong_method.yaml", "ssam_tune.run"),
    ("train_negative_rho.yaml", "ssam_tune.train"),
])
def test_cli_refuses_with_exit_2_and_writes_nothing(name, module, tmp_path):
    r = run_module(module, str(BAD / name), cwd=tmp_path, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and CORPUS[name]["error"] in lines[0] and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written, no Ray started


def test_shipped_spaces_load_and_smoke():
    for path in sorted((REPO / "search_spaces").glob("*.yaml")):
        space = load_space(path, check_paths=False)  # placeholder data roots (/data/imagenet)
        assert space.budget() >= 1
        s = smoke(space)
        assert s.base["train"]["epochs"] == 2 and s.base["data"]["name"] == "embedded"
        if space.tune.scheduler == "asha":  # first rung at a quarter of the schedule or later
            assert space.tune.grace_period >= space.epochs / 4, path


def test_define_by_run_samples_conditionally():
    space = load_space(FAST)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    seen = {}
    for _ in range(30):
        trial = study.ask()
        params = sample_params(space, trial)
        method = params["method.name"]
        seen[method] = params
        assert ("method.N_F" in params) == (method == "ssam_f")
        assert ("method.sparsity" in params) == (method != "sam")
        assert "method.rho" in params
        study.tell(trial, [0.5, 1.0])
    assert set(seen) == {"sam", "ssam_f", "ssam_d"}


def test_perturbation_schedules_are_searched_for_the_perturbing_methods(tmp_path):
    """method.perturb_every / perturb_from / perturb_prob are keys of every perturbing method:
    sampled for SAM and SSAM, never for SGD; --dry-run names the schedules of fixed trials."""
    data = fast_space()
    data["search"]["method.name"]["values"] = ["sgd", "sam", "ssam_f"]
    data["search"]["method.perturb_every"] = {"type": "choice", "values": [1, 2, 4]}
    data["search"]["method.perturb_from"] = {"type": "uniform", "low": 0.0, "high": 0.5}
    space = load_space(write_yaml(tmp_path / "s.yaml", data))
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        params = sample_params(space, trial)
        seen.add(params["method.name"])
        perturbs = params["method.name"] != "sgd"
        assert ("method.perturb_every" in params) == perturbs and ("method.perturb_from" in params) == perturbs
        if perturbs:
            assert params["method.perturb_every"] in (1, 2, 4) and 0 <= params["method.perturb_from"] <= 0.5
        study.tell(trial, [0.5, 1.0])
    assert seen == {"sgd", "sam", "ssam_f"}
    bad = fast_space()
    bad["search"]["method.perturb_every"] = {"type": "int", "low": 0, "high": 4}
    with pytest.raises(ConfigError, match="perturb_every"):
        load_space(write_yaml(tmp_path / "bad.yaml", bad))


def test_space_round_trips_through_its_dump(tmp_path):
    space = load_space(FAST)
    write_yaml(tmp_path / "s.yaml", space_to_dict(space))
    again = load_space(tmp_path / "s.yaml")
    assert again.base == space.base and again.search == space.search and again.tune == space.tune
    assert [c for _, c in again.fixed_trials()] == [c for _, c in space.fixed_trials()]
    # a non-default retain_checkpoints is written (the default is left out for older readers)
    data = fast_space()
    data["tune"]["retain_checkpoints"] = "all"
    write_yaml(tmp_path / "all.yaml", data)
    dumped = space_to_dict(load_space(tmp_path / "all.yaml"))
    assert dumped["tune"]["retain_checkpoints"] == "all" and "retain_checkpoints" not in space_to_dict(space)["tune"]
    write_yaml(tmp_path / "all2.yaml", dumped)
    assert load_space(tmp_path / "all2.yaml").tune.retain_checkpoints == "all"
    # tune.enqueue is written when given, and survives the smoke shrink where the space still allows it
    data["tune"]["enqueue"] = [{"method.name": "ssam_f", "method.N_F": 8, "method.sparsity": 0.9}]
    written = load_space(write_yaml(tmp_path / "enq.yaml", data))
    assert "enqueue" not in space_to_dict(space)["tune"]
    again = load_space(write_yaml(tmp_path / "enq2.yaml", space_to_dict(written)))
    assert again.tune.enqueue == written.tune.enqueue == data["tune"]["enqueue"]
    assert smoke(again).tune.enqueue == [{"method.name": "ssam_f", "method.sparsity": 0.9}]  # N_F 8 not in (16, 64)


def test_cases_cross_seeds(tmp_path):
    write_yaml(tmp_path / "c.yaml", {
        "model": {"width": 0.0625}, "data": {"val_fraction": 0.1},
        "cases": [{"label": "sgd", "method": {"name": "sgd"}}, {"method.name": "ssam_d", "method.sparsity": 0.9}],
        "seeds": [3, 4], "tune": {"scheduler": "none"}})
    space = load_space(tmp_path / "c.yaml")
    fixed = space.fixed_trials()
    assert [label for label, _ in fixed] == ["sgd/seed3", "sgd/seed4", "case1/seed3", "case1/seed4"]
    assert [c["seed"] for _, c in fixed] == [3, 4, 3, 4]
    assert fixed[2][1]["method"]["sparsity"] == 0.9 and space.budget() == 4


def test_dry_run_prints_space_and_budget(tmp_path):
    r = run_module("ssam_tune.run", str(FAST), "--dry-run", cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "trial budget: 9 trials (3 fixed + 6 sampled)" in r.stdout
    assert "method.rho: loguniform [0.02, 0.5]" in r.stdout
    assert list(tmp_path.iterdir()) == []
    cases = {**fast_space(), "cases": [{"label": "k4", "method.name": "sam", "method.perturb_every": 4},
                                       {"label": "late", "method.name": "ssam_f", "method.perturb_from": 0.5},
                                       {"label": "every", "method.name": "sam"}], "seeds": [0, 1]}
    cases.pop("search")
    r = run_module("ssam_tune.run", str(write_yaml(tmp_path / "cases.yaml", cases)), "--dry-run",
                   cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "perturbation schedules (share of steps that perturb" in r.stdout and ": k4 0.25, late 0.5\n" in r.stdout


def test_workers_split_the_global_batch_and_are_sized_for_the_cluster(tmp_path):
    space = fast_space()
    space["tune"]["resources"] = {"workers": 3, "cpu": 2, "gpu": 1}
    with pytest.raises(ConfigError, match=r"train.batch_size: 64 does not split evenly over tune.resources.workers=3"):
        load_space(write_yaml(tmp_path / "a.yaml", space))
    space["tune"]["resources"] = {"workers": 4, "cpu": 2}
    space["cases"] = [{"label": "odd", "train": {"batch_size": 30}}]
    search = space.pop("search")
    with pytest.raises(ConfigError, match=r"cases\[0\].train.batch_size: 30 does not split evenly"):
        load_space(write_yaml(tmp_path / "b.yaml", space))
    space.pop("cases")
    space["search"] = search
    space["train"]["sync_bn"] = True
    with pytest.raises(ConfigError, match=r"train.sync_bn: needs GPU workers"):
        load_space(write_yaml(tmp_path / "b.yaml", space))
    space["train"]["sync_bn"] = False
    space["tune"]["resources"] = {"workers": 4, "cpu": 2, "gpu": 0.5}
    with pytest.raises(ConfigError, match=r"tune.resources.gpu: 0.5: the workers of a data-parallel trial need a "):
        load_space(write_yaml(tmp_path / "c.yaml", space))
    space["search"]["train.batch_size"] = {"type": "int", "low": 64, "high": 256, "step": 2}
    space["tune"]["resources"] = {"workers": 4, "cpu": 2, "gpu": 1}
    with pytest.raises(ConfigError, match=r"search.train.batch_size: low and step must be multiples"):
        load_space(write_yaml(tmp_path / "c.yaml", space))
    space["search"].pop("train.batch_size")
    space["train"]["sync_bn"] = True
    s = load_space(write_yaml(tmp_path / "c.yaml", space))
    t = s.tune
    assert t.per_trial() == {"CPU": 8.0, "GPU": 4.0}
    assert t.trials_that_fit(cpus=64, gpus=8) == 2
    assert t.trials_that_fit(cpus=12, gpus=8) == 1  # CPU-bound
    assert t.trials_that_fit(cpus=64, gpus=3) == 0  # a trial needs 4 GPUs
    assert load_space(write_yaml(tmp_path / "e.yaml", {**fast_space(), "tune": {"resources": {"gpu": 0.5}}})) \
        .tune.trials_that_fit(cpus=64, gpus=3) == 6  # 1 worker: two trials per GPU
    again = load_space(write_yaml(tmp_path / "d.yaml", space_to_dict(s)))  # stored and read back
    assert (again.tune.workers, again.tune.cpu, again.tune.gpu) == (4, 2.0, 1.0)
    small = smoke(s)
    assert (small.tune.workers, small.tune.max_concurrent_trials, small.base["train"]["sync_bn"]) == (2, 1, False)
    r = run_module("ssam_tune.run", str(tmp_path / "c.yaml"), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "4 data-parallel workers (Ray Train) x 2 CPU, 1 GPU = 4 GPUs and 8 CPUs per trial" in r.stdout
    assert "trials that fit at once on this machine" in r.stdout
