"""SAM / SSAM against a plain per-parameter float64 loop, and the optimizer contract."""

import copy
import io
import math
import warnings

import pytest
import torch
from torch import nn

from ssam_tune import SAM, SSAM
from ssam_tune.method.masks import random_mask, topk_mask
from ssam_tune.method.optim import freeze_bn_stats

LR, MOM, WD, RHO, EPS = 0.1, 0.9, 5e-4, 0.05, 1e-7


def tiny_model(seed=0, unused=False):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    if unused:  # a parameter that never gets a gradient
        model.register_parameter("unused", nn.Parameter(torch.ones(4, dtype=torch.float64)))
    return model


def batches(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g))
            for _ in range(n)]


def loss_of(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def grads_at(model, x, y):
    model.zero_grad()
    loss_of(model, x, y).backward()
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def reference_sam(model, data, masks=None, normalize="full", rho=RHO, plan=None):
    """Plain loop: e from the loss gradient, restore by copy, SGD(momentum, wd) by hand.

    ``rho`` is one radius, or a list with one per parameter (per-group rho); the norm in the
    denominator is always over the whole (masked or full) gradient. ``plan``: one bool per
    step, False for a step without the perturbation (the SGD step on the gradient at w)."""
    params = list(model.parameters())
    rhos = list(rho) if isinstance(rho, (list, tuple)) else [rho] * len(params)
    assert len(rhos) == len(params)
    bufs = [None] * len(params)
    for step, (x, y) in enumerate(data):
        g = grads_at(model, x, y)
        live = [i for i, gi in enumerate(g) if gi is not None]
        if plan is not None and not plan[step]:
            with torch.no_grad():
                for i in live:
                    d_p = g[i] + WD * params[i]
                    bufs[i] = d_p.clone() if bufs[i] is None else MOM * bufs[i] + d_p
                    params[i].sub_(LR * bufs[i])
            continue
        if masks is not None:
            gm = {i: g[i] * masks[i].double() for i in live}
        else:
            gm = {i: g[i] for i in live}
        if normalize == "full":
            norm = math.sqrt(sum(float((g[i] ** 2).sum()) for i in live))
        else:
            norm = math.sqrt(sum(float((gm[i] ** 2).sum()) for i in live))
        old = [p.detach().clone() for p in params]
        with torch.no_grad():
            for i in live:
                params[i].add_(rhos[i] * gm[i] / (norm + EPS))
        g2 = grads_at(model, x, y)
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(old[i])
            for i, p in enumerate(params):
                if g2[i] is None:
                    continue
                d_p = g2[i] + WD * p
                bufs[i] = d_p.clone() if bufs[i] is None else MOM * bufs[i] + d_p
                p.sub_(LR * bufs[i])
    return params, bufs


def run_wrapper(model, opt, data, plan=None):
    for step, (x, y) in enumerate(data):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        if plan is not None and not plan[step]:
            opt.plain_step(zero_grad=True)
            continue
        opt.first_step(zero_grad=True)
        loss_of(model, x, y).backward()
        opt.second_step(zero_grad=True)


def momentum_buffers(opt, model):
    return [opt.base_optimizer.state[p].get("momentum_buffer") for p in model.parameters()]


def assert_same(a_list, b_list, atol=1e-12):
    for a, b in zip(a_list, b_list, strict=True):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=atol)


def test_sam_matches_reference_loop():
    model, ref = tiny_model(unused=True), tiny_model(unused=True)
    data = batches()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOM, weight_decay=WD)
    run_wrapper(model, opt, data)
    ref_params, ref_bufs = reference_sam(ref, data)
    assert_same(list(model.parameters()), ref_params)
    assert_same(momentum_buffers(opt, model), ref_bufs)
    # the parameter without a gradient was never touched
    assert torch.equal(model.unused, torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["sam", "ssam"])
def test_steps_without_perturbation_match_the_reference_loop(kind):
    """A perturbation schedule's skipped steps (plain_step) are SGD steps on the gradient at w,
    sharing momentum with the perturbed ones (method/schedule.py)."""
    plan = [True, False, False, True, False, True]
    model, ref = tiny_model(unused=True), tiny_model(unused=True)
    data = batches()
    kw = dict(rho=RHO, lr=LR, momentum=MOM, weight_decay=WD)
    masks = None
    if kind == "sam":
        opt = SAM(model.parameters(), torch.optim.SGD, **kw)
    else:
        opt = SSAM(model.parameters(), torch.optim.SGD, sparsity=0.5, **kw)
        masks = random_mask(list(model.parameters()), 0.5, generator=torch.Generator().manual_seed(3))
        opt.set_masks(masks)
    run_wrapper(model, opt, data, plan)
    ref_params, ref_bufs = reference_sam(ref, data, masks=masks, plan=plan)
    assert_same(list(model.parameters()), ref_params)
    assert_same(momentum_buffers(opt, model), ref_bufs)
    # and the plan matters: every step perturbed gives other weights
    other = tiny_model(unused=True)
    reference_sam(other, data, masks=masks)
    assert not torch.equal(other[0].weight, model[0].weight)


