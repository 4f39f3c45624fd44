"""The FF algorithm pinned with hand-computed values (mpff.ff), and the network (mpff.model):
overlay, negatives, classifiers. No MPI, no subprocesses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from synthetic import synthetic_dataset

from mpff.comm import Comm, self_comm
from mpff.config import Config, ConfigError
from mpff.executor import Executor
from mpff.ff import FFLayer, cooldown_lr, cpu_bf16_products, generator, make_adam, seed_for, train_epochs
from mpff.ffstate import FFState
from mpff.model import NUM_CLASSES, FFNet, hardest_wrong_label, label_slice, overlay, random_negatives
from mpff.plan import build_plan
from mpff.trace import Tracer
from mpff.train import train_local


def softplus(v: float) -> float:
    return math.log1p(math.exp(v))


# ------------------------------------------------------------------------------ goodness, loss

def test_goodness_mean_and_sum_by_hand():
    h = torch.tensor([[1.0, 2.0, 0.0, 3.0], [0.5, 0.0, 0.0, 0.0]])
    mean = FFLayer(3, 4, goodness="mean")
    total = FFLayer(3, 4, goodness="sum")
    assert mean.goodness(h).tolist() == [(1 + 4 + 0 + 9) / 4, 0.25 / 4]
    assert total.goodness(h).tolist() == [14.0, 0.25]


def test_threshold_is_coeff_times_units():
    assert FFLayer(4, 2000).threshold == pytest.approx(20.0)
    assert FFLayer(4, 2000, threshold_coeff=1.0).threshold == pytest.approx(2000.0)
    assert FFLayer(4, 64, threshold_coeff=0.01).threshold == pytest.approx(0.64)


def test_loss_by_hand():
    layer = FFLayer(4, 2000)  # theta = 0.01 * 2000 = 20
    g_pos = torch.tensor([18.0, 25.0, 20.0])
    g_neg = torch.tensor([21.0, 10.0, 19.5])
    expected = (softplus(20 - 18) + softplus(20 - 25) + softplus(20 - 20)
                + softplus(21 - 20) + softplus(10 - 20) + softplus(19.5 - 20)) / 6
    assert layer.loss(g_pos, g_neg).item() == pytest.approx(expected, rel=1e-6)
    # a perfectly separated pair costs almost nothing; the reverse costs about the margin
    assert layer.loss(torch.tensor([60.0]), torch.tensor([-20.0])).item() < 1e-12
    assert layer.loss(torch.tensor([0.0]), torch.tensor([40.0])).item() == pytest.approx(20.0, rel=1e-6)


def test_loss_sum_variant_by_hand():
    layer = FFLayer(4, 8, goodness="sum", threshold_coeff=1.0)  # theta = n_units = 8
    h_pos = torch.full((1, 8), 2.0)
    h_neg = torch.zeros(1, 8)
    g_pos, g_neg = layer.goodness(h_pos), layer.goodness(h_neg)
    assert g_pos.tolist() == [32.0] and g_neg.tolist() == [0.0]
    expected = (softplus(8 - 32) + softplus(0 - 8)) / 2
    assert layer.loss(g_pos, g_neg).item() == pytest.approx(expected, rel=1e-6)


# ------------------------------------------------------------------------------ layer forward

def test_forward_normalises_then_linear_then_relu():
    layer = FFLayer(6, 5, seed=3)
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(1)) * 3
    x[2] = 0.0  # an all-zero row stays finite thanks to the epsilon
    w = layer.weight.detach().double()
    b = layer.bias.detach().double()
    xd = x.double()
    rows = []
    for row in xd:
        norm = math.sqrt(sum(v * v for v in row.tolist()))
        unit = row / (norm + 1e-4)
        rows.append(torch.clamp(w @ unit + b, min=0.0))
    expected = torch.stack(rows)
    out = layer(x)
    assert out.shape == (7, 5)
    assert torch.allclose(out.double(), expected, atol=1e-6)
    assert torch.equal(out[2], torch.relu(layer.bias.detach()))
    assert (out >= 0).all()
    # forward_all (chunked, no grad) is the same computation
    assert torch.equal(layer.forward_all(x), out.detach())


def test_forward_ignores_input_scale():
    layer = FFLayer(20, 8, seed=5)
    x = torch.randn(4, 20, generator=torch.Generator().manual_seed(2))
    base = layer(x)
    for scale in (0.5, 3.0, 1000.0):
        assert torch.allclose(layer(x * scale), base, rtol=1e-3, atol=1e-5)
    # ... but a negative scale is a different direction
    assert not torch.allclose(layer(-x), base, atol=1e-3)


def test_layer_initialisation_is_seeded():
    a, b, c = FFLayer(10, 4, seed=1), FFLayer(10, 4, seed=1), FFLayer(10, 4, seed=2)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert not torch.equal(a.weight, c.weight)
    bound = 1 / math.sqrt(10)
    assert a.weight.abs().max() <= bound and a.bias.abs().max() <= bound


def test_seed_for_is_stable_and_distinguishes_parts():
    assert seed_for(1, 2, 3) == seed_for(1, 2, 3)
    assert len({seed_for(0, c, k) for c in range(20) for k in range(5)}) == 100
    assert 0 <= seed_for(2**70, -1) < 2**63


# ------------------------------------------------------------------------------ cooldown

@pytest.mark.parametrize("epochs, e, factor", [
    (100, 1, 1.0), (100, 49, 1.0), (100, 50, 1.0),
    (100, 51, 2 * 49 / 100), (100, 75, 2 * 25 / 100), (100, 99, 2 * 1 / 100), (100, 100, 0.0),
    (10, 1, 1.0), (10, 5, 1.0), (10, 6, 2 * 4 / 10), (10, 9, 2 * 1 / 10), (10, 10, 0.0),
    (5, 2, 1.0), (5, 3, 2 * 2 / 5), (1, 1, 0.0),
])
def test_cooldown_lr_to_the_letter(epochs, e, factor):
    assert cooldown_lr(0.01, e, epochs, "zero") == pytest.approx(0.01 * factor, abs=1e-15)


@pytest.mark.parametrize("epochs, e, factor", [
    (100, 50, 1.0), (100, 51, 2 * 49 / 100), (100, 99, 2 * 1 / 100), (100, 100, 2 * 1 / 100),
    (10, 5, 1.0), (10, 9, 2 * 1 / 10), (10, 10, 2 * 1 / 10),
    (5, 4, 2 * 1 / 5), (5, 5, 2 * 1 / 5), (2, 1, 1.0), (2, 2, 1.0), (1, 1, 1.0),
])
def test_cooldown_lr_holds_the_last_epochs_rate(epochs, e, factor):
    # the first author's code sets a rate only when it is positive: at e = E the rate of e - 1 stays
    assert cooldown_lr(0.01, e, epochs) == pytest.approx(0.01 * factor, abs=1e-15)
    assert cooldown_lr(0.01, e, epochs, "hold") == cooldown_lr(0.01, e, epochs)


def test_cooldown_exact_values():
    assert cooldown_lr(0.01, 1, 100) == 0.01
    assert cooldown_lr(0.01, 50, 100) == 0.01
    assert cooldown_lr(0.01, 51, 100) == pytest.approx(2 * 0.01 * 49 / 100)
    assert cooldown_lr(0.01, 100, 100, "zero") == 0.0
    assert cooldown_lr(0.01, 100, 100) == cooldown_lr(0.01, 99, 100) > 0


# ------------------------------------------------------------------------------ training

def _toy_problem(n=256, dim=12, seed=0):
    """Positives point one way, negatives another: trivially separable after normalisation."""
    g = torch.Generator().manual_seed(seed)
    base_pos = torch.zeros(dim)
    base_pos[: dim // 2] = 1.0
    base_neg = torch.zeros(dim)
    base_neg[dim // 2:] = 1.0
    x_pos = base_pos + 0.1 * torch.randn(n, dim, generator=g)
    x_neg = base_neg + 0.1 * torch.randn(n, dim, generator=g)
    return x_pos, x_neg


def _full_loss(layer: FFLayer, x_pos, x_neg) -> float:
    with torch.no_grad():
        return layer.loss(layer.goodness(layer(x_pos)), layer.goodness(layer(x_neg))).item()


def _train(layer, x_pos, x_neg, epochs, lr=0.01, batch_size=32):
    opt = layer.make_optimizer(lr)
    xn_pos, xn_neg = layer.normalize_all(x_pos), layer.normalize_all(x_neg)
    return train_epochs(layer, opt, xn_pos, xn_neg, batch_size=batch_size, lrs=[lr] * epochs,
                        seeds=[seed_for(7, e) for e in range(epochs)])


def test_train_epochs_reduces_loss_and_separates():
    x_pos, x_neg = _toy_problem()
    # theta = 8: high enough that the negatives' goodness (>= 0 after the ReLU) can sit far below it
    layer = FFLayer(12, 8, threshold_coeff=1.0, seed=4)
    before = _full_loss(layer, x_pos, x_neg)
    assert before > 1.0
    last = _train(layer, x_pos, x_neg, epochs=15, lr=0.03)
    after = _full_loss(layer, x_pos, x_neg)
    assert after < 0.01 * before
    assert after < 0.05 and last < 0.05
    with torch.no_grad():
        g_pos, g_neg = layer.goodness(layer(x_pos)), layer.goodness(layer(x_neg))
    assert (g_pos > layer.threshold).float().mean() > 0.95
    assert (g_neg < layer.threshold).float().mean() > 0.95


def test_train_epochs_returns_last_epoch_mean_loss():
    x_pos, x_neg = _toy_problem(n=100)
    layer = FFLayer(12, 8, seed=4)
    loss = _train(layer, x_pos, x_neg, epochs=1, lr=0.01, batch_size=100)
    # one batch: the returned loss is measured before the step, on the initial layer and all the data
    fresh = FFLayer(12, 8, seed=4)
    assert loss == pytest.approx(_full_loss(fresh, x_pos, x_neg), rel=1e-5)


def test_train_epochs_is_deterministic():
    x_pos, x_neg = _toy_problem(n=130)  # a ragged last batch
    runs = []
    for _ in range(2):
        layer = FFLayer(12, 8, seed=11)
        loss = _train(layer, x_pos, x_neg, epochs=3)
        runs.append((loss, layer.weight.detach().clone(), layer.bias.detach().clone()))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1]) and torch.equal(runs[0][2], runs[1][2])
    other = FFLayer(12, 8, seed=11)
    opt = other.make_optimizer(0.01)
    train_epochs(other, opt, other.normalize_all(x_pos), other.normalize_all(x_neg), batch_size=32,
                 lrs=[0.01] * 3, seeds=[seed_for(8, e) for e in range(3)])  # other shuffles
    assert not torch.equal(other.weight, runs[0][1])


@pytest.mark.parametrize("goodness", ["mean", "sum"])
def test_train_epochs_follows_the_taped_gradient_of_the_ff_loss(goodness):
    """train_epochs writes the FF loss's gradient out instead of taping it; each step must take
    the step autograd takes through relu(linear), goodness and FFLayer.loss (the definition, run
    here batch by batch with the same shuffles), to fp32 rounding, ragged last batch included."""
    x_pos, x_neg = _toy_problem(n=150)
    mine, ref = FFLayer(12, 8, goodness=goodness, seed=2), FFLayer(12, 8, goodness=goodness, seed=2)
    xp, xn = mine.normalize_all(x_pos), mine.normalize_all(x_neg)
    lrs, seeds = [0.03, 0.01], [seed_for(9, e) for e in range(2)]
    loss = train_epochs(mine, make_adam(mine.parameters(), 0.03), xp, xn, batch_size=32, lrs=lrs, seeds=seeds)
    opt, losses = make_adam(ref.parameters(), 0.03), []
    for lr, seed in zip(lrs, seeds):
        opt.param_groups[0]["lr"], losses = lr, []
        perm = torch.randperm(150, generator=generator(seed))
        for i in range(0, 150, 32):
            idx = perm[i:i + 32]
            h = F.relu(F.linear(torch.cat([xp[idx], xn[idx]]), ref.weight, ref.bias))
            g = ref.goodness(h)
            step_loss = ref.loss(g[:len(idx)], g[len(idx):])
            opt.zero_grad()
            step_loss.backward()
            opt.step()
            losses.append(float(step_loss.detach()))
    assert loss == pytest.approx(sum(losses) / len(losses), rel=1e-6)
    for a, b in zip(mine.parameters(), ref.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)
    assert float((mine.weight - FFLayer(12, 8, seed=2).weight).detach().abs().max()) > 1e-2  # it trained


def test_train_epochs_keeps_inputs_and_no_gradient_leaks():
    x_pos, x_neg = _toy_problem(n=64)
    layer = FFLayer(12, 8, seed=1)
    xn_pos, xn_neg = layer.normalize_all(x_pos), layer.normalize_all(x_neg)
    copies = xn_pos.clone(), xn_neg.clone()
    train_epochs(layer, layer.make_optimizer(0.01), xn_pos, xn_neg, batch_size=16, lrs=[0.01],
                 seeds=[1])
    assert torch.equal(xn_pos, copies[0]) and torch.equal(xn_neg, copies[1])
    assert not xn_pos.requires_grad


# ------------------------------------------------------------------------------ overlay

def _images(n=6, dim=784, seed=0):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("position", ["last", "first"])
def test_overlay_writes_one_hot(position):
    x = _images()
    labels = torch.tensor([0, 3, 9, 5, 5, 1])
    out = overlay(x, labels, position)
    sl = slice(774, 784) if position == "last" else slice(0, 10)
    assert label_slice(784, position) == sl
    expected = torch.zeros(6, 10)
    expected[torch.arange(6), labels] = 1.0
    assert torch.equal(out[:, sl], expected)
    rest = torch.ones(784, dtype=torch.bool)
    rest[sl] = False
    assert torch.equal(out[:, rest], x[:, rest])
    assert not torch.equal(x[:, sl], out[:, sl])  # the input itself is untouched (a copy)


@pytest.mark.parametrize("position", ["last", "first"])
def test_overlay_neutral(position):
    x = _images()
    out = overlay(x, None, position)
    sl = label_slice(784, position)
    assert torch.allclose(out[:, sl], torch.full((6, 10), 0.1))
    other = overlay(x, None, position, neutral_value=0.25)
    assert torch.equal(other[:, sl], torch.full((6, 10), 0.25))
    rest = torch.ones(784, dtype=torch.bool)
    rest[sl] = False
    assert torch.equal(out[:, rest], x[:, rest])


def test_overlay_into_buffer():
    x = _images()
    buf = torch.full_like(x, 7.0)
    out = overlay(x, torch.arange(6), "last", out=buf)
    assert out.data_ptr() == buf.data_ptr()
    assert torch.equal(out, overlay(x, torch.arange(6), "last"))


# ------------------------------------------------------------------------------ negatives

def test_random_negatives_never_the_true_label():
    rng = np.random.default_rng(0)
    n = 500
    y = rng.integers(0, 10, n)
    seen = set()
    for seed in range(5):
        for chapter in range(20):
            idx = np.arange(n)
            neg = random_negatives(y, idx, n, seed, 0xA4, chapter)
            assert neg.shape == (n,) and neg.dtype == np.int64
            assert ((neg >= 0) & (neg < 10)).all()
            assert (neg != y).all()
            seen |= set(zip(y.tolist(), neg.tolist()))
    # every wrong label occurs for every true label: 90 (true, wrong) pairs
    assert len(seen) == 90


def test_random_negatives_of_a_shard_match_the_whole_draw():
    rng = np.random.default_rng(1)
    n = 300
    y = rng.integers(0, 10, n)
    whole = random_negatives(y, np.arange(n), n, 3, 1)
    for shard in np.array_split(np.arange(n), 3):
        assert np.array_equal(random_negatives(y[shard], shard, n, 3, 1), whole[shard])
    assert not np.array_equal(random_negatives(y, np.arange(n), n, 3, 2), whole)


def test_hardest_wrong_label():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        n = 200
        scores = torch.randn(n, 10, generator=g)
        y = torch.randint(0, 10, (n,), generator=g)
        # half the rows: the true label has the top score
        top = scores.max(dim=1).values
        scores[: n // 2][torch.arange(n // 2), y[: n // 2]] = top[: n // 2] + 1.0
        neg = hardest_wrong_label(scores, y)
        assert (neg != y).all()
        masked = scores.clone()
        masked[torch.arange(n), y] = -float("inf")
        assert torch.equal(neg, masked.argmax(dim=1))
    # explicit rows
    scores = torch.tensor([[0.0, 5.0, 1.0, 0, 0, 0, 0, 0, 0, 0],
                           [0.0, 5.0, 1.0, 0, 0, 0, 0, 0, 0, 0],
                           [9.0, 5.0, 1.0, 0, 0, 0, 0, 0, 0, 8.0]])
    assert hardest_wrong_label(scores, torch.tensor([1, 2, 0])).tolist() == [2, 1, 9]


def _engine(negatives, classifier="goodness", shards=0, lag=0, chapters=4, dims=(784, 8, 8, 8)):
    cfg = Config().replace(
        model={"dims": dims},
        train={"epochs": chapters, "chapters": chapters, "negatives": negatives, "adaptive_lag": lag,
               "classifier": classifier, "batch_size": 32},
        data={"shards": shards},
    )
    dataset = synthetic_dataset()
    plan = build_plan(cfg, 1, n_train=dataset.x_train.shape[0])
    return FFState(cfg, plan, dataset, Tracer(None, 0, {}, enabled=False), torch.device("cpu"))


def _run(state: FFState) -> None:
    """Run the state's plan in this process, on COMM_SELF, as a one-rank job does."""
    comm = Comm(self_comm())
    try:
        Executor(state.plan, comm, state, state.tracer).run()
    finally:
        comm.free()


