"""The coordinate-wise LSTM rule: conformance, fused == reference, and its symmetries."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from l2o.rules import LSTMRule
from l2o.rules import lstm as lstm_module
from l2o.rules.lstm import _FusedLSTMStep
from l2o.rules.preprocess import RNNPROP_BETAS, RNNPROP_EPS, rnnprop_inputs, num_features, preprocess
from tests.conformance import check_rule

CONFIGS = [
    dict(),
    dict(preprocess="log_sign"),
    dict(hidden_size=7, num_layers=3, output_scale=0.1),
    dict(num_layers=1, preprocess="log_sign", preprocess_p=5.0),
    dict(fused=False),
    dict(preprocess="rnnprop", hidden_size=6),
]


def _rule(seed: int = 0, **kw) -> LSTMRule:
    torch.manual_seed(seed)
    return LSTMRule(**kw).double()


def _random(shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) * scale


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
def test_conformance(kw):
    check_rule(_rule(**kw))


@pytest.mark.parametrize("layers", [1, 2, 3])
@pytest.mark.parametrize("prep", ["none", "log_sign"])
def test_fused_step_gradcheck(layers, prep):
    rule = _rule(num_layers=layers, hidden_size=5, preprocess=prep)
    n, f = 6, num_features(prep)
    x = _random((f, n), 1).requires_grad_()
    states = [_random((5, n), 2 + i).requires_grad_() for i in range(2 * layers)]
    lp = [t for pair in zip(rule.weights, rule.biases) for t in pair]
    inputs = (x, *states, *lp, rule.out_weight, rule.out_bias)
    assert torch.autograd.gradcheck(lambda x, *r: _FusedLSTMStep.apply(x, layers, *r), inputs)


@pytest.mark.parametrize("kw", CONFIGS[:4])
def test_fused_matches_reference_over_steps(kw):
    """Values and meta-gradients of the fused step equal the plain-autograd reference."""
    fused = _rule(**kw)
    ref = _rule(**{**kw, "fused": False})
    ref.load_state_dict(fused.state_dict())
    params = {"a": _random((4, 3), 3), "b": _random((5,), 4)}
    outs = []
    for rule in (fused, ref):
        state = rule.init(params)
        total = 0.0
        for t in range(4):
            grads = {k: _random(v.shape, 10 + t) for k, v in params.items()}
            updates, state = rule.update(grads, state, params, step=t)
            total = total + sum((u * (t + 1)).sum() for u in updates.values()) + state.cell[-1].sum()
        outs.append((total, torch.autograd.grad(total, list(rule.parameters()))))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-12, atol=1e-12)
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kw", [*CONFIGS[:4], CONFIGS[5], dict(preprocess="rnnprop", adam_lr=0.01),
                                dict(preprocess="rnnprop", momentum_lr=0.5),
                                dict(preprocess="log_sign", nesterov_lr=0.3, nesterov_momentum=0.8)],
                         ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
@pytest.mark.parametrize("block", [1, 7, 64])
def test_in_place_update_equals_update_over_steps(kw, block, monkeypatch):
    """update_ (blocked, in place; what the drop-in optimizer calls) gives update's updates and
    state over several steps, whatever the block size (one column, ragged last block, one block)."""
    monkeypatch.setattr(lstm_module, "BLOCK_COLUMNS", block)
    rule = _rule(**kw)
    params = {"a": _random((4, 3), 3), "b": _random((5,), 4), "c": _random((0,), 5)}
    state_ref = rule.init(params)
    state = rule.init(params)
    for t in range(5):
        grads = {k: _random(v.shape, 10 + t, scale=10.0 ** (t - 2)) for k, v in params.items()}
        with torch.no_grad():
            expected, state_ref = rule.update(grads, state_ref, params, step=t)
        buffers = [*state.hidden, *state.cell]
        updates, state = rule.update_(grads, state, params, step=t)
        assert all(a is b for a, b in zip(buffers, [*state.hidden, *state.cell]))  # overwritten, not reallocated
        for k in params:
            assert updates[k].shape == params[k].shape and updates[k].dtype == params[k].dtype
            torch.testing.assert_close(updates[k], expected[k], rtol=1e-12, atol=1e-14)
        for a, b in zip([*state.hidden, *state.cell, *state.moments],
                        [*state_ref.hidden, *state_ref.cell, *state_ref.moments]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        assert float(state.cell[0].abs().max()) > 0


def test_in_place_update_float32_and_refuses_mismatched_state():
    """In float32 the blocked step agrees with the fused one to float rounding; a state of another
    dtype is refused with a message (the fused path would fail inside torch.mm)."""
    torch.manual_seed(0)
    rule = LSTMRule()
    params = {"w": torch.zeros(5000)}
    grads = {"w": torch.randn(5000) * 1e-2}
    with torch.no_grad():
        expected, ref = rule.update(grads, rule.init(params), params, step=0)
    updates, state = rule.update_(grads, rule.init(params), params, step=0)
    torch.testing.assert_close(updates["w"], expected["w"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(state.cell[1], ref.cell[1], rtol=1e-5, atol=1e-7)
    wrong = rule.init(params)
    wrong = type(wrong)(tuple(h.double() for h in wrong.hidden), wrong.cell)
    with pytest.raises(ValueError, match="state tensors are torch.float64"):
        rule.update_(grads, wrong, params, step=0)


def test_zero_init_output_proposes_no_update():
    rule = _rule(zero_init_output=True)
    params = {"w": _random((3, 3), 0)}
    updates, _ = rule.update({"w": _random((3, 3), 1)}, rule.init(params), params, step=0)
    assert torch.count_nonzero(updates["w"]) == 0
    assert torch.count_nonzero(rule.weights[0]) > 0


def test_float32_rule_drives_float64_params():
    torch.manual_seed(0)
    rule = LSTMRule()
    params = {"w": _random((3,), 0)}
    updates, state = rule.update({"w": _random((3,), 1)}, rule.init(params), params, step=0)
    assert updates["w"].dtype == torch.float64 and state.hidden[0].dtype == torch.float32


@pytest.mark.parametrize("bad", [dict(hidden_size=0), dict(num_layers=-1), dict(hidden_size=2.5),
                                 dict(preprocess="adam"), dict(output_scale=0.0), dict(preprocess_p=-1.0)])
def test_bad_arguments(bad):
    with pytest.raises((ValueError, TypeError), match=next(iter(bad))):
        LSTMRule(**bad)


def test_state_of_other_params_is_refused():
    rule = _rule()
    state = rule.init({"w": _random((3,), 0)})
    with pytest.raises(ValueError, match="rule.init"):
        rule.update({"w": _random((4,), 1)}, state, {"w": _random((4,), 2)}, step=0)


def _run(rule, params, grad_seq):
    state = rule.init(params)
    out = []
    for t, grads in enumerate(grad_seq):
        updates, state = rule.update(grads, state, params, step=t)
        out.append(updates)
    return out


shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)


@settings(max_examples=25, deadline=None)
@given(shape_a=shapes, shape_b=shapes, seed=st.integers(0, 2**16), prep=st.sampled_from(["none", "log_sign", "rnnprop"]))
def test_separable_per_tensor(shape_a, shape_b, seed, prep):
    """Running two tensors together equals running each alone (no interaction between rows)."""
    rule = _rule(seed=1, preprocess=prep, hidden_size=6)
    params = {"a": _random(shape_a, seed), "b": _random(shape_b, seed + 1)}
    grad_seq = [{k: _random(v.shape, seed + 10 * t + i) for i, (k, v) in enumerate(params.items())} for t in range(3)]
    together = _run(rule, params, grad_seq)
    for k in params:
        alone = _run(rule, {k: params[k]}, [{k: g[k]} for g in grad_seq])
        for t in range(3):
            assert together[t][k].shape == params[k].shape and together[t][k].dtype == params[k].dtype
            torch.testing.assert_close(together[t][k], alone[t][k], rtol=1e-12, atol=1e-14)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), seed=st.integers(0, 2**16))
@pytest.mark.parametrize("prep", ["none", "rnnprop"])
def test_permutation_equivariant(n, seed, prep):
    """Permuting coordinates permutes the updates the same way."""
    rule = _rule(seed=2, hidden_size=6, preprocess=prep)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    params = {"w": _random((n,), seed)}
    grad_seq = [{"w": _random((n,), seed + t + 1)} for t in range(3)]
    plain = _run(rule, params, grad_seq)
    permuted = _run(rule, {"w": params["w"][perm]}, [{"w": g["w"][perm]} for g in grad_seq])
    for a, b in zip(plain, permuted):
        torch.testing.assert_close(a["w"][perm], b["w"], rtol=1e-12, atol=1e-14)


@settings(max_examples=40, deadline=None)
@given(exponent=st.integers(-30, 30), sign=st.sampled_from([-1.0, 1.0]), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_log_sign_finite_for_extreme_gradients(exponent, sign, dtype):
    torch.manual_seed(0)
    rule = LSTMRule(preprocess="log_sign").to(dtype)
    params = {"w": torch.zeros(5, dtype=dtype)}
    grads = {"w": torch.full((5,), sign * 10.0 ** exponent, dtype=dtype)}
    state = rule.init(params)
    for t in range(3):
        updates, state = rule.update(grads, state, params, step=t)
        assert torch.isfinite(updates["w"]).all()
    stored = grads["w"].double()
    x = preprocess(stored, "log_sign", 10.0)
    assert x.abs().max() <= max(1.0, abs(math.log(stored.abs()[0].item())) / 10.0) + 1e-12


def test_log_sign_matches_paper_formula():
    g = torch.tensor([3.0, -1e-2, 1e-6, -1e-8, 0.0], dtype=torch.float64)
    x = preprocess(g, "log_sign", 10.0)
    thr = math.exp(-10.0)
    for j, v in enumerate(g.tolist()):
        if abs(v) >= thr:
            expected = (math.log(abs(v)) / 10.0, math.copysign(1.0, v))
        else:
            expected = (-1.0, math.exp(10.0) * v)
        assert x[0, j].item() == pytest.approx(expected[0]) and x[1, j].item() == pytest.approx(expected[1])


def test_rnnprop_inputs_match_adam_formula_and_are_scale_invariant():
    g_seq = [_random((7,), 40 + t) for t in range(4)]
    m = torch.zeros(7, dtype=torch.float64)
    v = torch.zeros(7, dtype=torch.float64)
    m_ref = torch.zeros(7, dtype=torch.float64)
    v_ref = torch.zeros(7, dtype=torch.float64)
    b1, b2 = RNNPROP_BETAS
    for t, g in enumerate(g_seq):
        m_prev, v_prev = m, v
        x, m, v = rnnprop_inputs(g, m, v, t)
        m_ref = b1 * m_ref + (1 - b1) * g
        v_ref = b2 * v_ref + (1 - b2) * g * g
        denom = (v_ref / (1 - b2 ** (t + 1))).sqrt() + RNNPROP_EPS
        torch.testing.assert_close(v * v, v_ref, rtol=1e-12, atol=0)
        torch.testing.assert_close(x[0], m_ref / (1 - b1 ** (t + 1)) / denom, rtol=1e-12, atol=0)
        torch.testing.assert_close(x[1], g / denom, rtol=1e-12, atol=0)
        # the same gradients scaled by 1e4 give (up to eps) the same inputs
        xs, _, _ = rnnprop_inputs(g * 1e4, m_prev * 1e4, v_prev * 1e4, t)
        torch.testing.assert_close(xs, x, rtol=1e-6, atol=1e-9)
    assert x.abs().max() <= 1.0 / math.sqrt(1 - b2) + 1e-9


@pytest.mark.parametrize("exponent", [-30, -10, 0, 10, 30])
def test_rnnprop_finite_for_extreme_gradients(exponent):
    rule = _rule(preprocess="rnnprop", hidden_size=4).float()
    params = {"w": torch.zeros(5)}
    state = rule.init(params)
    for t in range(3):
        updates, state = rule.update({"w": torch.full((5,), 10.0 ** exponent)}, state, params, step=t)
        assert torch.isfinite(updates["w"]).all()


def test_adam_residual_conforms_starts_as_adam_and_learns_its_step_size():
    check_rule(_rule(preprocess="rnnprop", hidden_size=5, adam_lr=0.01))
    rule = _rule(preprocess="rnnprop", hidden_size=5, adam_lr=0.01, zero_init_output=True)
    params = {"w": _random((6,), 50)}
    state = rule.init(params)
    m = torch.zeros(6, dtype=torch.float64)
    v = torch.zeros(6, dtype=torch.float64)
    b1, b2 = RNNPROP_BETAS
    total = 0.0
    for t in range(3):
        g = _random((6,), 60 + t)
        updates, state = rule.update({"w": g}, state, params, step=t)
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        eta = float(rule.log_adam_lr.detach().exp())  # 0.01 up to the float32 rounding of its log
        assert abs(eta - 0.01) < 1e-8
        expected = -eta * (m / (1 - b1 ** (t + 1))) / ((v / (1 - b2 ** (t + 1))).sqrt() + RNNPROP_EPS)
        torch.testing.assert_close(updates["w"], expected, rtol=1e-10, atol=1e-14)
        total = total + updates["w"].sum()
    total.backward()
    assert rule.log_adam_lr.grad is not None and rule.log_adam_lr.grad.abs() > 0
    with pytest.raises(ValueError, match="adam_lr needs preprocess='rnnprop'"):
        LSTMRule(adam_lr=0.01)
    assert "adam_lr" not in LSTMRule().config()  # configs of older checkpoints stay valid


def test_momentum_residual_conforms_starts_as_momentum_sgd_and_learns_its_step_size(tmp_path):
    check_rule(_rule(preprocess="rnnprop", hidden_size=5, momentum_lr=0.5))
    rule = _rule(preprocess="rnnprop", hidden_size=5, momentum_lr=0.5, zero_init_output=True)
    params = {"w": _random((6,), 50)}
    state = rule.init(params)
    m = torch.zeros(6, dtype=torch.float64)
    b1 = RNNPROP_BETAS[0]
    total = 0.0
    for t in range(3):
        g = _random((6,), 60 + t)
        updates, state = rule.update({"w": g}, state, params, step=t)
        m = b1 * m + (1 - b1) * g
        eta = float(rule.log_momentum_lr.detach().exp())
        assert abs(eta - 0.5) < 1e-7
        torch.testing.assert_close(updates["w"], -eta * m / (1 - b1 ** (t + 1)), rtol=1e-10, atol=1e-14)
        total = total + updates["w"].sum()
    total.backward()
    assert rule.log_momentum_lr.grad is not None and rule.log_momentum_lr.grad.abs() > 0
    with pytest.raises(ValueError, match="momentum_lr needs preprocess='rnnprop'"):
        LSTMRule(momentum_lr=0.5)
    with pytest.raises(ValueError, match="momentum_lr"):
        LSTMRule(preprocess="rnnprop", momentum_lr=-1.0)
    assert "momentum_lr" not in LSTMRule().config()
    # a checkpoint keeps the residual and its learned step size
    import l2o
    with torch.no_grad():
        rule.log_momentum_lr.add_(0.25)
    path = l2o.save_rule(tmp_path / "mom.pt", rule)
    loaded = l2o.load_rule(path)
    assert loaded.config()["momentum_lr"] == 0.5
    torch.testing.assert_close(loaded.log_momentum_lr.detach().double(), rule.log_momentum_lr.detach().double())


@pytest.mark.parametrize("preprocess", ["none", "log_sign", "rnnprop"])
def test_nesterov_residual_starts_as_torch_nag_and_learns_its_step_size(preprocess, tmp_path):
    """With a zero output layer the rule is torch.optim.SGD(nesterov=True) at nesterov_lr (whatever
    the inputs), its log step size gets a meta-gradient, and a checkpoint keeps both."""
    check_rule(_rule(preprocess=preprocess, hidden_size=5, nesterov_lr=0.1))
    rule = _rule(preprocess=preprocess, hidden_size=5, nesterov_lr=0.1, nesterov_momentum=0.8, zero_init_output=True)
    theta = _random((7,), 70)
    ref = theta.detach().clone().requires_grad_(True)
    torch_nag = torch.optim.SGD([ref], lr=float(rule.log_nesterov_lr.detach().double().exp()), momentum=0.8,
                                nesterov=True)
    params = {"w": theta}
    state = rule.init(params)
    assert len(state.velocity) == 1
    total = 0.0
    for t in range(4):
        grad = _random((7,), 80 + t) + params["w"].detach() ** 3
        updates, state = rule.update({"w": grad}, state, params, step=t)
        params = {"w": params["w"] + updates["w"]}
        total = total + updates["w"].sum()
        ref.grad = _random((7,), 80 + t) + ref.detach() ** 3
        torch_nag.step()
        torch.testing.assert_close(params["w"].detach(), ref.detach(), rtol=1e-12, atol=1e-14)
    total.backward()
    assert rule.log_nesterov_lr.grad is not None and rule.log_nesterov_lr.grad.abs() > 0
    assert rule.out_weight.grad is not None and rule.out_weight.grad.abs().sum() > 0
    import l2o
    with torch.no_grad():
        rule.log_nesterov_lr.add_(0.25)
    loaded = l2o.load_rule(l2o.save_rule(tmp_path / "nag.pt", rule))
    assert loaded.config()["nesterov_lr"] == 0.1 and loaded.config()["nesterov_momentum"] == 0.8
    torch.testing.assert_close(loaded.log_nesterov_lr.detach().double(), rule.log_nesterov_lr.detach().double())


def test_adam_residual_with_adam_betas_is_torch_adam(tmp_path):
    """rnnprop_betas=(0.9, 0.999), adam_lr and a zero output layer: the untrained rule's trajectory
    is torch.optim.Adam's (default betas and eps) to 1e-12 in float64; the betas survive a checkpoint."""
    import l2o

    rule = _rule(preprocess="rnnprop", hidden_size=5, adam_lr=0.05, zero_init_output=True, rnnprop_betas=(0.9, 0.999))
    check_rule(rule)
    theta = _random((7,), 71)
    ref = theta.detach().clone().requires_grad_(True)
    torch_adam = torch.optim.Adam([ref], lr=float(rule.log_adam_lr.detach().double().exp()))
    params = {"w": theta}
    state = rule.init(params)
    for t in range(6):
        grad = _random((7,), 90 + t) + params["w"].detach() ** 3
        updates, state = rule.update({"w": grad}, state, params, step=t)
        params = {"w": params["w"] + updates["w"]}
        ref.grad = _random((7,), 90 + t) + ref.detach() ** 3
        torch_adam.step()
        torch.testing.assert_close(params["w"].detach(), ref.detach(), rtol=1e-12, atol=1e-14)
    loaded = l2o.load_rule(l2o.save_rule(tmp_path / "adam.pt", rule))
    assert loaded.rnnprop_betas == (0.9, 0.999) and loaded.config()["rnnprop_betas"] == [0.9, 0.999]
    assert "rnnprop_betas" not in LSTMRule(preprocess="rnnprop").config()  # older checkpoints stay valid