def test_plain_step_refuses_to_interrupt_a_perturbed_step():
    model = tiny_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    x, y = batches(1)[0]
    loss_of(model, x, y).backward()
    opt.first_step(zero_grad=True)
    with pytest.raises(RuntimeError, match="second_step"):
        opt.plain_step()


def test_sam_hand_computed_two_parameters():
    # L(w) = w1^2 + 3 w2^2 at w = (1, 2): g = (2, 12), ||g|| = sqrt(148) = 12.1655251
    # e = 0.5 * g / ||g|| = (0.0821995, 0.4931970); w + e = (1.0821995, 2.4931970)
    # g(w + e) = (2.1643990, 14.9591822); SGD lr 0.1: w = (0.7835601, 0.5040818)
    w = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    opt = SAM([w], torch.optim.SGD, rho=0.5, lr=0.1)
    loss = lambda: w[0] ** 2 + 3 * w[1] ** 2  # noqa: E731
    loss().backward()
    opt.first_step(zero_grad=True)
    torch.testing.assert_close(w.detach(), torch.tensor([1.0821995, 2.4931970], dtype=torch.float64),
                               rtol=0, atol=1e-7)
    loss().backward()
    opt.second_step()
    torch.testing.assert_close(w.detach(), torch.tensor([0.7835601, 0.5040818], dtype=torch.float64),
                               rtol=0, atol=1e-7)
    assert opt.last_e_norm.item() == pytest.approx(0.5, abs=1e-8)


def test_step_closure_equals_two_phases():
    m1, m2 = tiny_model(), tiny_model()
    data = batches(3)
    o1 = SAM(m1.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOM)
    o2 = SAM(m2.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOM)
    run_wrapper(m1, o1, data)
    for x, y in data:
        def closure(x=x, y=y):  # called within this iteration
            loss = loss_of(m2, x, y)
            loss.backward()
            return loss
        assert isinstance(o2.step(closure), torch.Tensor)
    assert_same(list(m1.parameters()), list(m2.parameters()), atol=0)


def test_per_group_rho_matches_reference():
    model, ref = tiny_model(), tiny_model()
    data = batches()
    p = list(model.parameters())
    rhos = [0.05, 0.05, 0.2, 0.2]  # one per parameter: the first layer in one group, the second in another
    opt = SAM([{"params": p[:2], "rho": 0.05}, {"params": p[2:], "rho": 0.2}], torch.optim.SGD, lr=LR,
              momentum=MOM, weight_decay=WD)
    # the first climb by hand: each group's own rho, one norm over both groups
    x, y = data[0]
    loss_of(model, x, y).backward()
    g = [q.grad.clone() for q in model.parameters()]
    w0 = [q.detach().clone() for q in model.parameters()]
    opt.first_step()
    norm = math.sqrt(sum(float((gi ** 2).sum()) for gi in g))
    for q, w, gi, r in zip(model.parameters(), w0, g, rhos, strict=True):
        torch.testing.assert_close(q.detach() - w, r * gi / (norm + EPS), rtol=0, atol=1e-13)
    e_norm = math.sqrt(sum((r * float(gi.norm()) / (norm + EPS)) ** 2 for gi, r in zip(g, rhos, strict=True)))
    assert opt.last_e_norm.item() == pytest.approx(e_norm, rel=1e-12)
    opt.zero_grad()
    loss_of(model, x, y).backward()  # the gradient at w + e
    opt.second_step(zero_grad=True)
    # then every step of the run against the plain float64 loop with the same per-parameter rho
    run_wrapper(model, opt, data[1:])
    ref_params, ref_bufs = reference_sam(ref, data, rho=rhos)
    assert_same(list(model.parameters()), ref_params)
    assert_same(momentum_buffers(opt, model), ref_bufs)


def test_ssam_sparsity_zero_and_unset_masks_equal_sam():
    data = batches()
    m_sam, m_s0, m_unset = tiny_model(), tiny_model(), tiny_model()
    kw = dict(lr=LR, momentum=MOM, weight_decay=WD)
    o_sam = SAM(m_sam.parameters(), rho=RHO, **kw)
    o_s0 = SSAM(m_s0.parameters(), rho=RHO, sparsity=0.0, **kw)
    o_s0.set_masks(topk_mask([torch.rand_like(p) for p in m_s0.parameters()], 0.0))
    assert all(m.all() for m in o_s0.masks())
    o_unset = SSAM(m_unset.parameters(), rho=RHO, sparsity=0.5, **kw)
    assert o_unset.masks() is None  # documented: SSAM without masks is SAM
    for m, o in ((m_sam, o_sam), (m_s0, o_s0), (m_unset, o_unset)):
        run_wrapper(m, o, data)
    assert_same(list(m_sam.parameters()), list(m_s0.parameters()), atol=1e-15)
    assert_same(list(m_sam.parameters()), list(m_unset.parameters()), atol=0)