@pytest.mark.parametrize("negatives", ["fixed", "random"])
@pytest.mark.parametrize("shards", [0, 3])
def test_engine_negatives_never_the_true_label(negatives, shards):
    eng = _engine(negatives, shards=shards)
    per_chapter = []
    for c in range(4):
        idx = eng.shard_index[eng.plan.data_shard(c)]
        neg = eng.negatives_for(c)
        assert neg.shape == idx.shape
        assert (neg != eng.y_train[idx]).all()
        per_chapter.append(neg)
    if negatives == "fixed" and not shards:
        assert all(np.array_equal(per_chapter[0], p) for p in per_chapter)
    if negatives == "random" and not shards:
        assert not np.array_equal(per_chapter[0], per_chapter[1])


@pytest.mark.parametrize("classifier, lag, shards", [("goodness", 0, 0), ("softmax", 0, 0),
                                                     ("goodness", 1, 0), ("softmax", 1, 2)])
def test_engine_adaptive_negatives_never_the_true_label(classifier, lag, shards):
    eng = _engine("adaptive", classifier=classifier, lag=lag, shards=shards)
    _run(eng)
    # negatives were made for every chapter after the lag, by the network of chapter c-1-lag
    assert sorted(eng.neg_labels) == list(range(1 + lag, 4))
    for c in range(4):
        idx = eng.shard_index[eng.plan.data_shard(c)]
        neg = eng.negatives_for(c)
        assert neg.shape == idx.shape
        assert (neg != eng.y_train[idx]).all()
        if c > lag:
            assert neg is eng.neg_labels[c]
        else:  # before any network exists: the fixed draw
            assert np.array_equal(neg, random_negatives(eng.y_train[idx], idx, eng.n_train,
                                                        eng.cfg.train.seed, 0xF1))


