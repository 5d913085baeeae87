"""Masks: Fisher scores against a batch-size-1 loop, top-k, SSAM-D updates, schedule, stats."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssam_tune.method import masks as M


class ConvNet(nn.Module):
    """Conv (grouped, strided) + BatchNorm + Linear, with in-place ops after hooked layers."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.b1 = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False, groups=2)
        self.b2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = self.b2(self.c2(x))
        x = torch.relu_(x)  # in place on a layer output
        return self.fc(x.mean((2, 3)))


class LayerNormNet(nn.Module):
    """A layer the per-layer path does not know: the torch.func path takes over."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.ln = nn.LayerNorm(8)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(torch.tanh(self.ln(self.fc1(x))))


def seeded_convnet():
    torch.manual_seed(0)
    model = ConvNet().double()
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 3, 8, 8, dtype=torch.float64))  # non-trivial running stats
    return model


def loop_reference(model, x, y, bn):
    """Batch-size-1 loop: the reference's semantics (train mode) or eval-mode statistics."""
    work = copy.deepcopy(model).train(bn == "per_sample")
    acc = [torch.zeros_like(p) for p in work.parameters()]
    for i in range(x.shape[0]):
        work.zero_grad()
        F.cross_entropy(work(x[i:i + 1]), y[i:i + 1]).backward()
        for a, p in zip(acc, work.parameters(), strict=True):
            if p.grad is not None:
                a += p.grad ** 2
    return acc


def assert_scores_close(got, ref):
    scale = max(float(r.abs().max()) for r in ref)
    for g, r in zip(got, ref, strict=True):
        assert g.shape == r.shape
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12 * scale)


def data(n, seed=1, shape=(3, 8, 8), classes=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, *shape, generator=g, dtype=torch.float64),
            torch.randint(0, classes, (n,), generator=g))


@pytest.mark.parametrize("bn", ["per_sample", "eval"])
@pytest.mark.parametrize("method", ["layers", "vmap"])
@pytest.mark.parametrize("n_f", [1, 7, 10])
def test_fisher_equals_batch1_loop(bn, method, n_f):
    model = seeded_convnet()
    x, y = data(n_f)
    got = M.fisher_scores(model, nn.CrossEntropyLoss(), x, y, bn=bn, method=method, chunk_size=3)
    assert_scores_close(got, loop_reference(model, x, y, bn))


def test_per_sample_and_eval_modes_differ():
    model = seeded_convnet()
    x, y = data(6)
    a = M.fisher_scores(model, None, x, y, bn="per_sample")
    b = M.fisher_scores(model, None, x, y, bn="eval")
    assert any(not torch.allclose(u, v) for u, v in zip(a, b, strict=True))


def test_fisher_is_not_square_of_batch_gradient():
    model = seeded_convnet()
    x, y = data(6)
    work = copy.deepcopy(model).eval()
    F.cross_entropy(work(x), y, reduction="sum").backward()
    batch_sq = [p.grad ** 2 for p in work.parameters()]
    got = M.fisher_scores(model, None, x, y, bn="eval")
    assert any(not torch.allclose(u, v) for u, v in zip(got, batch_sq, strict=True))


def test_fisher_independent_of_reduction_and_smoothing():
    model = seeded_convnet()
    x, y = data(5)
    ref = M.fisher_scores(model, nn.CrossEntropyLoss(reduction="sum"), x, y)
    for loss_fn in (nn.CrossEntropyLoss(), nn.CrossEntropyLoss(label_smoothing=0.1),
                    lambda logits, t: F.cross_entropy(logits, t, reduction="mean")):
        assert_scores_close(M.fisher_scores(model, loss_fn, x, y), ref)


def test_fisher_leaves_model_untouched():
    for training in (True, False):
        model = seeded_convnet().train(training)
        x, y = data(4)
        F.cross_entropy(model(x), y).backward()  # existing .grad must survive
        state = copy.deepcopy(model.state_dict())
        grads = [p.grad.clone() for p in model.parameters()]
        for bn in ("per_sample", "eval"):
            for method in ("layers", "vmap"):
                M.fisher_scores(model, None, x, y, bn=bn, method=method)
        assert model.training is training
        assert all(m.training is training for m in model.modules())
        for k, v in model.state_dict().items():
            assert torch.equal(v, state[k]), k
        for p, g in zip(model.parameters(), grads, strict=True):
            assert torch.equal(p.grad, g)


def test_unsupported_layer_falls_back_to_vmap():
    torch.manual_seed(0)
    model = LayerNormNet().double()
    x, y = data(5, shape=(6,), classes=4)
    got = M.fisher_scores(model, None, x, y, bn="eval")
    assert_scores_close(got, loop_reference(model, x, y, "eval"))
    with pytest.raises(ValueError, match="method='layers'"):
        M.fisher_scores(model, None, x, y, bn="eval", method="layers")