@pytest.mark.parametrize("normalize", ["full", "masked"])
def test_ssam_matches_reference_loop(normalize):
    model, ref = tiny_model(unused=True), tiny_model(unused=True)
    gen = torch.Generator().manual_seed(3)
    masks = random_mask(list(model.parameters()), 0.7, generator=gen)
    opt = SSAM(model.parameters(), rho=RHO, sparsity=0.7, normalize=normalize, lr=LR, momentum=MOM,
               weight_decay=WD)
    opt.set_masks(masks)
    data = batches()
    run_wrapper(model, opt, data)
    ref_params, ref_bufs = reference_sam(ref, data, masks=masks, normalize=normalize)
    assert_same(list(model.parameters()), ref_params)
    assert_same(momentum_buffers(opt, model), ref_bufs)


def test_all_false_mask_equals_base_optimizer():
    data = batches()
    m1, m2 = tiny_model(), tiny_model()
    o1 = SSAM(m1.parameters(), rho=0.5, sparsity=0.5, lr=LR, momentum=MOM, weight_decay=WD)
    o1.set_masks([torch.zeros_like(p, dtype=torch.bool) for p in m1.parameters()])
    o2 = torch.optim.SGD(m2.parameters(), lr=LR, momentum=MOM, weight_decay=WD)
    run_wrapper(m1, o1, data)
    for x, y in data:
        o2.zero_grad()
        loss_of(m2, x, y).backward()
        o2.step()
    assert_same(list(m1.parameters()), list(m2.parameters()), atol=0)


@pytest.mark.parametrize("normalize", ["full", "masked"])
def test_perturbation_touches_exactly_the_mask(normalize):
    model = tiny_model()
    masks = random_mask(list(model.parameters()), 0.6, generator=torch.Generator().manual_seed(0))
    opt = SSAM(model.parameters(), rho=0.3, sparsity=0.6, normalize=normalize, lr=LR)
    opt.set_masks(masks)
    x, y = batches(1)[0]
    loss_of(model, x, y).backward()
    g = [p.grad.clone() for p in model.parameters()]
    w0 = [p.detach().clone() for p in model.parameters()]
    opt.first_step()
    e = [p.detach() - w for p, w in zip(model.parameters(), w0, strict=True)]
    for ei, m in zip(e, masks, strict=True):
        assert torch.all(ei[~m] == 0)
        assert torch.all(ei[m] != 0)
    e_norm = math.sqrt(sum(float((ei ** 2).sum()) for ei in e))
    g_norm = math.sqrt(sum(float((gi ** 2).sum()) for gi in g))
    gm_norm = math.sqrt(sum(float(((gi * m) ** 2).sum()) for gi, m in zip(g, masks, strict=True)))
    expected = 0.3 * gm_norm / g_norm if normalize == "full" else 0.3
    assert e_norm == pytest.approx(expected, rel=1e-6)
    assert opt.last_e_norm.item() == pytest.approx(e_norm, rel=1e-6)
    if normalize == "full":
        assert e_norm < 0.3


def test_restore_is_exact_copy():
    torch.manual_seed(0)
    model = nn.Linear(50, 50)  # float32: subtracting e would drift
    opt = SSAM(model.parameters(), rho=0.7, sparsity=0.5, lr=0.0)
    opt.set_masks(random_mask(list(model.parameters()), 0.5, generator=torch.Generator().manual_seed(1)))
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(16, 50)
    for _ in range(5):
        model(x).square().mean().backward()
        opt.first_step(zero_grad=True)
        model(x).square().mean().backward()
        opt.second_step(zero_grad=True)
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)


def test_state_dict_round_trip_continues_in_lockstep():
    data = batches(8)
    model = tiny_model()
    opt = SSAM(model.parameters(), rho=RHO, sparsity=0.5, lr=LR, momentum=MOM, weight_decay=WD)
    opt.set_masks(random_mask(list(model.parameters()), 0.5, generator=torch.Generator().manual_seed(2)))
    run_wrapper(model, opt, data[:4])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    clone = tiny_model(seed=99)
    clone.load_state_dict(saved["model"])
    opt2 = SSAM(clone.parameters(), rho=0.9, sparsity=0.5, lr=123.0)
    opt2.load_state_dict(saved["opt"])
    assert opt2.param_groups[0]["lr"] == LR and opt2.param_groups[0]["rho"] == RHO
    assert opt2.param_groups is opt2.base_optimizer.param_groups
    for m1, m2 in zip(opt.masks(), opt2.masks(), strict=True):
        assert m2.dtype == torch.bool and torch.equal(m1, m2)
    run_wrapper(model, opt, data[4:])
    run_wrapper(clone, opt2, data[4:])
    assert_same(list(model.parameters()), list(clone.parameters()), atol=0)
    assert_same(momentum_buffers(opt, model), momentum_buffers(opt2, clone), atol=0)


