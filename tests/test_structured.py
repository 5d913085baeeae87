"""Tensor-structured SSAM and SAM-ON: whole-tensor masks, the pass at w that computes only
what e needs, and the FLOPs that pass really executes.

The reference for exactness is the element-wise SSAM step (every gradient computed) with
the same tensor-shaped mask and ``normalize="masked"``, and the plain float64 loop of
tests/test_optim.py."""

import contextlib

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ssam_tune import SSAM
from ssam_tune.method import masks as M
from ssam_tune.method.flops import forward_backward_flops

LR, MOM, WD, RHO = 0.1, 0.9, 5e-4, 0.05


def bn_net(seed=0):
    """conv-BN-ReLU twice, then a linear head; float64 so that two runs agree to 1e-12."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
    ).double()


def data(n=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g))
            for _ in range(n)]


def loss_of(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def train(model, opt, batches, skip_first_pass):
    """SSAM steps; the pass at w inside opt.first_pass() or in full."""
    seen_grads = []
    for x, y in batches:
        opt.zero_grad()
        with opt.first_pass() if skip_first_pass else contextlib.nullcontext():
            loss_of(model, x, y).backward()
        seen_grads.append([p.grad is not None for p in model.parameters()])
        opt.first_step(zero_grad=True)
        loss_of(model, x, y).backward()
        opt.second_step(zero_grad=True)
    return seen_grads


def state(model, opt):
    bufs = [opt.base_optimizer.state[p].get("momentum_buffer") for p in model.parameters()]
    return list(model.parameters()) + list(model.buffers()) + bufs


def whole_tensor_mask(model, perturbed):
    return [torch.full(p.shape, i in perturbed, dtype=torch.bool) for i, p in enumerate(model.parameters())]


# Parameters of bn_net: 0/1 conv1 w/b, 2/3 bn1, 4/5 conv2 w/b, 6/7 bn2, 8/9 linear.
@pytest.mark.parametrize("perturbed", [{4, 5, 8, 9}, {2, 3, 6, 7}, {6}, {0}])
def test_first_pass_gives_the_element_wise_step(perturbed):
    batches = data()
    a, b = bn_net(), bn_net()
    opts = []
    for model in (a, b):
        opt = SSAM(model.parameters(), rho=RHO, sparsity=0.5, normalize="masked", lr=LR, momentum=MOM,
                   weight_decay=WD)
        opt.set_masks(whole_tensor_mask(model, perturbed))
        opts.append(opt)
    full = train(a, opts[0], batches, skip_first_pass=False)
    lean = train(b, opts[1], batches, skip_first_pass=True)
    for x, y in zip(state(a, opts[0]), state(b, opts[1]), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-12)  # weights, BN statistics, momentum
    assert all(full[0])
    assert lean[0] == [i in perturbed for i in range(10)]  # only e's tensors got a gradient at w
    assert all(p.requires_grad for p in b.parameters())  # restored for the pass at w + e


def test_first_pass_matches_the_plain_float64_loop():
    """The lean pass against tests/test_optim.py's reference loop (masked normalisation)."""
    from test_optim import reference_sam, tiny_model

    batches = [(x.reshape(8, -1)[:, :5], y) for x, y in data()]
    model, ref = tiny_model(), tiny_model()
    opt = SSAM(model.parameters(), rho=RHO, sparsity=0.5, normalize="masked", lr=LR, momentum=MOM,
               weight_decay=WD)
    masks = whole_tensor_mask(model, {2, 3})  # the head only
    opt.set_masks(masks)
    train(model, opt, batches, skip_first_pass=True)
    ref_params, ref_bufs = reference_sam(ref, batches, masks=masks, normalize="masked")
    for x, y in zip(list(model.parameters()), ref_params, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-12)


