"""The first-order tape (l2o/kernels/lstm_tape.c, l2o.rules.lstm_tape, unroll(tape=True)) and the
closed-form task gradients: the same numbers as step-by-step autograd, and the fallbacks."""

from __future__ import annotations

import pytest
import torch

from l2o import kernels
from l2o.rules import LSTMRule
from l2o.rules.lstm import _reference_step
from l2o.tree import state_leaves
from l2o.unroll import init_inner, loss_and_grads, truncate, unroll
from optimizees.quadratic import QuadraticFamily, QuadraticTask
from tests.helpers import NaNTask
from tests.test_kernels import needs_compiler, portable_library, variant  # noqa: F401 (fixtures)

pytestmark = needs_compiler


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30))


def _kernel_run(T, F, H, L, n, threads, seed=0):
    """T tape steps and the backward against float64 autograd through _reference_step."""
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(4 * H, (F if l == 0 else H) + H, generator=g) * 0.3 for l in range(L)]
    bs = [torch.randn(4 * H, generator=g) * 0.3 for _ in range(L)]
    ow, ob = torch.randn(1, H, generator=g) * 0.3, torch.randn(1, generator=g)
    h0, c0 = torch.randn(L, H, n, generator=g) * 0.5, torch.randn(L, H, n, generator=g) * 0.5
    xs, du = torch.randn(T, F, n, generator=g), torch.randn(T, n, generator=g)
    tape = kernels.lstm_tape(T, F, H, L, n, threads=threads)
    weight, bias = torch.cat([w.reshape(-1) for w in ws]), torch.cat(bs)
    tape.start(h0, c0)
    us = torch.stack([tape.forward(s + 1, xs[s], weight, bias, ow.reshape(-1), float(ob)) for s in range(T)])
    h, c = tape.state(T)
    got = tape.backward(du, weight, ow.reshape(-1))
    return us, h, c, got, (ws, bs, ow, ob, h0, c0, xs, du)


@pytest.mark.parametrize("dims", [(5, 1, 20, 2, 200), (3, 2, 7, 3, 131), (4, 2, 33, 1, 64), (2, 1, 4, 2, 5)],
                         ids=lambda d: "T{}-F{}-H{}-L{}-n{}".format(*d))
def test_tape_kernel_matches_float64_autograd(dims, variant):
    """Outputs, final state and every weight gradient of a truncation within 5e-6 (relative to the
    largest entry) of float64 autograd, for coordinate counts below, at and off the 64-wide blocks."""
    T, F, H, L, n = dims
    us, h, c, (dw, db, dow, dob), (ws, bs, ow, ob, h0, c0, xs, du) = _kernel_run(T, F, H, L, n, threads=1)
    leaves = [t.double().requires_grad_() for t in (*ws, *bs, ow, ob)]
    hs, cs = list(h0.double()), list(c0.double())
    layer_params = [t for pair in zip(leaves[:L], leaves[L:2 * L]) for t in pair]
    meta, ref_us = 0.0, []
    for s in range(T):
        out = _reference_step(xs[s].double(), hs, cs, layer_params, leaves[2 * L], leaves[2 * L + 1])
        hs, cs = list(out[1:1 + L]), list(out[1 + L:])
        ref_us.append(out[0])
        meta = meta + (out[0] * du[s].double()).sum()
    grads = torch.autograd.grad(meta, leaves)
    assert _rel(us, torch.stack(ref_us).detach()) < 5e-6
    assert _rel(h, torch.stack(hs).detach()) < 5e-6 and _rel(c, torch.stack(cs).detach()) < 5e-6
    got_w = dw.split([w.numel() for w in ws])
    for layer in range(L):
        assert _rel(got_w[layer].view(ws[layer].shape), grads[layer]) < 5e-6
    assert _rel(db, torch.cat(grads[L:2 * L])) < 5e-6
    assert _rel(dow, grads[2 * L].reshape(-1)) < 5e-6
    assert abs(float(dob) - float(grads[2 * L + 1])) < 5e-6 * float(grads[2 * L + 1].abs().clamp_min(1.0))


