"""The unroll engine: first-order surrogate == explicit first-order objective, second-order
gradcheck, truncation, meta-loss weights and splits, non-finite detection."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from l2o import LSTMRule, init_inner, truncate, unroll
from l2o.rules import HAND_RULES, Adam
from l2o.tasks import META, TRAIN
from l2o.tree import apply_updates
from optimizees.quadratic import QuadraticFamily, QuadraticTask
from tests.helpers import NaNTask


def _task(seed=0, b=3, d=4):
    return QuadraticFamily(dim=d, num_functions=b, dtype=torch.float64).sample(torch.Generator().manual_seed(seed))


def _lstm(seed=0, **kw):
    torch.manual_seed(seed)
    return LSTMRule(hidden_size=6, **kw).double()


def _explicit_meta_loss(rule, task, params, steps, *, first_order=True, weights=None, objective="loss"):
    """Reference: sum_t w_t mean f(theta_t), with detached (first-order) or live gradients."""
    state = rule.init(params)
    total = 0.0
    for t in range(steps):
        with torch.enable_grad():
            p = params if not first_order else {k: v.detach().requires_grad_() for k, v in params.items()}
            if not first_order and not next(iter(p.values())).requires_grad:
                p = {k: v.detach().requires_grad_() for k, v in p.items()}
            loss = task.loss(p, None).sum()
            grads = dict(zip(p, torch.autograd.grad(loss, list(p.values()), create_graph=not first_order)))
        updates, state = rule.update(grads, state, params, step=t)
        params = apply_updates(params, updates)
        w = 1.0 if weights is None else weights[t]
        f = task.loss(params, None)
        total = total + w * (torch.log(f + 1e-12).mean() if objective == "log_loss" else f.mean())
    return total


@pytest.mark.parametrize("objective", ["loss", "log_loss"])
@pytest.mark.parametrize("weights", [None, [0.0, 0.5, 0.0, 2.0, 1.0]])
def test_first_order_surrogate_equals_explicit_objective(weights, objective):
    task = _task()
    rule = _lstm(preprocess="log_sign")
    gen = torch.Generator().manual_seed(0)
    params = task.init(gen)
    result = unroll(rule, task, init_inner(rule, task, gen, params), steps=5, generator=gen, weights=weights,
                    objective=objective)
    ours = torch.autograd.grad(result.meta_loss, list(rule.parameters()))
    ref_loss = _explicit_meta_loss(rule, task, params, 5, weights=weights, objective=objective)
    ref = torch.autograd.grad(ref_loss, list(rule.parameters()))
    torch.testing.assert_close(result.meta_loss, ref_loss, rtol=1e-12, atol=0)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("objective", ["loss", "log_loss"])
def test_second_order_meta_gradient_matches_explicit(objective):
    task = _task(1)
    rule = _lstm(1)
    gen = torch.Generator().manual_seed(0)
    params = task.init(gen)
    result = unroll(rule, task, init_inner(rule, task, gen, params), steps=3, generator=gen, second_order=True,
                    objective=objective)
    ours = torch.autograd.grad(result.meta_loss, list(rule.parameters()))
    ref = torch.autograd.grad(_explicit_meta_loss(rule, task, params, 3, first_order=False, objective=objective),
                              list(rule.parameters()))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_second_order_gradcheck_wrt_lstm_weights():
    """Float64 gradcheck of the meta-loss through 3 inner steps, as a function of Φ."""
    task = _task(2, b=2, d=3)
    rule = _lstm(2, num_layers=1)
    names = [n for n, _ in rule.named_parameters()]
    base = {n: p.detach().clone() for n, p in rule.named_parameters()}

    class MetaLoss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rule = rule

        def forward(self):
            gen = torch.Generator().manual_seed(0)
            inner = init_inner(self.rule, task, gen)
            return unroll(self.rule, task, inner, steps=3, generator=gen, second_order=True).meta_loss

    module = MetaLoss()

    def meta_loss(*flat):
        return torch.func.functional_call(module, {f"rule.{n}": v for n, v in zip(names, flat)}, ())

    inputs = tuple(v.clone().requires_grad_() for v in base.values())
    assert torch.autograd.gradcheck(meta_loss, inputs)


@pytest.mark.parametrize("name", sorted(HAND_RULES))
def test_second_order_gradcheck_wrt_initial_params(name):
    """MAML's meta-gradient: d(meta-loss)/d(theta0) through 3 inner steps of every hand rule."""
    task = _task(3, b=2, d=3)
    kwargs = {"eps_root": 1e-8} if name in ("adam", "rmsprop") else {}
    rule = HAND_RULES[name](lr=0.05, **kwargs)

    def meta_loss(theta0):
        gen = torch.Generator().manual_seed(0)
        inner = init_inner(rule, task, gen, {"theta": theta0})
        return unroll(rule, task, inner, steps=3, generator=gen, second_order=True).meta_loss

    theta0 = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4)).requires_grad_()
    assert torch.autograd.gradcheck(meta_loss, (theta0,))


