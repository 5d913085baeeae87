"""Search-space validation: the bad-input corpus in-process, a handful through the real
CLIs, define-by-run sampling and the dry run."""

import optuna
import pytest
import yaml
from _helpers import FAST, HERE, REPO, run_module, write_yaml

from ssam_tune.config import ConfigError, load_config
from ssam_tune.run import space_to_dict
from ssam_tune.space import load_space, sample_params, smoke

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


def test_space_round_trips_through_its_dump(tmp_path):
    space = load_space(FAST)
    write_yaml(tmp_path / "s.yaml", space_to_dict(space))
    again = load_space(tmp_path / "s.yaml")
    assert again.base == space.base and again.search == space.search and again.tune == space.tune
    assert [c for _, c in again.fixed_trials()] == [c for _, c in space.fixed_trials()]


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