def test_engine_adaptive_negatives_are_the_networks_hardest_wrong_label():
    eng = _engine("adaptive", chapters=2)
    seen = {}

    original = eng._do_negatives

    def spy(task):
        original(task)
        sh = eng.shard(0)
        scores = eng.net.goodness_scores(sh["x"])
        seen[task.chapter] = hardest_wrong_label(scores, sh["y"]).numpy()

    eng._do_negatives = spy
    _run(eng)
    assert np.array_equal(eng.neg_labels[1], seen[0])



@pytest.mark.parametrize("shards, lag, reused", [(0, 0, True), (2, 1, True), (2, 0, False)])
def test_softmax_adaptive_negatives_reuse_the_head_features(shards, lag, reused):
    """With the softmax head, the negatives task scores the training shard through the same layers
    the head task just pushed it through: it takes those features (one pass, not two) when the
    shard is the same, and its labels are exactly the ones a fresh pass gives."""
    eng = _engine("adaptive", classifier="softmax", chapters=4, shards=shards, lag=lag)
    passes, seen = [], {}
    features = eng.net.head_features

    def counting(x, check=None):
        if x is not eng.x_test:  # evaluations pass the test set
            passes.append(x.shape[0])
        return features(x, check)

    original = eng._do_negatives

    def spy(task):
        original(task)
        sh = eng.shard(eng.plan.data_shard(task.chapter + 1 + lag))
        fresh = eng.net.adaptive_negatives(sh["x"], sh["y"], "softmax").numpy()
        seen[task.chapter] = fresh
        del passes[-1]  # the spy's own pass

    eng.net.head_features = counting
    eng._do_negatives = spy
    _run(eng)
    assert seen and all(np.array_equal(eng.neg_labels[c + 1 + lag], seen[c]) for c in seen)
    heads, negs = eng.plan.num_chapters, len(seen)
    assert len(passes) == heads + (0 if reused else negs)
    assert eng._features is None  # nothing held after the negatives task