def test_lr_scheduler_on_wrapper_drives_base_lr():
    model = tiny_model()
    opt = SSAM(model.parameters(), rho=RHO, sparsity=0.5, lr=0.1, momentum=MOM)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
    x, y = batches(1)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()"
        for _ in range(2):
            loss_of(model, x, y).backward()
            opt.first_step(zero_grad=True)
            loss_of(model, x, y).backward()
            opt.second_step(zero_grad=True)
            sched.step()
    expected = 0.1 * (1 + math.cos(math.pi * 2 / 4)) / 2
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(expected)


def test_masks_are_bool_on_param_device_and_validated():
    model = tiny_model()
    opt = SSAM(model.parameters(), sparsity=0.5, lr=LR)
    opt.set_masks([torch.ones_like(p) for p in model.parameters()])  # float in, bool kept
    assert all(m.dtype == torch.bool and m.device == p.device
               for m, p in zip(opt.masks(), model.parameters(), strict=True))
    with pytest.raises(ValueError, match="masks must have one tensor per parameter"):
        opt.set_masks([torch.ones(1, dtype=torch.bool)])
    with pytest.raises(ValueError, match=r"masks\[0\] must be a tensor of shape"):
        opt.set_masks([torch.ones(2, 2, dtype=torch.bool)] * len(list(model.parameters())))


@pytest.mark.parametrize("kwargs, match", [
    (dict(rho=-0.1), "rho=-0.1"),
    (dict(sparsity=1.0), "sparsity=1.0"),
    (dict(sparsity=-0.2), "sparsity=-0.2"),
    (dict(normalize="half"), "normalize='half'"),
])
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SSAM(tiny_model().parameters(), lr=LR, **kwargs)


def test_sam_rejects_negative_rho():
    with pytest.raises(ValueError, match="rho"):
        SAM(tiny_model().parameters(), rho=-1.0, lr=LR)


def test_dynamic_update_through_optimizer_keeps_density():
    model = tiny_model()
    opt = SSAM(model.parameters(), sparsity=0.5, lr=LR)
    with pytest.raises(ValueError, match="initial mask"):
        opt.dynamic_update(0, 10)
    gen = torch.Generator().manual_seed(0)
    opt.set_masks(random_mask(opt.params(), 0.5, generator=gen))
    x, y = batches(1)[0]
    loss_of(model, x, y).backward()
    before = [m.clone() for m in opt.masks()]
    opt.dynamic_update(1, 10, alpha=0.5, generator=gen)
    d = sum(p.numel() for p in model.parameters())
    assert sum(int(m.sum()) for m in opt.masks()) == d // 2
    assert any(not torch.equal(a, b) for a, b in zip(before, opt.masks(), strict=True))


def test_freeze_bn_stats_keeps_running_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    x = torch.randn(4, 3, 8, 8)
    model(x)
    bn = model[1]
    state = copy.deepcopy(bn.state_dict())
    expected = copy.deepcopy(model)(x)  # train mode: batch statistics
    with freeze_bn_stats(model):
        out = model(x)
    torch.testing.assert_close(out, expected)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert bn.track_running_stats
    model(x)  # outside the block the statistics move again
    assert not torch.equal(bn.running_mean, state["running_mean"])


def test_scores_land_on_their_parameters_whatever_the_group_order():
    """Fisher scores come in model.parameters() order; param_groups may be in another order.
    With equal shapes a positional match would silently put scores on the wrong tensors."""
    a = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    b = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt = SSAM([{"params": [b]}, {"params": [a]}], torch.optim.SGD, rho=0.1, sparsity=0.5, lr=0.1)
    score_a = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    score_b = torch.zeros(4, dtype=torch.float64)
    opt.set_masks_from_scores([score_a, score_b], [a, b])  # model order: a, then b
    masks = dict(zip(opt.params(), opt.masks(), strict=True))
    assert masks[a].tolist() == [True] * 4 and masks[b].tolist() == [False] * 4
    with pytest.raises(ValueError, match="exactly once"):
        opt.set_masks_from_scores([score_a, score_b], [a, a])
    with pytest.raises(ValueError, match="same length"):
        opt.set_masks_from_scores([score_a], [a, b])
