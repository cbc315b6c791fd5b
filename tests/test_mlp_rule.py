"""The per-coordinate MLP rule: conformance, the untrained residual rule is Adam, update == update_,
separability and permutation equivariance, extreme gradients, state size, training progress,
bfloat16 state, checkpoints, torch.compile, meta-gradients (gradcheck, first and second order) and
meta-training."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import l2o
from l2o import MLPRule, init_inner, load_rule, save_rule, unroll
from l2o.meta import MetaTrainConfig, meta_train, validation_loss
from l2o.rules import mlp as mlp_module
from l2o.rules.mlp import MLPState, NUM_CONTEXT, NUM_FEATURES
from l2o.tree import apply_updates, state_leaves
from optimizees.mlp import MLPTask
from optimizees.quadratic import QuadraticFamily
from tests.conformance import check_rule
from tests.helpers import trained_mlp_rule

#: Params of every kind the rule distinguishes: a scalar, a vector, matrices (narrow and wide), a
#: conv weight (out, in, kh, kw) and an empty tensor.
SHAPES = {"scale": (), "bias": (5,), "weight": (4, 3), "wide": (2, 13), "conv": (3, 2, 2, 2), "empty": (0, 4)}


def _rule(seed: int = 0, **kw) -> MLPRule:
    torch.manual_seed(seed)
    return MLPRule(**kw)


def _params(gen: torch.Generator, dtype=torch.float32, shapes=SHAPES) -> dict[str, torch.Tensor]:
    return {k: torch.randn(s, generator=gen, dtype=dtype) for k, s in shapes.items()}


def _run(rule, params, grads_seq, *, inplace: bool, **kw):
    """Updates of every step and the final state, through ``update`` or ``update_``."""
    state, out = rule.init(params), []
    for t, grads in enumerate(grads_seq):
        fn = rule.update_ if inplace else rule.update
        updates, state = fn(grads, state, params, step=t, **kw)
        out.append(updates)
        params = apply_updates(params, updates)
    return out, state


# ----------------------------------------------------------------------------- the contract


@pytest.mark.parametrize("kw", [{}, {"residual": False}, {"hidden_layers": 2, "hidden_size": 5, "total_steps": 7},
                                {"residual": False, "exp_mult": 0.0}])
def test_conforms(kw):
    check_rule(_rule(**kw).double())
    check_rule(trained_mlp_rule(**kw).double())


def test_conforms_in_float32():
    check_rule(trained_mlp_rule(), dtype=torch.float32)


def test_registered_and_exported():
    assert l2o.RULES["mlp"] is MLPRule and l2o.MLPRule is MLPRule
    assert MLPRule.per_tensor_state is True
    rule = MLPRule()
    assert rule.nominal_lr == pytest.approx(1e-3, rel=1e-6)
    with torch.no_grad():
        rule.log_lr_offset.fill_(math.log(2.0))
    assert rule.nominal_lr == pytest.approx(2e-3, rel=1e-6)
    assert rule.input_weight.shape == (8, NUM_FEATURES) and rule.context_weight.shape == (8, NUM_CONTEXT)


@pytest.mark.parametrize("kw, match", [
    ({"hidden_size": 0}, "hidden_size"), ({"hidden_layers": 0}, "hidden_layers"), ({"lr": 0.0}, "lr"),
    ({"momentum_decays": (0.9, 0.99)}, "momentum_decays"), ({"momentum_decays": (0.9, 1.0, 0.5)}, "momentum_decays"),
    ({"second_moment_decay": 1.0}, "second_moment_decay"), ({"eps": 0.0}, "eps"), ({"instance_dims": -1}, "instance_dims"),
    ({"total_steps": 0}, "total_steps"), ({"total_steps": 2.5}, "total_steps"), ({"residual": 1}, "residual"),
    ({"max_step_ratio": 0.0}, "max_step_ratio"), ({"max_step_ratio": -1.0}, "max_step_ratio"),
    ({"max_step_ratio": math.inf}, "max_step_ratio"), ({"max_step_ratio": "2"}, "max_step_ratio"),
])
def test_bad_hyperparameters_are_refused_by_name(kw, match):
    with pytest.raises((TypeError, ValueError), match=match):
        MLPRule(**kw)


def test_bad_state_and_arguments_are_refused():
    rule, params = _rule(), {"w": torch.zeros(3, 2)}
    grads = {"w": torch.ones(3, 2)}
    with pytest.raises(TypeError, match="MLPState"):
        rule.update(grads, l2o.Adam().init(params), params, step=0)
    other = rule.init({"w": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="call rule.init"):
        rule.update(grads, other, params, step=0)
    with pytest.raises(ValueError, match="total_steps"):
        rule.update(grads, rule.init(params), params, step=0, total_steps=-3)
    with pytest.raises(ValueError, match="instance_dims"):
        MLPRule(instance_dims=2).init({"b": torch.zeros(3)})
    with pytest.raises(ValueError, match="rule's dtype"):
        state = rule.init(params)
        state = MLPState(tuple({k: v.double() for k, v in m.items()} for m in state.momentum), *state[1:])
        rule.update_(grads, state, params, step=0)


def test_config_round_trip_and_checkpoint(tmp_path):
    rule = trained_mlp_rule(hidden_size=5, hidden_layers=2, residual=False, lr=3e-3, exp_mult=0.5,
                    momentum_decays=(0.5, 0.9, 0.99), factored_decay=0.99, instance_dims=1, total_steps=40)
    twin = MLPRule(**rule.config())
    assert twin.config() == rule.config()
    loaded = load_rule(save_rule(tmp_path / "mlp.pt", rule, {"task": "test"}))
    assert type(loaded) is MLPRule and loaded.config() == rule.config()
    gen = torch.Generator().manual_seed(0)
    params = {"theta": torch.randn(3, 4, generator=gen), "w": torch.randn(3, 4, 2, generator=gen)}
    grads_seq = [{k: torch.randn(v.shape, generator=gen) for k, v in params.items()} for _ in range(3)]
    for a, b in zip(_run(rule, params, grads_seq, inplace=False)[0], _run(loaded, params, grads_seq, inplace=False)[0]):
        for k in a:
            assert torch.equal(a[k], b[k])


def test_max_step_ratio_is_in_the_config_only_when_set(tmp_path):
    assert "max_step_ratio" not in MLPRule().config()
    rule = trained_mlp_rule(max_step_ratio=1.5)
    assert rule.config()["max_step_ratio"] == 1.5 and MLPRule(**rule.config()).config() == rule.config()
    loaded = load_rule(save_rule(tmp_path / "bounded.pt", rule, {"task": "test"}))
    assert loaded.max_step_ratio == 1.5


def _adam_directions(rule: MLPRule, state: MLPState, step: int) -> dict[str, torch.Tensor]:
    """Adam's direction :math:`\\hat m^{(1)} / (\\sigma + \\epsilon)` from an updated state."""
    bc1, _, _, bcv, _ = rule._consts(step)
    return {k: (m / bc1) / (torch.sqrt((v + mlp_module.TINY) / bcv) + rule.eps)
            for (k, m), v in zip(state.momentum[0].items(), state.second_moment.values())}


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("instance_dims", [0, 1])
def test_max_step_ratio_bounds_each_tensors_step_and_keeps_its_direction(inplace, instance_dims):
    """With the bound, a tensor's step is the unbounded step times min(1, kappa eta rms(adam) /
    rms(u)), per instance: at most kappa times Adam's step, the same direction, and unchanged
    where the step was already within the bound."""
    gen = torch.Generator().manual_seed(4)
    shapes = {"w": (3, 6, 5), "b": (3, 7), "conv": (3, 2, 2, 3, 3)}
    params = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    grads = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    grads["b"] = 0.5 + 0.01 * torch.randn(shapes["b"], generator=gen)  # consistent: a large step
    free = trained_mlp_rule(3, instance_dims=instance_dims)
    kappa = 1.2
    bounded = MLPRule(**{**free.config(), "max_step_ratio": kappa})
    bounded.load_state_dict(free.state_dict())
    with torch.no_grad():
        fn = (lambda r: r.update_) if inplace else (lambda r: r.update)
        u_free, state = fn(free)(grads, free.init(params), params, step=2)
        u_bound, _ = fn(bounded)(grads, bounded.init(params), params, step=2)
    adam = _adam_directions(free, state, 2)
    eta = free.nominal_lr
    instances = shapes["w"][0] if instance_dims else 1
    bound_hit = within = 0
    for k in params:
        free_k, bound_k = u_free[k].reshape(instances, -1), u_bound[k].reshape(instances, -1)
        limit = kappa * eta * adam[k].reshape(instances, -1).square().mean(-1).sqrt()
        factor = torch.clamp(limit / free_k.square().mean(-1).sqrt(), max=1.0)
        torch.testing.assert_close(bound_k, free_k * factor.unsqueeze(-1), rtol=1e-5, atol=1e-12)
        assert bool((bound_k.square().mean(-1).sqrt() <= limit * (1 + 1e-5)).all())
        bound_hit += int((factor < 1).sum())
        within += int((factor == 1).sum())
    assert bound_hit > 0 and within > 0, (bound_hit, within)