def test_tape_kernel_is_independent_of_the_thread_count(variant):
    """The weight gradients are summed in fixed chunks: bitwise the same on 1 and 2 threads."""
    one = _kernel_run(6, 1, 20, 2, 1000, threads=1)
    two = _kernel_run(6, 1, 20, 2, 1000, threads=2)
    for a, b in zip((one[0], one[1], one[2], *one[3]), (two[0], two[1], two[2], *two[3])):
        assert torch.equal(a, b)


CONFIGS = [
    dict(),
    dict(preprocess="log_sign", output_scale=0.1),
    dict(hidden_size=7, num_layers=3),
    dict(preprocess="rnnprop", adam_lr=0.01, momentum_lr=0.02, nesterov_lr=0.005),
]
UNROLLS = [dict(), dict(objective="log_loss"), dict(weights=[0.0, 1.0, 0.0, 2.0, 0.5])]


def _setup(kw, num_functions=13, seed=0):
    torch.manual_seed(seed)
    rule = LSTMRule(**kw)
    task = QuadraticFamily(dim=10, num_functions=num_functions).sample(torch.Generator().manual_seed(1))
    inner = init_inner(rule, task, torch.Generator().manual_seed(2))
    return rule, task, inner


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
@pytest.mark.parametrize("uk", UNROLLS, ids=["loss", "log_loss", "weights"])
def test_unroll_tape_matches_autograd(kw, uk, variant):
    """unroll(tape=True) gives the meta-loss, losses, final state and meta-gradient (every weight,
    bias and residual step size) of the step-by-step autograd path, to float32 rounding."""
    rule, task, inner = _setup(kw)
    out = {}
    for tape in (False, True):
        result = unroll(rule, task, inner, steps=5, generator=torch.Generator().manual_seed(3), tape=tape, **uk)
        out[tape] = result, torch.autograd.grad(result.meta_loss, list(rule.parameters()))
    (ref, ref_grads), (got, got_grads) = out[False], out[True]
    assert type(got.meta_loss.grad_fn).__name__ == "_TapeMetaLossBackward"  # the tape ran
    assert torch.allclose(got.meta_loss, ref.meta_loss, rtol=1e-5)
    assert torch.allclose(got.losses, ref.losses, rtol=1e-5, atol=1e-6)
    for name, a, b in zip([n for n, _ in rule.named_parameters()], got_grads, ref_grads):
        assert _rel(a, b) < 2e-5, name
    for a, b in zip(state_leaves(got.inner.rule_state), state_leaves(ref.inner.rule_state)):
        # relative to the tensor's largest entry: a momentum near zero is a difference of large
        # terms, rounded at the scale of the terms, not of the result
        assert _rel(a, b.detach()) < 1e-5
    assert got.inner.step == ref.inner.step == 5
    assert all(t.grad_fn is None for t in state_leaves(got.inner.rule_state))  # as after truncate
    assert all(t.grad_fn is None for t in got.inner.params.values())


def test_consecutive_tape_segments_match_autograd(variant):
    """Two truncations in a row (the trainer's pattern): the second segment's gradient matches too."""
    rule, task, inner = _setup({})
    grads = {}
    for tape in (False, True):
        state = inner
        for _ in range(2):
            result = unroll(rule, task, state, steps=4, generator=torch.Generator().manual_seed(5), tape=tape)
            state = truncate(result.inner)
        grads[tape] = torch.autograd.grad(result.meta_loss, list(rule.parameters()))
    for a, b in zip(grads[True], grads[False]):
        assert _rel(a, b) < 2e-5