# ------------------------------------------------------------------------------ classifiers

def _net(dims=(784, 8, 8, 8), seed=0, **kw):
    return FFNet(dims, seed=seed, **kw)


def test_classifier_layers_skip_the_first():
    assert _net((784, 8, 8, 8)).classifier_layers == range(1, 3)
    assert _net((784, 8, 8, 8, 8)).classifier_layers == range(1, 4)
    assert _net((784, 8, 8)).classifier_layers == range(1, 2)
    assert _net((784, 8)).classifier_layers == range(0, 1)  # one layer: nothing else to use


def test_goodness_scores_are_summed_goodness_of_layers_two_and_up():
    net = _net()
    x = _images(5)
    scores = net.goodness_scores(x)
    assert scores.shape == (5, NUM_CLASSES)
    for label in range(NUM_CLASSES):
        acts = net.activations(overlay(x, torch.full((5,), label), "last"))
        expected = net.layers[1].goodness(acts[1]) + net.layers[2].goodness(acts[2])
        assert torch.allclose(scores[:, label], expected, rtol=1e-6)
    assert torch.equal(net.predict(x, "goodness"), scores.argmax(dim=1))


@pytest.mark.parametrize("dims,position", [((784, 8, 6, 5), "first"), ((784, 7), "last"), ((784, 9, 9), "last")])
def test_goodness_scores_share_the_first_product_and_equal_ten_overlaid_passes(dims, position, monkeypatch):
    """goodness_scores computes the first layer's product once for all ten labels (every overlay
    has the same norm); the scores equal those of ten overlaid passes through the whole network
    to fp32 rounding, with either label position, one layer or several, across chunk borders,
    and whatever the data held in the label columns."""
    import mpff.model
    net = FFNet(dims, label_position=position, seed=5)
    x = _images(11)
    x[:, label_slice(784, position)] = 3.0  # overwritten by every overlay
    monkeypatch.setattr(mpff.model, "FORWARD_CHUNK", 4)  # chunks of 4, 4 and 3
    scores = net.goodness_scores(x)
    for label in range(NUM_CLASSES):
        acts = net.activations(overlay(x, torch.full((11,), label), position))
        want = sum(net.layers[k].goodness(acts[k]) for k in net.classifier_layers)
        torch.testing.assert_close(scores[:, label], want, rtol=2e-6, atol=1e-9)
    assert len(set(scores.flatten().tolist())) > 100  # labels and samples really differ