def test_nothing_is_skipped_when_e_needs_every_gradient():
    model = bn_net()
    ps = list(model.parameters())
    full = SSAM(ps, rho=RHO, sparsity=0.5, normalize="full", lr=LR)
    full.set_masks(whole_tensor_mask(model, {8, 9}))
    assert full.skipped() == []  # ||g|| of the whole gradient needs every tensor
    masked = SSAM(ps, rho=RHO, sparsity=0.5, normalize="masked", lr=LR)
    assert masked.skipped() == []  # no masks yet: SAM
    masked.set_masks(M.random_mask(ps, 0.5, torch.Generator().manual_seed(0)))
    # element masks: only a tensor whose every entry happens to be unperturbed is skipped
    assert [id(p) for p in masked.skipped()] == [id(p) for p, m in zip(ps, masked.masks(), strict=True)
                                                  if not m.any()]
    masked.set_masks(whole_tensor_mask(model, {8, 9}))
    assert [id(p) for p in masked.skipped()] == [id(p) for p in ps[:8]]
    masked.masks()[8].fill_(False)  # an in-place edit is seen
    assert len(masked.skipped()) == 9


def test_first_pass_flops_are_what_the_real_pass_runs():
    """flops.forward_backward_flops(frozen=...) on a meta copy counts what FlopCounterMode
    counts around the real pass at w inside first_pass()."""
    model = bn_net().float()
    names = [n for n, _ in model.named_parameters()]
    opt = SSAM(model.parameters(), rho=RHO, sparsity=0.5, normalize="masked", lr=LR)
    opt.set_masks(whole_tensor_mask(model, {6, 7, 8, 9}))  # the second BN and the head
    x = torch.randn(4, 3, 6, 6)
    y = torch.zeros(4, dtype=torch.long)
    with opt.first_pass():
        out = model(x)
        loss = nn.functional.cross_entropy(out, y)
        with FlopCounterMode(display=False) as real:
            loss.backward()
    frozen = [names[i] for i in range(6)]
    F, B1 = forward_backward_flops(model, (3, 6, 6), frozen=frozen, batch_size=4)
    _, B = forward_backward_flops(model, (3, 6, 6), batch_size=4)
    assert B1 * 4 == real.get_total_flops()
    # the pass stops above conv2: neither conv's weight gradient nor conv2's input gradient
    assert B1 < B / 10 and B1 > 0


# -- masks ------------------------------------------------------------------------------------------
def _count(masks):
    return sum(int(m.sum()) for m in masks)


def _check_whole(masks):
    for m in masks:
        assert bool(m.all()) or not bool(m.any())


def _no_single_addition_gets_closer(masks, k):
    count = _count(masks)
    for m in masks:
        if not m.all():
            assert abs(count + m.numel() - k) >= abs(count - k)


def test_tensor_topk_mask_ranks_tensors_and_hits_the_budget():
    sizes = [(100,), (10,), (40,), (5,), (30,)]
    # per-weight means 1, 9, 3, 8, 2: ranking by mean is 1, 3, 2, 4, 0; by total 0, 2, 1, 4, 3
    scores = [torch.full(s, v) for s, v in zip(sizes, [1.0, 9.0, 3.0, 8.0, 2.0], strict=True)]
    # k = 45 of 185. By mean: 10 (count 10), 5 (15), 40 (55: 10 over beats 30 under), then
    # 30 and 100 would overshoot further. The best-ranked tensors win over an exact fit
    # further down ({40, 5}), and the count is as close as the best prefix of the ranking.
    by_mean = M.tensor_topk_mask(scores, 1 - 45 / 185, reduce="mean")
    _check_whole(by_mean)
    assert [bool(m.all()) for m in by_mean] == [False, True, True, True, False]
    assert _count(by_mean) == 55
    _no_single_addition_gets_closer(by_mean, 45)
    by_total = M.tensor_topk_mask(scores, 1 - 45 / 185, reduce="total")  # totals 100, 90, 120, 40, 60
    assert [bool(m.all()) for m in by_total] == [False, False, True, True, False]  # 40 + 5 = 45
    with pytest.raises(ValueError, match="reduce must be one of"):
        M.tensor_topk_mask(scores, 0.5, reduce="max")
    with pytest.raises(ValueError, match="needs costs"):
        M.tensor_topk_mask(scores, 0.5)