def test_every_lstm_weight_gets_nonzero_meta_gradient():
    task = QuadraticFamily().sample(torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    rule = LSTMRule()
    gen = torch.Generator().manual_seed(0)
    result = unroll(rule, task, init_inner(rule, task, gen), steps=20, generator=gen)
    result.meta_loss.backward()
    for name, p in rule.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name


def _has_graph(x) -> bool:
    if isinstance(x, torch.Tensor):
        return x.grad_fn is not None or x.requires_grad
    if isinstance(x, dict):
        return any(_has_graph(v) for v in x.values())
    if isinstance(x, (tuple, list)):
        return any(_has_graph(v) for v in x)
    return False


def test_truncate_detaches_everything_and_leaves_input_alone():
    task = _task()
    rule = _lstm()
    gen = torch.Generator().manual_seed(0)
    result = unroll(rule, task, init_inner(rule, task, gen), steps=4, generator=gen)
    assert _has_graph(result.inner.params) and _has_graph(result.inner.rule_state)
    cut = truncate(result.inner)
    assert not _has_graph(tuple(cut))
    assert _has_graph(result.inner.params), "truncate must not detach its input in place"
    for a, b in zip(cut.params.values(), result.inner.params.values()):
        assert torch.equal(a, b.detach())


def test_memory_stays_flat_across_truncations():
    """After truncate + backward, the previous segment's graph is freed."""
    task = QuadraticFamily(num_functions=8).sample(torch.Generator().manual_seed(0))
    rule = LSTMRule()
    gen = torch.Generator().manual_seed(0)
    inner = init_inner(rule, task, gen)
    refs = []
    for _ in range(4):
        result = unroll(rule, task, inner, steps=5, generator=gen)
        refs.append(weakref.ref(result.inner.params["theta"]))  # a tensor inside this segment's graph
        result.meta_loss.backward()
        inner = truncate(result.inner)
        del result
    gc.collect()
    assert all(r() is None for r in refs)


def test_weights_zero_only_final_term_and_losses_shape():
    task = _task(b=5)
    rule = Adam(lr=0.1)
    gen = torch.Generator().manual_seed(0)
    params = {"theta": torch.randn(5, 4, dtype=torch.float64, generator=gen).requires_grad_()}
    result = unroll(rule, task, init_inner(rule, task, gen, params), steps=4, generator=gen,
                    weights=[0, 0, 0, 1], second_order=True)
    assert result.losses.shape == (4, 5)
    torch.testing.assert_close(result.meta_loss, result.losses[-1].mean())
    assert result.inner.step == 4


class _SplitTask(QuadraticTask):
    """A quadratic whose META split reads a different target (records which splits were asked)."""

    def __init__(self, base):
        super().__init__(base.W, base.y)
        self.asked = []

    def sample_batch(self, split, generator):
        self.asked.append(split)
        return split

    def loss(self, params, batch=None):
        r = torch.bmm(self.W, params["theta"].unsqueeze(-1)).squeeze(-1) - (self.y if batch != META else 2 * self.y)
        return (r * r).sum(-1)


def test_meta_split_reads_the_meta_batch():
    task = _SplitTask(_task())
    rule = Adam(lr=0.1)
    gen = torch.Generator().manual_seed(0)
    inner = init_inner(rule, task, gen)
    result = unroll(rule, task, inner, steps=3, generator=gen, weights=[0, 0, 1], meta_split=META, second_order=True)
    assert task.asked.count(META) == 1 and task.asked.count(TRAIN) == 4
    expected = task.loss(result.inner.params, META).mean()
    torch.testing.assert_close(result.meta_loss, expected)


def test_non_finite_losses_are_reported():
    base = _task()
    task = NaNTask(base.W, base.y * 100, limit=1.0)
    rule = Adam(lr=0.5)
    gen = torch.Generator().manual_seed(0)
    result = unroll(rule, task, init_inner(rule, task, gen), steps=5, generator=gen)
    assert not result.finite
    ok = unroll(rule, base, init_inner(rule, base, gen), steps=2, generator=gen)
    assert ok.finite


@pytest.mark.parametrize("kwargs, match", [(dict(steps=0), "steps"), (dict(steps=2, weights=[1.0]), "weights"),
                                           (dict(steps=2, meta_split="test"), "meta_split"),
                                           (dict(steps=2, objective="mse"), "objective")])
def test_bad_arguments(kwargs, match):
    task = _task()
    rule = Adam()
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=match):
        unroll(rule, task, init_inner(rule, task, gen), generator=gen, **kwargs)