def test_goodness_classifier_ignores_layer_one(monkeypatch):
    net = _net()
    x = _images(8)
    base = net.goodness_scores(x)

    def huge(h):  # label-dependent and enormous: would dominate if it were counted
        return h.sum(dim=1) * 1e6 + 1e9

    monkeypatch.setattr(net.layers[0], "goodness", huge)
    assert torch.equal(net.goodness_scores(x), base)
    monkeypatch.undo()
    monkeypatch.setattr(net.layers[1], "goodness", huge)
    assert not torch.allclose(net.goodness_scores(x), base)


def test_head_features_are_layers_two_and_up_on_neutral_samples():
    dims = (784, 8, 6, 5)
    net = _net(dims)
    x = _images(4)
    feats = net.head_features(x)
    assert feats.shape == (4, sum(dims[2:]))
    assert net.head.in_features == 11 and net.head.bias is None
    acts = net.activations(overlay(x, None, "last", 0.1))
    assert torch.equal(feats, torch.cat([acts[1], acts[2]], dim=1))
    # changing layer 0 changes its inputs, but layer 0's own activity is never a feature
    assert torch.equal(net.scores(x, "softmax"), net.head(feats))


def test_scores_reject_unknown_method():
    with pytest.raises(ValueError, match="unknown classifier"):
        _net().scores(_images(2), "knn")