def test_fisher_rejects_bad_arguments():
    model = seeded_convnet()
    x, y = data(2)
    with pytest.raises(ValueError, match="bn='train'"):
        M.fisher_scores(model, None, x, y, bn="train")
    with pytest.raises(ValueError, match="N_F >= 1"):
        M.fisher_scores(model, None, x[:0], y[:0])


def test_fisher_mask_in_float32_overlaps_float64():
    model = seeded_convnet()
    x, y = data(8)
    s64 = M.fisher_scores(model, None, x, y)
    s32 = M.fisher_scores(model.float(), None, x.float(), y)
    # float32 scores are the float64 reference to float32 accuracy, whatever kernels a CPU uses
    scale = max(float(s.abs().max()) for s in s64)
    rtol, atol = 1e-4, 1e-6 * scale
    for a, b in zip(s32, s64, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol)
    m64, m32 = M.topk_mask(s64, 0.5), M.topk_mask(s32, 0.5)
    # Hence the masks can differ only on scores within that tolerance of the k-th largest one
    # (no CPU can move a score across the cut from further away); there are few of them here.
    flat = torch.cat([s.flatten() for s in s64])
    kth = flat.sort(descending=True).values[M.num_perturbed(flat.numel(), 0.5) - 1]
    near = (flat - kth).abs() <= 3 * (rtol * kth + atol)
    differ = torch.cat([m.flatten() for m in m32]) != torch.cat([m.flatten() for m in m64])
    assert not (differ & ~near).any()
    assert int(near.sum()) <= 6, int(near.sum())  # at most 3 swaps of 137 perturbed weights
    assert M.mask_stats(m32, m64)["overlap"] > 0.95


# -- top-k ---------------------------------------------------------------------------------
@pytest.mark.parametrize("s", [0.0, 0.5, 0.9, 0.99, 0.3333])
def test_topk_exact_count_and_largest(s):
    g = torch.Generator().manual_seed(0)
    scores = [torch.rand(10, 10, generator=g), torch.rand(37, generator=g), torch.rand(3, 1, generator=g)]
    d = 140
    masks = M.topk_mask(scores, s)
    k = math.floor(round((1 - s) * d, 9))
    assert sum(int(m.sum()) for m in masks) == k
    assert all(m.dtype == torch.bool and m.shape == t.shape for m, t in zip(masks, scores, strict=True))
    flat = torch.cat([t.flatten() for t in scores])
    chosen = torch.cat([m.flatten() for m in masks])
    if 0 < k < d:
        assert flat[chosen].min() > flat[~chosen].max()  # one global top-k


def test_num_perturbed_round_off():
    assert M.num_perturbed(100, 0.9) == 10  # (1 - 0.9) * 100 = 9.999999999999998 in binary
    assert M.num_perturbed(101, 0.5) == 50
    with pytest.raises(ValueError, match="sparsity=1.0"):
        M.num_perturbed(10, 1.0)


def test_random_mask_exact_and_seeded():
    like = [torch.empty(13, 7), torch.empty(29)]
    a = M.random_mask(like, 0.75, generator=torch.Generator().manual_seed(5))
    b = M.random_mask(like, 0.75, generator=torch.Generator().manual_seed(5))
    assert sum(int(m.sum()) for m in a) == math.floor(0.25 * 120)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


# -- SSAM-D ------------------------------------------------------------------------------------
def test_f_decay_is_eq9():
    assert M.f_decay(0, 10, 0.5) == pytest.approx(0.5)
    assert M.f_decay(5, 10, 0.5) == pytest.approx(0.25)
    assert M.f_decay(10, 10, 0.5) == pytest.approx(0.0)
    assert M.f_decay(2, 10, 0.4) == pytest.approx(0.2 * (1 + math.cos(math.pi * 0.2)))
    with pytest.raises(ValueError, match="alpha=1.5"):
        M.f_decay(0, 10, 1.5)


@pytest.mark.parametrize("s", [0.05, 0.2, 0.5, 0.9])
@pytest.mark.parametrize("strategy", ["flattest", "random", "sharpest"])
def test_dynamic_density_exact_after_many_updates(s, strategy):
    # s = 0.05 and 0.2 are below alpha / (1 + alpha) = 1/3: the drop count is capped.
    g = torch.Generator().manual_seed(0)
    like = [torch.empty(31, 5), torch.empty(17)]
    d = 172
    masks = M.random_mask(like, s, generator=g)
    for t in range(40):
        grads = [torch.randn(t_.shape, generator=g) for t_ in like]
        masks = M.dynamic_mask_update(masks, grads, sparsity=s, t=t % 10, total=10, alpha=0.5,
                                      strategy=strategy, generator=g)
        assert sum(int(m.sum()) for m in masks) == M.num_perturbed(d, s)