def test_max_step_ratio_second_order_meta_gradient_gradcheck(monkeypatch):
    """Through steps where the bound holds some instances' steps down and leaves others."""
    factors = []
    bound = MLPRule._step_bound

    def recorded(self, adam_sq, u_sq):
        factor = bound(self, adam_sq, u_sq)
        factors.append(factor.detach().flatten())
        return factor

    monkeypatch.setattr(MLPRule, "_step_bound", recorded)
    task = _tiny_mlp_task(5, torch.float64, "tanh")
    rule = trained_mlp_rule(1, hidden_size=3, residual=True, total_steps=3, instance_dims=1, lr=0.05,
                            max_step_ratio=0.7).double()
    fn, inputs = _meta_loss_fn(rule, task, 3, second_order=True)
    assert torch.autograd.gradcheck(fn, inputs)
    seen = torch.cat(factors)
    assert bool((seen < 1).any()) and bool((seen == 1).any())


# ----------------------------------------------------------------------------- the untrained rule is Adam


def _adam_problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = {"w": (6, 4), "b": (6,), "conv": (3, 2, 3, 3), "s": ()}
    params = {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in shapes.items()}
    grads_seq = [{k: torch.randn(s, generator=gen, dtype=torch.float64) * 10.0 ** (t % 3 - 1) for k, s in shapes.items()}
                 for t in range(60)]
    return params, grads_seq