def test_net_initialisation_is_seeded():
    a, b, c = _net(seed=1), _net(seed=1), _net(seed=2)
    for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb)
        assert not torch.equal(pa, pc)
    # layers differ from one another even with equal shapes
    assert not torch.equal(a.layers[1].weight, a.layers[2].weight)


def _final_weights(epochs: int, chapters: int, final: str) -> list[np.ndarray]:
    cfg = Config().replace(model={"dims": (784, 8, 8)},
                           train={"epochs": epochs, "chapters": chapters, "negatives": "random",
                                  "batch_size": 32, "cooldown_final": final})
    state = train_local(cfg, synthetic_dataset())
    return [p.detach().clone().numpy() for p in state.net.parameters()]


def test_engine_applies_cooldown_final():
    # one chapter of two epochs: the second runs at 2*lr*(2-2)/2 = 0 to the letter, so its
    # steps change nothing and the weights equal those of the first epoch alone
    one = _final_weights(1, 1, "hold")
    zero = _final_weights(2, 1, "zero")
    hold = _final_weights(2, 1, "hold")
    assert all(np.array_equal(a, b) for a, b in zip(one, zero))
    assert not all(np.array_equal(a, b) for a, b in zip(one, hold))


# ------------------------------------------------------------------------------ matmul precision

