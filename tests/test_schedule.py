"""Perturbation schedules (method.perturb_every / perturb_from / perturb_prob): which steps
perturb, what the trainer does on the others, what they cost, and exact resume."""

import json
import math

import pytest
import torch
from _helpers import steps_per_epoch

from ssam_tune.method.schedule import PerturbSchedule
from ssam_tune.training.config import ConfigError, config_from_dict
from ssam_tune.training.trainer import Trainer

# 8 steps per epoch: a multiple of 4, so perturb_every 4 perturbs exactly a quarter of them
TINY = {"model": {"width": 0.0625}, "data": {"train_size": 128, "val_fraction": 0.1},
        "train": {"epochs": 2, "batch_size": 16, "test_every": 0}}
STEPS = steps_per_epoch(128, 16)
TIMING = {"epoch_seconds", "images_per_second", "train_seconds", "flops_count_seconds"}


def tiny(name: str, epochs: int = 2, **method) -> dict:
    cfg = json.loads(json.dumps(TINY))
    cfg["train"]["epochs"] = epochs
    cfg["method"] = {"name": name, "N_F": 32, **method}
    return cfg


def _same(a: dict, b: dict, skip=()) -> None:
    drop = TIMING | set(skip)
    assert {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}


# -- the rule -----------------------------------------------------------------------------------
def test_plan_every_from_and_prob():
    assert PerturbSchedule().plan(5) == [True] * 5 and PerturbSchedule().always
    assert PerturbSchedule(every=4).plan(10) == [t % 4 == 0 for t in range(10)]
    # perturb_from 0.5 of 10 steps: steps 0-4 run plain, perturbation from step 5 on
    assert PerturbSchedule(start=0.5).plan(10) == [False] * 5 + [True] * 5
    # ceil: 0.25 of 10 steps is 2.5, so 3 plain steps; every 2 counts from the first perturbing step
    assert PerturbSchedule(start=0.25, every=2).plan(10) == [False] * 3 + [True, False] * 3 + [True]
    a, b = PerturbSchedule(prob=0.5, seed=7), PerturbSchedule(prob=0.5, seed=8)
    assert a.plan(4000) == PerturbSchedule(prob=0.5, seed=7).plan(4000)  # a function of the seed
    assert a.plan(4000) != b.plan(4000)
    assert 0.45 < sum(a.plan(4000)) / 4000 < 0.55
    # the draws are per step: a longer plan starts with the shorter one
    assert a.plan(4000)[:100] == a.plan(100)
    # the rules combine: a step perturbs when all of them say so
    both = PerturbSchedule(every=2, prob=0.5, seed=7).plan(4000)
    assert both == [p and t % 2 == 0 for t, p in enumerate(a.plan(4000))]


@pytest.mark.parametrize(("kw", "match"), [({"every": 0}, "perturb_every"), ({"start": 1.0}, "perturb_from"),
                                           ({"prob": 0.0}, "perturb_prob"), ({"every": 1.5}, "perturb_every")])
def test_plan_rejects_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        PerturbSchedule(**kw)


@pytest.mark.parametrize(("key", "value"), [("perturb_every", 0), ("perturb_from", 1.0), ("perturb_from", -0.1),
                                            ("perturb_prob", 0.0), ("perturb_prob", 1.5), ("perturb_every", "2")])
def test_config_names_the_key_of_a_bad_schedule(key, value):
    with pytest.raises(ConfigError, match=f"method.{key}"):
        config_from_dict(tiny("sam", **{key: value}))


# -- the trainer ----------------------------------------------------------------------------------
def test_sam_before_perturb_from_is_sgd_bit_for_bit(embedded):
    """perturb_from 0.5 of 2 epochs: epoch 1 is SGD's (same weights, same metrics), epoch 2
    perturbs every step."""
    sam = Trainer(config_from_dict(tiny("sam", perturb_from=0.5)), data=embedded)
    sgd = Trainer(config_from_dict(tiny("sgd", epochs=2)), data=embedded)
    (s1, s2), (g1, _) = list(sam.epochs()), list(sgd.epochs())
    _same(s1, g1, skip={"status"})
    assert s1["e_norm"] == 0.0 and s1["perturbed_share"] == 0.0 and s1["perturbed_steps"] == 0
    assert s2["e_norm"] == pytest.approx(0.1, rel=1e-3) and s2["perturbed_share"] == 1.0
    assert s2["perturbed_steps"] == STEPS
    assert s1["flops_executed"] == g1["flops_executed"] == s1["flops_theoretical"]
    # the second epoch is SAM's: two passes per step
    assert s2["flops_executed"] - s1["flops_executed"] == pytest.approx(2 * s1["flops_executed"])