def _torch_adam(params, grads_seq, **kw):
    ps = [p.clone().requires_grad_() for p in params.values()]
    opt = torch.optim.Adam(ps, lr=1e-3, **kw)
    for grads in grads_seq:
        for p, g in zip(ps, grads.values()):
            p.grad = g.clone()
        opt.step()
    return {k: p.detach() for k, p in zip(params, ps)}


@pytest.mark.parametrize("inplace", [False, True])
def test_untrained_residual_rule_is_torch_adam_in_float64(inplace):
    params, grads_seq = _adam_problem()
    rule = _rule().double()
    updates, _ = _run(rule, params, grads_seq, inplace=inplace)
    ours = dict(params)
    for u in updates:
        ours = apply_updates(ours, u)
    theirs = _torch_adam(params, grads_seq)
    for k in params:
        torch.testing.assert_close(ours[k] - params[k], theirs[k] - params[k], rtol=0.0, atol=1e-10)
        assert (theirs[k] - params[k]).abs().max() > 1e-3  # not vacuous: the params moved


def test_untrained_residual_rule_in_learned_optimizer_is_torch_adam():
    params, grads_seq = _adam_problem(1)
    ps = [nn.Parameter(p.clone()) for p in params.values()]
    opt = l2o.LearnedOptimizer(ps, rule=_rule().double())
    for grads in grads_seq:
        for p, g in zip(ps, grads.values()):
            p.grad = g.clone()
        opt.step()
    theirs = _torch_adam(params, grads_seq)
    for p, k in zip(ps, params):
        torch.testing.assert_close(p.detach() - params[k], theirs[k] - params[k], rtol=0.0, atol=1e-10)


def test_untrained_plain_rule_takes_small_steps():
    rule = _rule(residual=False)
    gen = torch.Generator().manual_seed(0)
    params = _params(gen)
    updates, _ = _run(rule, params, [{k: torch.randn(v.shape, generator=gen) for k, v in params.items()}], inplace=False)
    biggest = max(u.abs().max() for u in updates[0].values() if u.numel())
    assert 0 < biggest < 0.1  # about lr = 1e-3 times an O(1) direction and magnitude


# ----------------------------------------------------------------------------- update == update_