@pytest.mark.skipif(not cpu_bf16_products(), reason="this CPU computes no bf16 products (mpff refuses bf16 here)")
def test_bf16_products_train_in_fp32_state_and_differ_from_fp32():
    cfg = Config().replace(model={"dims": (784, 16, 16)},
                           train={"epochs": 2, "chapters": 2, "negatives": "random", "batch_size": 32})
    init = FFNet.from_config(cfg)
    fp32 = train_local(cfg, synthetic_dataset())
    bf16 = train_local(cfg.replace(train={"precision": "bf16"}), synthetic_dataset())
    for p0, a, b in zip(init.layers.parameters(), fp32.net.layers.parameters(), bf16.net.layers.parameters()):
        assert b.dtype == torch.float32  # the weights (and Adam's state) stay fp32
        assert not torch.equal(a, b)     # the products were not
        moved_fp32, moved_bf16 = float((a - p0).detach().norm()), float((b - p0).detach().norm())
        # the same training, to bf16's rounding: as far from the start, and closer to each
        # other than to it (random data: Adam's sign-like steps flip where gradients are tiny)
        assert 0.9 < moved_bf16 / moved_fp32 < 1.1
        assert float((a - b).detach().norm()) < 0.5 * moved_fp32
    assert all(st["exp_avg"].dtype == torch.float32 for opt in bf16.opts for st in opt.state.values())
    again = train_local(cfg.replace(train={"precision": "bf16"}), synthetic_dataset())
    assert all(torch.equal(a, b) for a, b in zip(bf16.net.parameters(), again.net.parameters()))


def test_bf16_on_a_cpu_without_bf16_products_is_refused(monkeypatch):
    import mpff.train
    from mpff.train import pick_device
    cfg = Config().replace(train={"precision": "bf16"}, run={"device": "cpu"})
    monkeypatch.setattr(mpff.train, "cpu_bf16_products", lambda: False)
    with pytest.raises(ConfigError, match="'bf16' needs a CPU whose oneDNN computes bf16 products"):
        pick_device(cfg, 0)
    monkeypatch.setattr(mpff.train, "cpu_bf16_products", lambda: True)
    assert pick_device(cfg, 0) == torch.device("cpu")


def test_tf32_needs_a_gpu():
    from mpff.train import pick_device
    cfg = Config().replace(train={"precision": "tf32"}, run={"device": "cpu"})
    with pytest.raises(ConfigError, match="'tf32' needs a CUDA GPU"):
        pick_device(cfg, 0)


def _exact_bf16_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """What cuBLAS does for BF16Products, on the CPU: bf16 inputs (exact in fp32), fp32 sums."""
    assert a.dtype == b.dtype == torch.bfloat16
    return a.float() @ b.float()