def test_per_flop_keeps_to_the_cheapest_tensors_that_hold_the_budget():
    """Tensor 1 (10 weights) is the most informative but forces a costly pass (cost 100);
    tensors 2-4 are cheap and hold the 45-weight budget, so the pass at w stays short."""
    sizes = [(100,), (10,), (40,), (5,), (30,)]
    scores = [torch.full(s, v) for s, v in zip(sizes, [1.0, 9.0, 3.0, 8.0, 2.0], strict=True)]
    costs = [90.0, 100.0, 10.0, 5.0, 8.0]
    mask = M.tensor_topk_mask(scores, 1 - 45 / 185, costs=costs)
    assert [bool(m.all()) for m in mask] == [False, False, True, True, False]  # 40 + 5: exactly 45
    # a budget the cheap pool cannot hold pulls in dearer tensors
    big = M.tensor_topk_mask(scores, 1 - 150 / 185, costs=costs)
    assert [bool(m.all()) for m in big] == [True, False, True, True, True]  # 175: adding tensor 1 overshoots more


def test_cost_ranking_ignores_the_scores():
    """tensor_score cost (the no-Fisher control): weights per backward FLOP alone; any scores
    give the mask per_flop gives with every weight scored 1."""
    sizes = [(100,), (10,), (40,), (5,), (30,)]
    costs = [90.0, 100.0, 10.0, 5.0, 8.0]
    ones = [torch.ones(s) for s in sizes]
    g = torch.Generator().manual_seed(0)
    for budget in (45, 100, 150):
        sparsity = 1 - budget / 185
        expected = M.tensor_topk_mask(ones, sparsity, costs=costs)
        for _ in range(3):
            scores = [torch.rand(s, generator=g) * 10 for s in sizes]
            got = M.tensor_topk_mask(scores, sparsity, reduce="cost", costs=costs)
            assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    # 45 weights, from the pool of the three cheapest tensors: tensor 2 (4 weights per FLOP)
    # first; tensor 4 (3.75) would overshoot to 70, tensor 3 lands on 45
    mask = M.tensor_topk_mask(ones, 1 - 45 / 185, reduce="cost", costs=costs)
    assert [bool(m.all()) for m in mask] == [False, False, True, True, False]
    with pytest.raises(ValueError, match="needs costs"):
        M.tensor_topk_mask(ones, 0.5, reduce="cost")


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_tensor_random_mask_is_seeded_and_close_to_the_budget(sparsity):
    like = [torch.zeros(s) for s in (64, 64, 8, 8, 200, 3, 3, 17)]
    a = M.tensor_random_mask(like, sparsity, torch.Generator().manual_seed(3))
    b = M.tensor_random_mask(like, sparsity, torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    _check_whole(a)
    k = M.num_perturbed(sum(t.numel() for t in like), sparsity)
    _no_single_addition_gets_closer(a, k)
    if sparsity == 0.0:
        assert all(m.all() for m in a)


def test_tensor_dynamic_update_drops_the_flattest_tensors_and_grows_others():
    like = [torch.zeros(10) for _ in range(10)]
    masks = [torch.full((10,), i < 5, dtype=torch.bool) for i in range(10)]  # tensors 0-4 perturbed
    grads = [torch.full((10,), float(i + 1)) if i < 5 else None for i in range(10)]  # unperturbed: no gradient
    # t = 0, alpha = 0.4: N_drop = 0.4 * 0.5 * 100 = 20 weights, i.e. the two flattest tensors 0 and 1
    new = M.tensor_dynamic_update(masks, grads, sparsity=0.5, t=0, total=10, alpha=0.4,
                                  generator=torch.Generator().manual_seed(0))
    _check_whole(new)
    on = {i for i, m in enumerate(new) if m.all()}
    assert {2, 3, 4} <= on and not on & {0, 1} and len(on) == 5  # two grown among 5-9
    sharp = M.tensor_dynamic_update(masks, grads, sparsity=0.5, t=0, total=10, alpha=0.4, strategy="sharpest",
                                    generator=torch.Generator().manual_seed(0))
    assert not {i for i, m in enumerate(sharp) if m.all()} & {3, 4}
    assert len(like) == 10


def test_norm_mask_is_the_normalization_layers():
    model = bn_net()
    mask = M.norm_mask(model)
    assert [bool(m.all()) for m in mask] == [False, False, True, True, False, False, True, True, False, False]
    _check_whole(mask)
    reordered = list(model.parameters())[::-1]
    assert [bool(m.all()) for m in M.norm_mask(model, reordered)] == [bool(m.all()) for m in mask][::-1]
    with pytest.raises(ValueError, match="no normalization-layer parameters"):
        M.norm_mask(nn.Linear(3, 2))


# -- training -----------------------------------------------------------------------------------------
def _cfg(**method):
    from ssam_tune.training.config import config_from_dict

    return config_from_dict({
        "seed": 0, "model": {"name": "resnet18", "width": 0.0625}, "data": {"name": "embedded"},
        "train": {"epochs": 1, "batch_size": 32, "max_steps_per_epoch": 3, "device": "cpu", "test_every": 0},
        "method": {"rho": 0.05, **method},
    })


def _run(cfg, monkeypatch=None, lean=True, float64=False):
    """Train; ``lean=False`` runs the pass at w in full; ``float64`` moves the model and
    its inputs to float64, so that two runs compare far below any chaotic amplification."""
    from ssam_tune.training.trainer import Trainer

    with monkeypatch.context() as mp:
        if not lean:
            mp.setattr(SSAM, "skipped", lambda self: [])
        if float64:
            to_device, fisher_batch = Trainer._to_device, Trainer._fisher_batch
            mp.setattr(Trainer, "_to_device", lambda self, x, y: (to_device(self, x, y)[0].double(), y))
            mp.setattr(Trainer, "_fisher_batch", lambda self: (fisher_batch(self)[0].double(), fisher_batch(self)[1]))
        trainer = Trainer(cfg)
        if float64:
            trainer.model.double()
        metrics = list(trainer.epochs())[-1]
    return trainer, metrics


@pytest.mark.parametrize("method", [
    {"name": "ssam_f", "granularity": "tensor", "sparsity": 0.5, "N_F": 16},
    {"name": "ssam_random", "granularity": "tensor", "sparsity": 0.9},
    {"name": "ssam_d", "granularity": "tensor", "sparsity": 0.5, "mask_unit": "step", "T_m": 2},
    {"name": "sam_on"},
])
def test_trainer_lean_pass_gives_the_full_pass_step(method, monkeypatch):
    """Three steps of a real ResNet-18 in float64 (SSAM-D: a lean step, a full one that
    updates the mask, a lean one): the lean pass at w and the full one give the same
    weights, BatchNorm statistics and momentum, and the lean one executes fewer FLOPs."""
    lean, m_lean = _run(_cfg(**method), monkeypatch, float64=True)
    full, m_full = _run(_cfg(**method), monkeypatch, lean=False, float64=True)
    assert lean.opt.normalize == "masked"
    for a, b in zip(lean.model.state_dict().values(), full.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    momentum = [lean.opt.base_optimizer.state[p]["momentum_buffer"] for p in lean.opt.params()]
    for a, p in zip(momentum, full.opt.params(), strict=True):
        torch.testing.assert_close(a, full.opt.base_optimizer.state[p]["momentum_buffer"], rtol=0, atol=1e-12)
    sgd = _run(_cfg(name="sgd"), monkeypatch)[1]["flops_steps_executed"]
    assert m_full["flops_steps_executed"] == pytest.approx(2 * sgd)
    assert m_lean["flops_steps_executed"] < m_full["flops_steps_executed"]
    if method["name"] in ("ssam_f", "sam_on"):  # cost-aware choices: backward stops early
        assert m_lean["flops_steps_executed"] < 1.9 * sgd
    density = m_lean["mask_density"]
    assert 0 < density < 1
    if method["name"] != "sam_on":
        assert abs(density - (1 - method["sparsity"])) < 0.15


def test_sam_on_perturbs_only_normalization_layers(monkeypatch):
    trainer, metrics = _run(_cfg(name="sam_on"), monkeypatch)
    norm = {id(p) for m in trainer.model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    for p, m in zip(trainer.opt.params(), trainer.opt.masks(), strict=True):
        assert bool(m.all()) == (id(p) in norm) and (bool(m.any()) == bool(m.all()))
    assert metrics["mask_refreshes"] == 1


def test_tensor_granularity_with_full_normalization_warns_and_stays_dense(monkeypatch):
    from ssam_tune.training.trainer import Trainer, resolve_normalize

    cfg = _cfg(name="ssam_random", granularity="tensor", normalize="full")
    lines = []
    trainer = Trainer(cfg, log=lines.append)
    assert resolve_normalize(cfg.method) == "full"
    assert any("normalize: full with granularity: tensor" in line for line in lines)
    assert list(trainer.epochs())[-1]["flops_steps_executed"] == pytest.approx(
        2 * _run(_cfg(name="sgd"), monkeypatch)[1]["flops_steps_executed"])
    assert resolve_normalize(_cfg(name="ssam_f").method) == "full"  # the paper's, element masks


@pytest.mark.slow  # inductor compiles C++ for ~8 s: make test runs it, make test-fast does not
def test_compile_gives_the_eager_step(monkeypatch):
    """train.compile on CPU (inductor): two SAM-ON steps, whose pass at w runs with
    requires_grad off for most tensors (one more graph), in float64, equal eager's."""
    torch._dynamo.reset()
    cfg = _cfg(name="sam_on", bn_second_pass="freeze")
    cfg.train.max_steps_per_epoch = 2
    eager, m_eager = _run(cfg, monkeypatch, float64=True)
    cfg.train.compile = True
    compiled, m_compiled = _run(cfg, monkeypatch, float64=True)
    from torch._dynamo.utils import counters

    assert counters["stats"]["unique_graphs"] >= 2  # really compiled: train and pass-at-w graphs
    for a, b in zip(compiled.model.state_dict().values(), eager.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    assert m_compiled["val_acc"] == m_eager["val_acc"]
    torch._dynamo.reset()


def test_a_checkpoint_spelling_out_the_old_default_normalize_still_resumes():
    from ssam_tune.train import _normalised

    assert _normalised({"method": {"normalize": "full"}}) == _normalised({})  # element: auto is full
    assert _normalised({"method": {"normalize": "full", "granularity": "tensor"}}) != _normalised(
        {"method": {"granularity": "tensor"}})


def test_a_mask_with_nothing_perturbed_steps_with_the_gradient_at_w_alone():
    """Every tensor unperturbed (a budget smaller than any tensor): e = 0, and the step uses
    the gradient of the second pass only, not the sum of both passes'."""
    model, ref = bn_net(), bn_net()
    opt = SSAM(model.parameters(), rho=RHO, sparsity=0.5, normalize="masked", lr=LR)
    opt.set_masks(whole_tensor_mask(model, set()))
    sgd = torch.optim.SGD(ref.parameters(), lr=LR)
    for x, y in data(2):
        train(model, opt, [(x, y)], skip_first_pass=True)
        sgd.zero_grad()
        loss_of(ref, x, y).backward()
        sgd.step()
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):  # (BN statistics: two passes vs one)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_cost_only_tensor_masks_read_no_fisher(embedded):
    """tensor_score cost builds its mask without the Fisher: nothing is charged for Fisher
    samples, and other seeds (other Fisher draws, other weights) give the same tensors."""
    from ssam_tune.training.config import config_from_dict
    from ssam_tune.training.trainer import Trainer

    masks = []
    for seed in (0, 1):
        cfg = config_from_dict({"seed": seed, "model": {"width": 0.0625}, "data": {"train_size": 256},
                                "train": {"epochs": 1, "batch_size": 64},
                                "method": {"name": "ssam_f", "granularity": "tensor", "tensor_score": "cost",
                                           "sparsity": 0.5, "N_F": 32}})
        trainer = Trainer(cfg, data=embedded)
        (m,) = list(trainer.epochs())
        assert m["flops_mask"] == 0.0 and m["mask_refreshes"] == 1
        masks.append([bool(x.all()) for x in trainer.opt.masks()])
    assert masks[0] == masks[1] and any(masks[0]) and not all(masks[0])