@pytest.mark.parametrize("block", [1, 5, 7, 1 << 16])
@pytest.mark.parametrize("instance_dims", [0, 1])
def test_update_equals_update_in_place(monkeypatch, block, instance_dims):
    monkeypatch.setattr(mlp_module, "BLOCK_COORDINATES", block)
    shapes = SHAPES if instance_dims == 0 else {k: (2, *s) for k, s in SHAPES.items()}
    rule = trained_mlp_rule(hidden_layers=2, total_steps=5, instance_dims=instance_dims).double()
    gen = torch.Generator().manual_seed(block)
    params = _params(gen, torch.float64, shapes)
    grads_seq = [{k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in params.items()}
                 for _ in range(4)]
    grads_seq[2]["weight"] = torch.zeros_like(grads_seq[2]["weight"])  # a zero gradient on the way
    ours, s_ours = _run(rule, params, grads_seq, inplace=False)
    theirs, s_theirs = _run(rule, params, grads_seq, inplace=True)
    for a, b in zip(ours, theirs):
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-12, atol=1e-15)
    for a, b in zip(state_leaves(s_ours), state_leaves(s_theirs)):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-15)


def test_update_in_place_float32_low_precision_params(monkeypatch):
    """bfloat16 params and gradients (the drop-in's case): both paths compute in float32."""
    monkeypatch.setattr(mlp_module, "BLOCK_COORDINATES", 6)
    rule = trained_mlp_rule()
    gen = torch.Generator().manual_seed(3)
    params = {k: v.to(torch.bfloat16) for k, v in _params(gen).items()}
    grads_seq = [{k: torch.randn(v.shape, generator=gen).to(torch.bfloat16) for k, v in params.items()}
                 for _ in range(3)]
    ours, _ = _run(rule, params, grads_seq, inplace=False)
    theirs, _ = _run(rule, params, grads_seq, inplace=True)
    for a, b in zip(ours, theirs):
        for k in a:
            assert b[k].dtype == torch.bfloat16
            torch.testing.assert_close(b[k].float(), a[k].float(), rtol=1e-2, atol=1e-5)


def test_update_in_place_overwrites_the_state_and_allocates_no_new_one():
    rule, gen = trained_mlp_rule(), torch.Generator().manual_seed(0)
    params = _params(gen)
    state = rule.init(params)
    before = [t.data_ptr() for t in state_leaves(state)]
    _, new = rule.update_({k: torch.randn(v.shape, generator=gen) for k, v in params.items()}, state, params, step=0)
    assert [t.data_ptr() for t in state_leaves(new)] == before
    assert any(bool(t.abs().sum() > 0) for t in state_leaves(state))


# ----------------------------------------------------------------------------- symmetries


def test_separable_per_tensor():
    rule, gen = trained_mlp_rule(total_steps=9), torch.Generator().manual_seed(0)
    params = _params(gen)
    grads_seq = [{k: torch.randn(v.shape, generator=gen) for k, v in params.items()} for _ in range(3)]
    together, _ = _run(rule, params, grads_seq, inplace=False)
    for k in params:
        alone, _ = _run(rule, {k: params[k]}, [{k: g[k]} for g in grads_seq], inplace=False)
        for t in range(3):
            assert torch.equal(alone[t][k], together[t][k]), k


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), rows=st.integers(1, 5), cols=st.integers(1, 6), inplace=st.booleans())
def test_equivariant_to_permuting_rows_columns_and_coordinates(seed, rows, cols, inplace):
    """Permuting a matrix's rows and columns (or a vector's coordinates) permutes its updates."""
    rule = trained_mlp_rule(seed % 7, total_steps=6).double()
    gen = torch.Generator().manual_seed(seed)
    params = {"w": torch.randn(rows, cols, generator=gen, dtype=torch.float64),
              "b": torch.randn(rows * cols, generator=gen, dtype=torch.float64)}
    grads_seq = [{k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in params.items()}
                 for _ in range(3)]
    pr, pc, pv = torch.randperm(rows, generator=gen), torch.randperm(cols, generator=gen), torch.randperm(rows * cols, generator=gen)

    def permute(tree):
        return {"w": tree["w"][pr][:, pc], "b": tree["b"][pv]}

    ours, _ = _run(rule, params, grads_seq, inplace=inplace)
    theirs, _ = _run(rule, permute(params), [permute(g) for g in grads_seq], inplace=inplace)
    for a, b in zip(ours, theirs):
        for k, u in permute(a).items():
            torch.testing.assert_close(b[k], u, rtol=1e-10, atol=1e-14)