def test_gpu_bf16_products_round_the_inputs_of_all_three_products():
    """On a GPU, train.precision=bf16 goes through BF16Products (torch's "medium" is TF32 on
    CUDA). Its arithmetic, with an exact stand-in for cuBLAS's bf16 x bf16 -> fp32 product: the
    output and both gradients are products of bf16-rounded inputs, summed in fp32."""
    from mpff.ff import BF16Products
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 5, generator=g, requires_grad=True)
    w = torch.randn(3, 5, generator=g, requires_grad=True)
    b = torch.randn(3, generator=g, requires_grad=True)
    grad = torch.randn(8, 3, generator=g)
    y = BF16Products.apply(x, w, b, _exact_bf16_mm)
    y.backward(grad)
    r = lambda t: t.detach().to(torch.bfloat16).float()  # noqa: E731
    assert y.dtype == x.grad.dtype == w.grad.dtype == b.grad.dtype == torch.float32
    torch.testing.assert_close(y, r(x) @ r(w).T + b, rtol=1e-6, atol=1e-6)
    assert torch.equal(x.grad, r(grad) @ r(w))
    assert torch.equal(w.grad, r(grad).T @ r(x))
    assert torch.equal(b.grad, grad.sum(0))  # the bias is not a product: fp32
    assert not torch.allclose(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5)  # it did round
    # an FF layer's input is detached: no product is spent on its gradient
    x2 = x.detach()
    w.grad = None
    BF16Products.apply(x2, w, None, _exact_bf16_mm).backward(grad)
    assert x2.grad is None and torch.equal(w.grad, r(grad).T @ r(x))


def test_bf16_on_a_gpu_routes_every_product_through_bf16_products(monkeypatch):
    """matmul_precision('bf16', cuda) switches ff.linear (FF layers, softmax head, backprop MLP
    all use it) to BF16Products for CUDA tensors, keeps other fp32 products at full precision
    (not TF32), and restores both on exit; CPU tensors and CPU bf16 are untouched."""
    import mpff.ff as ff
    from mpff.model import MLP
    calls = []
    monkeypatch.setattr(ff.BF16Products, "apply", lambda *a: calls.append(len(a)) or F.linear(*a))
    net, mlp = FFNet.from_config(Config().replace(model={"dims": (784, 8, 8)})), MLP((784, 8))
    assert isinstance(net.head, ff.Linear) and all(isinstance(m, ff.Linear) for m in mlp.layers)
    x = torch.randn(4, 784)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))  # as if on the GPU
    before = torch.get_float32_matmul_precision()
    with ff.matmul_precision("bf16", torch.device("cuda", 0)):
        assert torch.get_float32_matmul_precision() == "highest"
        assert not torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
        net.layers[0](x)
        net.head(torch.randn(4, 8))
        mlp(x)
        layer = net.layers[0]
        train_epochs(layer, torch.optim.Adam(layer.parameters()), x, x.flip(0), batch_size=4, lrs=[0.01],
                     seeds=[0])
    assert calls == [3] * 6  # layer, head, the MLP's two layers, a training step's two products
    assert torch.get_float32_matmul_precision() == before and not ff._cuda_bf16
    assert torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    with ff.matmul_precision("bf16", torch.device("cpu")):  # a CPU: oneDNN's "medium"
        assert torch.get_float32_matmul_precision() == "medium"
        net.layers[0](x)
    with ff.matmul_precision("tf32", torch.device("cuda", 0)):
        assert torch.get_float32_matmul_precision() == "high"
        net.layers[0](x)
    assert calls == [3] * 6


def test_gpu_precisions_the_gpu_cannot_compute_are_refused(monkeypatch):
    """pick_device on a (pretend) GPU: the node-local rank's GPU, made current; tf32 without
    TF32 tensor cores and bf16 where the GPU or torch cannot compute bf16 products are bad input,
    not a silent fp32 (or TF32) run."""
    import mpff.train
    from mpff.train import pick_device
    current = []
    for name, value in (("is_available", lambda: True), ("device_count", lambda: 2),
                        ("set_device", current.append), ("get_device_name", lambda d=None: "Tesla V100"),
                        ("get_device_capability", lambda d=None: (7, 0))):
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(mpff.train, "cuda_bf16_products", lambda d: "Tesla V100 has no bf16 arithmetic")
    cfg = Config().replace(run={"device": "cuda"})
    assert pick_device(cfg, 3) == torch.device("cuda", 1) and current == [torch.device("cuda", 1)]
    with pytest.raises(ConfigError, match=r"'tf32' needs TF32 tensor cores \(Ampere or newer\), not Tesla V100"):
        pick_device(cfg.replace(train={"precision": "tf32"}), 0)
    with pytest.raises(ConfigError, match="'bf16': Tesla V100 has no bf16 arithmetic; use train.precision=fp32"):
        pick_device(cfg.replace(train={"precision": "bf16"}), 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    monkeypatch.setattr(mpff.train, "cuda_bf16_products", lambda d: None)
    for precision in ("tf32", "bf16"):
        assert pick_device(cfg.replace(train={"precision": precision}), 0) == torch.device("cuda", 0)