def test_rnnprop_betas_bad_input():
    for bad in ((0.9, 1.0), (-0.1, 0.9), (0.9, float("nan"))):
        with pytest.raises(ValueError, match=r"rnnprop_betas\[[01]\]"):
            LSTMRule(preprocess="rnnprop", rnnprop_betas=bad)
    for bad in (0.9, (0.9,), (0.9, 0.99, 0.999)):
        with pytest.raises(TypeError, match="rnnprop_betas must be a pair"):
            LSTMRule(preprocess="rnnprop", rnnprop_betas=bad)
    with pytest.raises(TypeError, match=r"rnnprop_betas\[1\] must be a number"):
        LSTMRule(preprocess="rnnprop", rnnprop_betas=(0.9, "0.99"))
    with pytest.raises(ValueError, match="preprocess='rnnprop'"):
        LSTMRule(preprocess="log_sign", rnnprop_betas=(0.9, 0.999))


def test_nesterov_residual_bad_input():
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="nesterov_lr"):
            LSTMRule(nesterov_lr=bad)
    for bad in (1.0, -0.1, 2.0):
        with pytest.raises(ValueError, match="nesterov_momentum"):
            LSTMRule(nesterov_lr=0.1, nesterov_momentum=bad)
    with pytest.raises(TypeError, match="nesterov_lr"):
        LSTMRule(nesterov_lr="0.1")
    assert "nesterov_lr" not in LSTMRule().config()  # configs of older checkpoints stay valid
    rule, plain = LSTMRule(nesterov_lr=0.1), LSTMRule()
    params = {"w": torch.zeros(3)}
    with pytest.raises(ValueError, match="velocity"):  # a state made by a rule without the residual
        rule.update({"w": torch.ones(3)}, plain.init(params), params, step=0)
    with pytest.raises(ValueError, match="velocity"):
        plain.update({"w": torch.ones(3)}, rule.init(params), params, step=0)


def test_rnnprop_second_order_meta_gradient_is_finite_for_a_zero_gradient_coordinate():
    """A coordinate whose gradient is exactly 0 (e.g. a weight of an always-black MNIST pixel)
    must not make the rnnprop moments' derivative 0/0 when the task gradients carry a graph."""
    rule = _rule(preprocess="rnnprop", hidden_size=5, adam_lr=0.01)
    theta = _random((4,), 90).requires_grad_(True)
    mask = torch.tensor([0.0, 1.0, 1.0, 1.0], dtype=torch.float64)  # f ignores the first coordinate
    params, state, total = {"w": theta}, rule.init({"w": theta}), 0.0
    for t in range(3):
        loss = ((params["w"] * mask) ** 2).sum()
        (grad,) = torch.autograd.grad(loss, params["w"], create_graph=True)
        assert grad[0] == 0
        updates, state = rule.update({"w": grad}, state, params, step=t)
        params = {"w": params["w"] + updates["w"]}
        total = total + ((params["w"] * mask) ** 2).sum()
    grads = torch.autograd.grad(total, list(rule.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