# ----------------------------------------------------------------------------- robustness


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("exponent", [-30, -10, 0, 10, 30, None])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("residual", [True, False])
def test_finite_updates_for_extreme_and_zero_gradients(dtype, exponent, inplace, residual):
    rule = trained_mlp_rule(residual=residual, total_steps=4).to(dtype)
    gen = torch.Generator().manual_seed(0)
    params = _params(gen, dtype)
    grads_seq = []
    for t in range(4):
        if exponent is None:  # all-zero gradients
            grads_seq.append({k: torch.zeros(v.shape, dtype=dtype) for k, v in params.items()})
        else:  # magnitudes spread over 10^(e-3) .. 10^(e+3) inside each tensor
            spread = 3 * torch.rand(4096, generator=gen, dtype=torch.float64) * torch.randn(4096, generator=gen).sign()
            grads_seq.append({k: (torch.randn(v.shape, generator=gen, dtype=torch.float64)
                                  * 10.0 ** (exponent + spread[:v.numel()].reshape(v.shape))).to(dtype)
                              for k, v in params.items()})
    for g in grads_seq:
        assert all(torch.isfinite(x).all() for x in g.values())
    updates, state = _run(rule, params, grads_seq, inplace=inplace)
    for u in updates:
        for k, x in u.items():
            assert torch.isfinite(x).all(), (k, exponent)
    assert all(torch.isfinite(t).all() for t in state_leaves(state))


@pytest.mark.parametrize("inplace", [False, True])
def test_zero_gradients_give_zero_steps_before_meta_training(inplace):
    rule, gen = _rule(), torch.Generator().manual_seed(0)
    params = _params(gen)
    updates, state = _run(rule, params, [{k: torch.zeros_like(v) for k, v in params.items()}] * 3, inplace=inplace)
    assert all(torch.equal(x, torch.zeros_like(x)) for u in updates for x in u.values())
    assert all(torch.equal(t, torch.zeros_like(t)) for t in state_leaves(state))


def test_adam_like_steps_for_huge_gradients():
    """1e30 gradients (float32) are clipped, not overflowed: the untrained rule steps like Adam, lr * sign."""
    rule = _rule()
    params = {"w": torch.zeros(3, 4)}
    g = torch.full((3, 4), 1e30)
    g[0] = -1e30
    updates, _ = rule.update({"w": g}, rule.init(params), params, step=0)
    torch.testing.assert_close(updates["w"], -1e-3 * torch.sign(g))