def test_tape_is_not_used_where_it_cannot_be():
    """Second order, params with a graph, fused=False, float64 rules and disabled kernels all take
    the autograd path (same results as tape=False)."""
    def grad_fn_name(rule, task, inner, **kw):
        result = unroll(rule, task, inner, steps=3, generator=torch.Generator().manual_seed(0), tape=True, **kw)
        return type(result.meta_loss.grad_fn).__name__

    rule, task, inner = _setup({})
    assert grad_fn_name(rule, task, inner) == "_TapeMetaLossBackward"
    assert grad_fn_name(rule, task, inner, second_order=True) != "_TapeMetaLossBackward"
    with_graph = inner._replace(params={"theta": inner.params["theta"].clone().requires_grad_()})
    assert grad_fn_name(rule, task, with_graph) != "_TapeMetaLossBackward"
    assert LSTMRule(fused=False).tape(inner.params, LSTMRule(fused=False).init(inner.params), 3) is None
    rule64 = LSTMRule().double()
    assert rule64.tape(inner.params, rule64.init(inner.params), 3) is None
    kernels.set_enabled(False)
    try:
        assert rule.tape(inner.params, rule.init(inner.params), 3) is None
        assert grad_fn_name(rule, task, inner) != "_TapeMetaLossBackward"
    finally:
        kernels.set_enabled(True)


def test_tape_misuse_gives_clear_errors():
    rule, task, inner = _setup({})
    with pytest.raises(ValueError, match="steps"):
        rule.tape(inner.params, inner.rule_state, 0)
    with pytest.raises(ValueError, match="coordinates"):
        rule.tape({"theta": torch.zeros(3, 10)}, inner.rule_state, 2)
    tape = rule.tape(inner.params, inner.rule_state, 1)
    _, grads = loss_and_grads(task, inner.params, None)
    with pytest.raises(RuntimeError, match="needs all 1 steps; 0 were taken"):
        tape.backward(torch.zeros(1, 130))
    tape.step(grads, inner.params, step=0)
    with pytest.raises(RuntimeError, match="all have been taken"):
        tape.step(grads, inner.params, step=1)
    result = unroll(rule, task, inner, steps=2, generator=torch.Generator(), tape=True)
    result.meta_loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already backpropagated"):
        result.meta_loss.backward()


def test_meta_train_runs_on_the_tape(monkeypatch):
    """The meta-trainer asks for the tape on every truncation (and the tape's backward runs)."""
    from l2o.meta import MetaTrainConfig, meta_train
    from l2o.rules import lstm_tape

    calls = []
    original = lstm_tape.LSTMTape.backward
    monkeypatch.setattr(lstm_tape.LSTMTape, "backward", lambda self, du: calls.append(du.shape) or original(self, du))
    rule = LSTMRule(hidden_size=4)
    config = MetaTrainConfig(epochs=1, horizon=6, truncation=3, validate_every=0, seed=0)
    meta_train(rule, QuadraticFamily(dim=3, num_functions=4), config, progress=False)
    assert calls == [(3, 12), (3, 12)]


def test_quadratic_closed_form_gradient_matches_autograd():
    task = QuadraticFamily(dim=7, num_functions=5, dtype=torch.float64).sample(torch.Generator().manual_seed(0))
    params = {"theta": torch.randn(5, 7, dtype=torch.float64)}
    loss, grads = task.loss_and_grads(params)
    theta = params["theta"].clone().requires_grad_()
    want_loss = task.loss({"theta": theta})
    (want,) = torch.autograd.grad(want_loss.sum(), theta)
    assert torch.allclose(loss, want_loss.detach(), rtol=1e-13) and torch.allclose(grads["theta"], want, rtol=1e-12)
    got_loss, got = loss_and_grads(task, params, None)  # the engine uses it
    assert torch.equal(got["theta"], grads["theta"]) and torch.equal(got_loss, loss)


def test_a_subclass_redefining_loss_gets_autograd_not_the_parents_closed_form():
    base = QuadraticFamily(dim=4, num_functions=3).sample(torch.Generator().manual_seed(0))

    class Scaled(QuadraticTask):
        def loss(self, params, batch=None):
            return 3.0 * super().loss(params, batch)

    task = Scaled(base.W, base.y)
    params = {"theta": torch.randn(3, 4)}
    _, grads = loss_and_grads(task, params, None)
    assert torch.allclose(grads["theta"], 3.0 * base.loss_and_grads(params)[1]["theta"], rtol=1e-6)
    nan_task = NaNTask(base.W, base.y, limit=0.0)  # the test suite's exploding quadratic
    loss, grads = loss_and_grads(nan_task, params, None)
    assert torch.isnan(loss).all() and torch.isnan(grads["theta"]).all()