@pytest.mark.parametrize("every", [2, 4])
def test_perturb_every_k_costs_what_its_passes_run(every, embedded):
    """SAM every k steps: (1 + 1/k) / 2 of every-step SAM's FLOPs, exactly (the goal of issue
    23: 0.625x at k = 4), theoretical and executed alike."""
    full = list(Trainer(config_from_dict(tiny("sam", epochs=1)), data=embedded).epochs())[-1]
    k = list(Trainer(config_from_dict(tiny("sam", epochs=1, perturb_every=every)), data=embedded).epochs())[-1]
    ratio = (1 + 1 / every) / 2
    assert k["flops_executed"] == pytest.approx(ratio * full["flops_executed"], rel=1e-12)
    assert k["flops_theoretical"] == pytest.approx(ratio * full["flops_theoretical"], rel=1e-12)
    assert k["perturbed_steps"] == STEPS // every and k["perturbed_share"] == 1 / every
    assert k["e_norm"] == pytest.approx(0.1, rel=1e-3)  # averaged over the steps that perturbed


def test_the_default_schedule_is_the_published_method(embedded):
    """Every step perturbs by default; naming the defaults changes nothing."""
    a = list(Trainer(config_from_dict(tiny("ssam_f", epochs=1, sparsity=0.5)), data=embedded).epochs())
    b = list(Trainer(config_from_dict(tiny("ssam_f", epochs=1, sparsity=0.5, perturb_every=1, perturb_from=0.0,
                                            perturb_prob=1.0)), data=embedded).epochs())
    _same(a[-1], b[-1])
    assert a[-1]["perturbed_share"] == 1.0


def test_ssam_f_masks_start_with_the_first_perturbing_step(embedded):
    """No mask is built (nor charged) while no step perturbs; from the first perturbing step on,
    T_m's rule applies."""
    cfg = tiny("ssam_f", epochs=4, sparsity=0.5, perturb_from=0.5)
    metrics = list(Trainer(config_from_dict(cfg), data=embedded).epochs())
    assert [m["mask_refreshes"] for m in metrics] == [0, 0, 1, 2]
    assert [m["flops_mask"] == 0 for m in metrics] == [True, True, False, False]
    assert metrics[1]["mask_density"] == 0.0 and metrics[2]["mask_density"] == pytest.approx(0.5, abs=1e-4)
    # perturb_from 0.4 of 32 steps: step 13 (ceil 12.8) builds the first mask, inside epoch 2
    metrics = list(Trainer(config_from_dict(tiny("ssam_f", epochs=4, sparsity=0.5, perturb_from=0.4)),
                           data=embedded).epochs())
    assert [m["mask_refreshes"] for m in metrics] == [0, 1, 2, 3]
    assert STEPS == 8 and metrics[1]["perturbed_share"] == (2 * STEPS - 13) / STEPS


@pytest.mark.parametrize("method", ["sam", "ssam_d", "ssam_f"])
def test_resume_continues_the_same_plan(method, embedded):
    """A run stopped after epoch 1 and resumed from its state dict ends bit for bit where the
    uninterrupted run ends: the plan is recomputed from the seed, no state is needed."""
    cfg = tiny(method, epochs=3, perturb_every=2, perturb_prob=0.6, perturb_from=0.2, sparsity=0.5)
    full = list(Trainer(config_from_dict(cfg), data=embedded).epochs())
    first = Trainer(config_from_dict(cfg), data=embedded)
    next(first.epochs())
    state = first.state_dict()
    second = Trainer(config_from_dict(cfg), data=embedded)
    second.load_state_dict(state)
    rest = list(second.epochs())
    assert len(rest) == 2
    for a, b in zip(full[1:], rest, strict=True):
        _same(a, b)
    for p, q in zip(Trainer(config_from_dict(cfg), data=embedded).model.parameters(),
                    second.model.parameters(), strict=True):
        assert not torch.equal(p, q)  # it trained
    assert 0 < full[-1]["perturbed_steps"] < 3 * STEPS


def test_every_perturbing_method_takes_the_schedule(embedded):
    for name in ("sam", "ssam_f", "ssam_d", "ssam_random", "sam_on"):
        (m,) = list(Trainer(config_from_dict(tiny(name, epochs=1, perturb_every=4, sparsity=0.5)),
                            data=embedded).epochs())
        assert m["perturbed_steps"] == STEPS // 4, name
        assert math.isfinite(m["train_loss"]) and m["e_norm"] > 0, name