def test_state_floats_per_parameter():
    """At most 4 floats per coordinate plus rows + cols per matrix (a conv weight counts as
    out x in*kh*kw)."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 10), nn.LayerNorm(10))
    params = dict(model.named_parameters())
    state = MLPRule().init(params)
    numel = sum(p.numel() for p in params.values())
    per_coordinate = sum(t.numel() for m in state.momentum for t in m.values()) + sum(
        t.numel() for t in state.second_moment.values())
    factored = sum(t.numel() for t in state.row.values()) + sum(t.numel() for t in state.col.values())
    assert per_coordinate == 4 * numel
    assert factored == (8 + 3 * 3 * 3) + (10 + 128)  # the conv weight and the linear weight
    assert len(state_leaves(state)) == 6 * len(params)


# ----------------------------------------------------------------------------- training progress


def test_training_progress_and_total_steps():
    rule, gen = trained_mlp_rule(residual=False), torch.Generator().manual_seed(0)
    params = _params(gen)
    grads = {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}
    state = rule.init(params)
    at = {t: rule.update(grads, state, params, step=t)[0]["weight"] for t in (0, 50)}
    assert not torch.equal(at[0], at[50])  # the step count is a feature
    unknown = rule.update(grads, state, params, step=3)[0]["weight"]
    known = rule.update(grads, state, params, step=3, total_steps=10)[0]["weight"]
    assert not torch.equal(unknown, known)
    built = trained_mlp_rule(residual=False, total_steps=10)
    assert torch.equal(built.update(grads, state, params, step=3)[0]["weight"], known)
    assert torch.equal(built.update(grads, state, params, step=3, total_steps=10)[0]["weight"], known)
    later = rule.update(grads, state, params, step=3, total_steps=1000)[0]["weight"]
    assert not torch.equal(later, known)
    # the context: 11 progress features, 8 of the fraction done (all 0 without total_steps), 3 ranks
    ctx = rule._context(5, None)
    assert ctx.shape == (NUM_CONTEXT - 3,) and torch.equal(ctx[11:], torch.zeros(8))
    ctx = rule._context(5, 10)
    assert ctx[11] == 1.0 and ctx[12] == 0.5
    torch.testing.assert_close(ctx[0], torch.tensor(math.tanh(5 / 1 - 1)))
    torch.testing.assert_close(ctx[10], torch.tensor(math.tanh(5 / 100_000 - 1)))


# ----------------------------------------------------------------------------- the drop-in


def test_learned_optimizer_with_bfloat16_state_trains_a_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
    x = torch.randn(64, 4)
    y = x @ torch.randn(4, 1)
    opt = l2o.LearnedOptimizer(model.parameters(), rule=MLPRule(lr=1e-2), state_dtype=torch.bfloat16)
    first = None
    for _ in range(60):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        first = float(loss.detach()) if first is None else first
    assert float(loss.detach()) < 0.5 * first
    entries = opt.state[model[0].weight]
    assert {k for k in entries if k != "step"} == {"momentum.0", "momentum.1", "momentum.2", "second_moment", "row",
                                                   "col"}
    assert all(entries[k].dtype == torch.bfloat16 for k in entries if k != "step")
    assert entries["row"].shape == (16,) and entries["col"].shape == (4,)
    # the state_dict round-trips into a fresh optimizer that continues identically
    fresh = l2o.LearnedOptimizer(model.parameters(), rule=MLPRule(lr=1e-2), state_dtype=torch.bfloat16)
    fresh.load_state_dict(opt.state_dict())
    assert all(torch.equal(fresh.state[p][k], opt.state[p][k]) for p in model.parameters() for k in ("row", "col",
                                                                                                      "second_moment"))


# ----------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("inplace", [False, True])
def test_traces_with_torch_compile_fullgraph(monkeypatch, inplace):
    monkeypatch.setattr(mlp_module, "BLOCK_COORDINATES", 8)
    torch._dynamo.reset()
    rule, gen = trained_mlp_rule(total_steps=20), torch.Generator().manual_seed(0)
    params = {k: v for k, v in _params(gen).items() if k in ("weight", "wide", "bias", "conv")}
    grads = {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}
    fn = rule.update_ if inplace else rule.update
    compiled = torch.compile(lambda g, s, p: fn(g, s, p, step=3), fullgraph=True, backend="eager")
    ours, s_ours = compiled(grads, rule.init(params), params)
    theirs, s_theirs = fn(grads, rule.init(params), params, step=3)
    for k in params:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-6, atol=1e-9)
    for a, b in zip(state_leaves(s_ours), state_leaves(s_theirs)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)


# ----------------------------------------------------------------------------- meta-gradients


class _LinearTask:
    """Linear losses, one per instance: their gradients are constants, so the first-order
    meta-gradient is the exact one and can be gradchecked. Params: a vector and a matrix per instance."""

    def __init__(self, c: torch.Tensor) -> None:
        self.c = c

    def init(self, generator):
        return {"theta": torch.zeros_like(self.c), "w": torch.zeros(self.c.shape[0], 2, 3, dtype=self.c.dtype)}

    def sample_batch(self, split, generator):
        return None

    def loss(self, params, batch=None):
        return (params["theta"] * self.c).sum(-1) + params["w"].sum((-1, -2)) * self.c[:, 0]


def _meta_loss_fn(rule, task, steps, second_order):
    names = [n for n, _ in rule.named_parameters()]

    class MetaLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.rule = rule

        def forward(self):
            gen = torch.Generator().manual_seed(0)
            inner = init_inner(self.rule, task, gen)
            return unroll(self.rule, task, inner, steps=steps, generator=gen, second_order=second_order,
                          objective="loss").meta_loss

    module = MetaLoss()

    def meta_loss(*flat):
        return torch.func.functional_call(module, {f"rule.{n}": v for n, v in zip(names, flat)}, ())

    return meta_loss, tuple(p.detach().clone().requires_grad_() for p in rule.parameters())


def _tiny_mlp_task(seed: int, dtype=torch.float32, activation: str = "relu") -> MLPTask:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(48, 6, generator=gen, dtype=dtype)
    y = torch.randint(0, 10, (48,), generator=gen)
    return MLPTask(x, y, x[:16], y[:16], hidden=(5,), activation=activation, batch_size=8, num_networks=2)


@pytest.mark.parametrize("residual", [True, False])
def test_second_order_meta_gradient_gradcheck(residual):
    task = _tiny_mlp_task(2, torch.float64, "tanh")  # smooth, with matrices and vectors
    rule = trained_mlp_rule(1, hidden_size=3, hidden_layers=2, residual=residual, total_steps=3, instance_dims=1,
                    lr=0.05).double()
    fn, inputs = _meta_loss_fn(rule, task, 3, second_order=True)
    assert torch.autograd.gradcheck(fn, inputs)


def test_first_order_meta_gradient_gradcheck():
    c = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    rule = trained_mlp_rule(2, hidden_size=3, residual=True, instance_dims=1, lr=0.05).double()
    fn, inputs = _meta_loss_fn(rule, _LinearTask(c), 3, second_order=False)
    assert torch.autograd.gradcheck(fn, inputs)


def test_first_order_meta_gradient_equals_explicit_objective():
    """The engine's first-order surrogate against the meta-loss written out with detached gradients."""
    task = QuadraticFamily(dim=4, num_functions=3, dtype=torch.float64).sample(torch.Generator().manual_seed(0))
    rule = trained_mlp_rule(3, hidden_size=4, instance_dims=1, lr=0.05).double()
    gen = torch.Generator().manual_seed(0)
    params = task.init(gen)
    result = unroll(rule, task, init_inner(rule, task, gen, params), steps=4, generator=gen)
    ours = torch.autograd.grad(result.meta_loss, list(rule.parameters()))
    state, total, p = rule.init(params), 0.0, params
    for t in range(4):
        leaves = {k: v.detach().requires_grad_() for k, v in p.items()}
        grads = dict(zip(leaves, torch.autograd.grad(task.loss(leaves).sum(), list(leaves.values()))))
        updates, state = rule.update(grads, state, p, step=t)
        p = apply_updates(p, updates)
        total = total + task.loss(p).mean()
    ref = torch.autograd.grad(total, list(rule.parameters()))
    torch.testing.assert_close(result.meta_loss, total, rtol=1e-12, atol=0.0)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


