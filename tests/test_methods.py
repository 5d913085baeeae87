"""The method table is the one list of methods: config, search space, FLOPs and training
all agree with it."""

import dataclasses

import optuna
import pytest

from ssam_tune.method import flops
from ssam_tune.method.methods import COST_RULES, MASK_KINDS, METHODS, SPARSE_METHODS, applies, method
from ssam_tune.training.config import MethodConfig


def test_config_choices_are_the_table():
    name = next(f for f in dataclasses.fields(MethodConfig) if f.name == "name")
    assert tuple(name.metadata["choices"]) == tuple(METHODS)


def test_every_method_key_is_a_config_key_and_every_config_key_is_used():
    fields = {f.name for f in dataclasses.fields(MethodConfig)} - {"name"}
    used = {k for m in METHODS.values() for k in m.keys}
    assert used == fields


def test_rows_are_consistent():
    for name, m in METHODS.items():
        assert m.name == name and m.cost in COST_RULES
        assert m.mask is None or m.mask in MASK_KINDS
        assert m.sparse == (m.cost == "sparse_first_backward") == (name in SPARSE_METHODS)
        assert m.perturbs == ("rho" in m.keys)
    assert method("ssam_f").mask == "fisher" and method("ssam_d").mask == "dynamic"
    with pytest.raises(ValueError, match="unknown method 'adam'"):
        method("adam")


@pytest.mark.parametrize("key, yes, no", [
    ("method.rho", {"sam", "ssam_f", "ssam_d", "ssam_random", "sam_on"}, {"sgd"}),
    ("method.N_F", {"ssam_f"}, {"sgd", "sam", "ssam_d", "ssam_random", "sam_on"}),
    ("method.alpha", {"ssam_d"}, {"sgd", "sam", "ssam_f", "ssam_random", "sam_on"}),
    ("method.sparsity", {"ssam_f", "ssam_d", "ssam_random"}, {"sgd", "sam", "sam_on"}),
    ("method.granularity", {"ssam_f", "ssam_d", "ssam_random"}, {"sgd", "sam", "sam_on"}),
    ("method.tensor_score", {"ssam_f"}, {"sgd", "sam", "ssam_d", "ssam_random", "sam_on"}),
    ("method.name", set(METHODS), set()),
    ("train.lr", set(METHODS), set()),
])
def test_applies(key, yes, no):
    assert {m for m in METHODS if applies(key, m)} == yes
    assert not any(applies(key, m) for m in no)


def test_step_cost_follows_the_cost_rule():
    F, B = 1.0, 2.0
    for name, m in METHODS.items():
        theo = flops.step_cost(name, sparsity=0.5, F=F, B=B)
        exe = flops.step_cost(name, sparsity=0.5, F=F, B=B, kind="executed")
        expected = {"one_pass": (1.0, 1.0), "two_passes": (2.0, 2.0),
                    "sparse_first_backward": (1 + (F + 0.5 * B) / (F + B), 2.0)}[m.cost]
        assert (theo, exe) == pytest.approx(expected, abs=1e-15)
        fm = flops.FlopsModel(F, B, 4)
        cost = fm.mask_update_flops(name, n_params=10, fisher_samples=3)
        assert cost == {None: 0.0, "fisher": 3 * (F + B), "dynamic": 20.0, "random": 20.0, "norm": 0.0}[m.mask]


def test_space_samples_only_the_keys_a_method_uses(tmp_path):
    from ssam_tune.tuning.space import load_space, sample_params

    raw = {"name": "m", "model": {"name": "resnet18", "width": 0.0625}, "data": {"name": "embedded"},
           "train": {"epochs": 2}, "method": {"name": "ssam_f"},
           "search": {"method.name": {"type": "choice", "values": list(METHODS)},
                      "method.rho": {"type": "uniform", "low": 0.01, "high": 0.2},
                      "method.N_F": {"type": "choice", "values": [16, 64]},
                      "method.alpha": {"type": "uniform", "low": 0.1, "high": 0.9}}}
    space = load_space(tmp_path / "m.yaml", data=raw)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(40):
        params = sample_params(space, study.ask())
        m = params["method.name"]
        seen.add(m)
        assert {k for k in params if k != "method.name"} == {k for k in raw["search"]
                                                             if k != "method.name" and applies(k, m)}
    assert seen == set(METHODS)