@pytest.mark.parametrize("s", [0.1, 0.5, 0.8])
def test_flattest_drops_smallest_gradients_and_grows_among_unperturbed(s):
    g = torch.Generator().manual_seed(1)
    like = [torch.empty(20, 10), torch.empty(50)]
    d = 250
    masks = M.random_mask(like, s, generator=g)
    grads = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in like]  # distinct |g|
    t, total, alpha = 3, 10, 0.5
    new = M.dynamic_mask_update(masks, grads, sparsity=s, t=t, total=total, alpha=alpha, generator=g)
    old_f = torch.cat([m.flatten() for m in masks])
    new_f = torch.cat([m.flatten() for m in new])
    absg = torch.cat([x.flatten() for x in grads]).abs()
    k = M.num_perturbed(d, s)
    n_drop = min(math.floor(M.f_decay(t, total, alpha) * (1 - s) * d), d - k)
    dropped = old_f & ~new_f
    grown = new_f & ~old_f
    assert int(dropped.sum()) == n_drop == int(grown.sum())
    # dropped = the n_drop smallest |g| among the previously perturbed entries
    perturbed_idx = old_f.nonzero().flatten()
    expect = perturbed_idx[absg[perturbed_idx].argsort()[:n_drop]]
    assert set(dropped.nonzero().flatten().tolist()) == set(expect.tolist())
    assert not (grown & old_f).any()  # grown only among the previously unperturbed


def test_sharpest_drops_largest_and_random_drops_only_perturbed():
    g = torch.Generator().manual_seed(2)
    like = [torch.empty(100)]
    masks = M.random_mask(like, 0.5, generator=g)
    grads = [torch.randn(100, generator=g)]
    new = M.dynamic_mask_update(masks, grads, sparsity=0.5, t=0, total=10, alpha=0.2, strategy="sharpest",
                                generator=g)
    dropped = masks[0] & ~new[0]
    absg = grads[0].abs()
    kept_old = masks[0] & new[0]
    assert absg[dropped].min() > absg[kept_old].max()
    new_r = M.dynamic_mask_update(masks, grads, sparsity=0.5, t=0, total=10, alpha=0.2, strategy="random",
                                  generator=g)
    assert int((masks[0] & ~new_r[0]).sum()) == 10
    with pytest.raises(ValueError, match="strategy='widest'"):
        M.dynamic_mask_update(masks, grads, sparsity=0.5, t=0, total=10, strategy="widest")


def test_dynamic_update_with_none_grads_treats_them_as_flat():
    like = [torch.empty(10), torch.empty(10)]
    masks = [torch.ones(10, dtype=torch.bool), torch.zeros(10, dtype=torch.bool)]
    grads = [None, torch.randn(10)]
    new = M.dynamic_mask_update(masks, grads, sparsity=0.5, t=0, total=10, alpha=0.5,
                                generator=torch.Generator().manual_seed(0))
    assert int(new[0].sum()) == 5 and int(new[1].sum()) == 5
    del like


# -- schedule and statistics -----------------------------------------------------------------
def test_schedule_epochs_steps_and_fixed():
    every2 = M.MaskSchedule(interval=2)
    due = [(e, s) for e in range(5) for s in range(3) if every2.due(e, s, e * 3 + s)]
    assert due == [(0, 0), (2, 0), (4, 0)]
    assert every2.count(5, 3) == 3
    steps = M.MaskSchedule(interval=4, unit="step")
    assert [gs for gs in range(12) if steps.due(gs // 3, gs % 3, gs)] == [0, 4, 8]
    assert steps.count(4, 3) == 3
    fixed = M.MaskSchedule(fixed=True)
    assert [gs for gs in range(9) if fixed.due(gs // 3, gs % 3, gs)] == [0]
    assert fixed.count(3, 3) == 1
    with pytest.raises(ValueError, match="interval=0"):
        M.MaskSchedule(interval=0)
    with pytest.raises(ValueError, match="unit='batch'"):
        M.MaskSchedule(unit="batch")


def test_mask_stats():
    a = [torch.tensor([True, True, False, False]), torch.tensor([True, False])]
    b = [torch.tensor([True, False, True, False]), torch.tensor([True, False])]
    st = M.mask_stats(a, b)
    assert st["density"] == pytest.approx(0.5)
    assert st["per_layer"] == [0.5, 0.5]
    assert st["overlap"] == pytest.approx(2 / 3)
    assert M.mask_stats(a)["overlap"] is None