class _TinyMLPFamily:
    """Tiny MLPs on random data (two networks per task): MLPTask's params are (B, in, out) and (B, out)."""

    name = "tiny-mlp"

    def sample(self, generator):
        return _tiny_mlp_task(int(torch.randint(0, 2**31, (), generator=generator)))


@pytest.mark.parametrize("family", [QuadraticFamily(dim=4, num_functions=4), _TinyMLPFamily()], ids=["quadratic", "mlp"])
def test_every_meta_param_gets_a_meta_gradient_after_one_meta_step(family):
    rule = _rule(instance_dims=1, total_steps=6)
    config = MetaTrainConfig(epochs=1, horizon=6, truncation=6, validate_every=0, meta_lr=1e-2, meta_lr_final=None)
    meta_train(rule, family, config, progress=False)
    assert rule.out_weight.abs().sum() > 0  # the meta-step reached the zero-initialised output layer
    task = family.sample(torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(6)
    rule.zero_grad()
    unroll(rule, task, init_inner(rule, task, gen), steps=6, generator=gen).meta_loss.backward()
    for name, p in rule.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name


def test_short_meta_training_lowers_the_validation_loss():
    family = QuadraticFamily(dim=5, num_functions=16)
    rule = _rule(instance_dims=1, lr=1e-2)
    val_tasks = [family.sample(torch.Generator().manual_seed(100 + k)) for k in range(3)]
    before = validation_loss(rule, val_tasks, 40, seed=7)
    config = MetaTrainConfig(epochs=12, horizon=40, truncation=20, meta_lr=3e-2, meta_lr_final=None,
                             validate_every=0, objective="log_loss")
    meta_train(rule, family, config, progress=False)
    after = validation_loss(rule, val_tasks, 40, seed=7)
    assert math.isfinite(after) and after < 0.9 * before, (before, after)
