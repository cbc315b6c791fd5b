"""MAML, Meta-SGD and MAMLInit on the unroll engine: hand-computed first-order updates, float64
gradcheck of second-order meta-gradients, batched (vmap) == per-task loop, Meta-SGD's rates get
gradients, flat memory across episodes, and the conformance suite for MetaSGD."""

from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import l2o
import l2o.maml as maml_mod
from l2o.checkpoints import load_rule, save_rule
from l2o.rules import MetaSGD, MetaSGDState
from l2o.instances import shared_loss_and_grads
from l2o.tasks import META, instance_form
from l2o.unroll import loss_and_grads, run_unroll
from optimizees.sine import SineFamily
from tests.conformance import SHAPES, check_rule

LR = 0.1


def _mlp(seed: int = 0, act: type[nn.Module] = nn.Tanh) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 5), act(), nn.Linear(5, 1)).double()


def _data(seed: int, *lead: int, n: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(*lead, n, 2, generator=g, dtype=torch.float64)
    sy = torch.randn(*lead, n, 1, generator=g, dtype=torch.float64)
    qx = torch.randn(*lead, n + 1, 2, generator=g, dtype=torch.float64)
    qy = torch.randn(*lead, n + 1, 1, generator=g, dtype=torch.float64)
    return sx, sy, qx, qy


def _grad(model: nn.Module, params: dict, x, y, create_graph: bool = False) -> dict:
    loss = F.mse_loss(torch.func.functional_call(model, params, (x,)), y)
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)))


# ------------------------------------------------------------------------------------ first order


@pytest.mark.parametrize("steps", [1, 2])
def test_first_order_matches_hand_computed_update(steps):
    model = _mlp()
    sx, sy, qx, qy = _data(1)
    maml = l2o.MAML(model, inner_lr=LR, inner_steps=steps, first_order=True)
    params = maml.adapt(F.mse_loss, sx, sy)

    # by hand: theta_{t+1} = theta_t - lr * grad f_s(theta_t), with plain autograd
    theta = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    for _ in range(steps):
        g = _grad(model, theta, sx, sy)
        theta = {k: (v - LR * g[k]).detach().requires_grad_() for k, v in theta.items()}
    for k in theta:
        torch.testing.assert_close(params[k], theta[k], rtol=1e-13, atol=1e-15)

    # FOMAML meta-gradient: d f_q(theta_K) / d theta0 = grad f_q(theta_K)
    F.mse_loss(maml(params, qx), qy).backward()
    expected = _grad(model, theta, qx, qy)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[k], rtol=1e-12, atol=1e-15)


def test_first_order_meta_sgd_rates_match_hand_computed_gradient():
    """theta_2 = theta_0 - a*g_0 - a*g_1 (g constant): d f_q/d a = -(g_0 + g_1) * grad f_q(theta_2)."""
    model = _mlp(3)
    sx, sy, qx, qy = _data(4)
    rule = MetaSGD(model, lr=LR).double()
    with torch.no_grad():  # non-uniform rates, so the test sees per-coordinate arithmetic
        for a in rule.alpha:
            a.mul_(torch.rand(a.shape, generator=torch.Generator().manual_seed(5), dtype=a.dtype) + 0.5)
    maml = l2o.MAML(model, inner_steps=2, first_order=True, rule=rule)
    F.mse_loss(maml(maml.adapt(F.mse_loss, sx, sy), qx), qy).backward()

    alpha = rule.learning_rates()
    theta = {k: v.detach().clone() for k, v in model.named_parameters()}
    g0 = _grad(model, {k: v.requires_grad_() for k, v in theta.items()}, sx, sy)
    theta1 = {k: (v - alpha[k].detach() * g0[k]).detach().requires_grad_() for k, v in theta.items()}
    g1 = _grad(model, theta1, sx, sy)
    theta2 = {k: (v - alpha[k].detach() * g1[k]).detach().requires_grad_() for k, v in theta1.items()}
    gq = _grad(model, theta2, qx, qy)
    for k, a in alpha.items():
        torch.testing.assert_close(a.grad, -(g0[k] + g1[k]) * gq[k], rtol=1e-12, atol=1e-15)


# ----------------------------------------------------------------------------------- second order


def _query_loss_fn(maml: l2o.MAML, names: list[str], data, steps: int):
    sx, sy, qx, qy = data

    def fn(*tensors):
        params = maml.adapt(F.mse_loss, sx, sy, params=dict(zip(names, tensors[:len(names)])), steps=steps)
        return F.mse_loss(maml(params, qx), qy)

    return fn


@pytest.mark.parametrize("rule_name", ["sgd", "metasgd"])
def test_second_order_meta_gradient_gradcheck(rule_name):
    model = _mlp(2)
    rule = MetaSGD(model, lr=0.3).double() if rule_name == "metasgd" else l2o.SGD(lr=0.3)
    maml = l2o.MAML(model, inner_steps=2, rule=rule)
    names = [k for k, _ in model.named_parameters()]
    theta0 = [p.detach().clone().requires_grad_() for p in model.parameters()]
    # Meta-SGD's rates are read from the rule itself: pass the live parameters as gradcheck inputs
    # (gradcheck perturbs its inputs in place, so the rule sees the perturbation).
    inputs = theta0 + list(rule.parameters())
    assert torch.autograd.gradcheck(_query_loss_fn(maml, names, _data(7), 2), inputs, eps=1e-6, atol=1e-8)


def test_second_order_matches_explicit_loop_and_differs_from_first_order():
    model = _mlp(5)
    sx, sy, qx, qy = _data(8)
    maml = l2o.MAML(model, inner_lr=LR, inner_steps=2)
    F.mse_loss(maml(maml.adapt(F.mse_loss, sx, sy), qx), qy).backward()
    ours = [p.grad.clone() for p in model.parameters()]

    theta0 = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    theta = theta0
    for _ in range(2):
        g = _grad(model, theta, sx, sy, create_graph=True)
        theta = {k: v - LR * g[k] for k, v in theta.items()}
    ref = torch.autograd.grad(F.mse_loss(torch.func.functional_call(model, theta, (qx,)), qy), list(theta0.values()))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)

    model.zero_grad()
    fo = l2o.MAML(model, inner_lr=LR, inner_steps=2, first_order=True)
    F.mse_loss(fo(fo.adapt(F.mse_loss, sx, sy), qx), qy).backward()
    gap = max((p.grad - a).abs().max().item() for p, a in zip(model.parameters(), ours))
    assert gap > 1e-6, "first- and second-order meta-gradients coincide: second order is not second order"


def test_adapt_runs_through_the_unroll_engine(monkeypatch):
    calls = []
    real = maml_mod.run_unroll

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(maml_mod, "run_unroll", spy)
    maml = l2o.MAML(_mlp(), inner_steps=3)
    sx, sy, _, _ = _data(0)
    maml.adapt(F.mse_loss, sx, sy)
    maml.adapt_batch(F.mse_loss, *_data(0, 2)[:2], first_order=True)
    assert [(c["steps"], c["second_order"]) for c in calls] == [(3, True), (3, False)]


# ----------------------------------------------------------------------------------------- batched


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("rule_name", ["sgd", "metasgd"])
def test_batched_adapt_equals_per_task_loop(rule_name, first_order):
    model = _mlp(6, act=nn.ReLU)
    rule = MetaSGD(model, lr=LR).double() if rule_name == "metasgd" else None
    maml = l2o.MAML(model, inner_lr=LR, inner_steps=2, first_order=first_order, rule=rule)
    sx, sy, qx, qy = _data(9, 4)
    meta = list(maml.parameters())

    batched = maml.adapt_batch(F.mse_loss, sx, sy)
    assert all(v.shape == (4, *p.shape) for v, p in zip(batched.values(), model.parameters()))
    loss_b = torch.vmap(F.mse_loss)(maml.forward_batch(batched, qx), qy).sum()
    grads_b = torch.autograd.grad(loss_b, meta)

    loss_l = 0.0
    for b in range(4):
        params = maml.adapt(F.mse_loss, sx[b], sy[b])
        for k in params:
            torch.testing.assert_close(batched[k][b], params[k], rtol=1e-12, atol=1e-14)
        loss_l = loss_l + F.mse_loss(maml(params, qx[b]), qy[b])
    grads_l = torch.autograd.grad(loss_l, meta)
    torch.testing.assert_close(loss_b, loss_l, rtol=1e-13, atol=0)
    for a, b in zip(grads_b, grads_l):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("second_order", [True, False])
def test_shared_first_gradient_equals_the_summed_loss_gradient_at_the_expansion(second_order):
    """The per-task gradients at θ0 unbatched (``vmap(grad)``, ``in_dims=None``) are the gradient of
    the summed per-task loss at θ0 expanded, and so is their derivative with respect to θ0."""
    model = _mlp(3)
    sx, sy, _, _ = _data(4, 3)
    task = l2o.SupervisedTask(model, F.mse_loss, (sx, sy), batched=True)
    theta = dict(model.named_parameters())
    loss_s, grads_s = shared_loss_and_grads(task.instance_loss, theta, (sx, sy), second_order=second_order)
    expanded = {k: v.expand(3, *v.shape) for k, v in theta.items()}
    loss_e, grads_e = loss_and_grads(task, expanded, (sx, sy), create_graph=second_order)
    torch.testing.assert_close(loss_s, loss_e, rtol=1e-14, atol=0)
    for k in theta:
        assert grads_s[k].shape == (3, *theta[k].shape)
        torch.testing.assert_close(grads_s[k], grads_e[k], rtol=1e-12, atol=1e-15)
    assert all(g.requires_grad == second_order for g in grads_s.values())
    if second_order:
        probe = {k: torch.randn_like(g) for k, g in grads_s.items()}
        d_s = torch.autograd.grad(sum((g * probe[k]).sum() for k, g in grads_s.items()), list(theta.values()))
        d_e = torch.autograd.grad(sum((g * probe[k]).sum() for k, g in grads_e.items()), list(theta.values()))
        for a, b in zip(d_s, d_e):
            torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-14)


def test_batched_verbs_take_the_first_gradient_at_theta0_unbatched(monkeypatch):
    """adapt_batch and query_loss_batch evaluate the first support gradient on θ0 itself, not on
    B copies of it (what keeps B copies of θ0 out of a second-order graph)."""
    shapes = []
    one = l2o.SupervisedTask.instance_loss

    def spy(self, params, batch):
        shapes.append({k: tuple(v.shape) for k, v in params.items()})
        return one(self, params, batch)

    monkeypatch.setattr(l2o.SupervisedTask, "instance_loss", spy)
    model = _mlp()
    maml = l2o.MAML(model, inner_lr=LR, inner_steps=2)
    sx, sy, qx, qy = _data(5, 3)
    maml.adapt_batch(F.mse_loss, sx, sy)
    maml.query_loss_batch(F.mse_loss, sx, sy, qx, qy)
    theta_shapes = {k: tuple(p.shape) for k, p in model.named_parameters()}
    assert shapes == [theta_shapes, theta_shapes]  # one unbatched first gradient per call; later steps batched
    shapes.clear()
    maml.adapt_batch(F.mse_loss, sx, sy, params=maml.init.expand(3))  # given params: no shared θ0 assumed
    assert shapes == []


def test_a_task_redefining_loss_does_not_use_its_parents_instance_loss():
    class Doubled(l2o.SupervisedTask):
        def loss(self, params, batch):
            return 2.0 * super().loss(params, batch)

    model = _mlp()
    sx, sy, _, _ = _data(6, 2)
    assert instance_form(l2o.SupervisedTask(model, F.mse_loss, (sx, sy), batched=True)) is not None
    task = Doubled(model, F.mse_loss, (sx, sy), batched=True)
    assert instance_form(task) is None
    theta = dict(model.named_parameters())
    inner = l2o.InnerState(params={k: v.expand(2, *v.shape) for k, v in theta.items()}, rule_state=None, step=0)
    rule = l2o.SGD(lr=LR)
    inner = inner._replace(rule_state=rule.init(inner.params))
    got = run_unroll(rule, task, inner, steps=1, generator=torch.Generator(), weights=(0.0,), meta_split="train",
                     second_order=False, objective="loss", tape=False, options=None, record=False,
                     shared=theta).inner.params
    for k, v in theta.items():
        g = torch.stack([2.0 * _grad(model, theta, sx[b], sy[b])[k] for b in range(2)])
        torch.testing.assert_close(got[k], v - LR * g, rtol=1e-12, atol=1e-15)


def test_mamlinit_expand_is_a_differentiable_broadcast():
    init = l2o.MAMLInit(_mlp())
    params = init.expand(3)
    for (k, p), v in zip(init.model.named_parameters(), params.values()):
        assert v.shape == (3, *p.shape) and torch.equal(v[2], p)
    sum(v.sum() for v in params.values()).backward()
    for p in init.parameters():
        torch.testing.assert_close(p.grad, torch.full_like(p, 3.0))
    with pytest.raises(TypeError):
        init(torch.zeros(2))


def test_family_path_with_mamlinit_equals_maml_adapt_batch():
    """The trainer's path (init_inner(params=init.expand(B)) + unroll with a META meta-loss) and the
    user-facing verbs compute the same meta-loss and meta-gradient."""
    family = SineFamily(meta_batch_size=5, dtype=torch.float64)
    task = family.sample(torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    maml = l2o.MAML(family.model(), inner_lr=0.01, inner_steps=2)
    gen = torch.Generator()
    inner = l2o.init_inner(maml.rule, task, gen, params=maml.init.expand(task.num_tasks))
    res = l2o.unroll(maml.rule, task, inner, steps=2, generator=gen, weights=[0.0, 1.0], meta_split=META,
                     second_order=True)
    ours = torch.autograd.grad(res.meta_loss, list(maml.parameters()))
    params = maml.adapt_batch(F.mse_loss, *task.support)
    ref_loss = torch.vmap(F.mse_loss)(maml.forward_batch(params, task.query[0]), task.query[1]).mean()
    ref = torch.autograd.grad(ref_loss, list(maml.parameters()))
    torch.testing.assert_close(res.meta_loss, ref_loss, rtol=1e-13, atol=0)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-14)


# -------------------------------------------------------------------------------------- Meta-SGD


def test_metasgd_conforms():
    check_rule(MetaSGD(SHAPES, lr=0.05).double())
    check_rule(MetaSGD(SHAPES), dtype=torch.float32)


def test_metasgd_is_registered_and_round_trips_a_checkpoint(tmp_path):
    assert l2o.rules.RULES["metasgd"] is MetaSGD
    model = _mlp().float()  # a checkpoint rebuilds the rule in float32
    rule = MetaSGD(model, lr=0.02)
    with torch.no_grad():
        rule.alpha[0].add_(torch.arange(rule.alpha[0].numel(), dtype=rule.alpha[0].dtype).view_as(rule.alpha[0]))
    save_rule(tmp_path / "m.pt", rule, {"task": "sine"})
    back = load_rule(tmp_path / "m.pt")
    assert isinstance(back, MetaSGD) and back.config() == rule.config()
    assert back.config()["shapes"] == {k: list(p.shape) for k, p in model.named_parameters()}
    for a, b in zip(rule.alpha, back.alpha):
        assert torch.equal(a, b)


def test_metasgd_update_broadcasts_rates_over_a_task_dimension():
    rule = MetaSGD({"w": (2, 3), "s": ()}, lr=0.5).double()
    with torch.no_grad():
        rule.alpha[0].copy_(torch.arange(6.0).view(2, 3))
    g = {"w": torch.ones(4, 2, 3, dtype=torch.float64), "s": torch.full((4,), 2.0, dtype=torch.float64)}
    updates, state = rule.update(g, rule.init(g), g, step=0)
    assert state == MetaSGDState()
    torch.testing.assert_close(updates["w"], -torch.arange(6.0, dtype=torch.float64).view(2, 3).expand(4, 2, 3))
    torch.testing.assert_close(updates["s"], torch.full((4,), -1.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        rule.update({"w": torch.ones(3, 2), "s": torch.ones(())}, state, {"w": torch.ones(3, 2), "s": torch.ones(())}, step=0)
    with pytest.raises(ValueError, match="built for"):
        rule.update({"v": torch.ones(2, 3)}, state, {"v": torch.ones(2, 3)}, step=0)
    with pytest.raises(ValueError, match="lr"):
        MetaSGD({"w": (2,)}, lr=0.0)
    with pytest.raises(TypeError):
        MetaSGD([2, 3])


def test_metasgd_learning_rates_receive_nonzero_gradients():
    family = SineFamily(meta_batch_size=8)
    task = family.sample(torch.Generator().manual_seed(1))
    torch.manual_seed(1)
    model = family.model()
    maml = l2o.MAML(model, rule=MetaSGD(model, lr=0.01))
    params = maml.adapt_batch(F.mse_loss, *task.support)
    torch.vmap(F.mse_loss)(maml.forward_batch(params, task.query[0]), task.query[1]).mean().backward()
    assert len(list(maml.parameters())) == 2 * len(list(model.parameters()))
    for name, a in maml.rule.learning_rates().items():
        assert a.grad is not None and a.grad.shape == a.shape, name
        assert a.grad.abs().sum() > 0, f"alpha of {name} gets a zero meta-gradient"
        assert (a.grad != 0).float().mean() > 0.5, f"most of alpha of {name} gets no meta-gradient"
        assert torch.isfinite(a.grad).all()
    for p in model.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


# -------------------------------------------------------------------------------------- memory


def _live_tensors() -> tuple[int, int]:
    with warnings.catch_warnings():  # isinstance on some torch.distributed objects warns
        warnings.simplefilter("ignore", FutureWarning)
        tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    return len(tensors), sum(1 for t in tensors if t.grad_fn is not None)


@pytest.mark.parametrize("rule_name", ["sgd", "metasgd"])
def test_memory_stays_flat_across_episodes(rule_name):
    """Five meta-training episodes: every graph is freed by reference counting alone (gc disabled),
    the number of live tensors does not grow, and the .grads are plain tensors of the params' shapes."""
    family = SineFamily(meta_batch_size=4, shots=5, query_shots=5)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = family.model()
    maml = l2o.MAML(model, inner_steps=2, rule=MetaSGD(model) if rule_name == "metasgd" else None)
    opt = torch.optim.Adam(maml.parameters(), lr=1e-3)
    counts = []
    gc.collect()
    gc.disable()
    try:
        for _ in range(5):
            task = family.sample(gen)
            params = maml.adapt_batch(F.mse_loss, *task.support)
            loss = torch.vmap(F.mse_loss)(maml.forward_batch(params, task.query[0]), task.query[1]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            refs = [weakref.ref(loss)] + [weakref.ref(v) for v in params.values()]
            del params, loss, task
            assert all(r() is None for r in refs), "an adapted param or the meta-loss outlived its episode"
            for p in maml.parameters():
                assert p.grad.shape == p.shape and p.grad.grad_fn is None and not p.grad.requires_grad
            counts.append(_live_tensors())
    finally:
        gc.enable()
    assert counts[1:] == [counts[1]] * 4, f"live tensors (all, with grad_fn) per episode: {counts}"
    assert counts[-1][1] == counts[0][1], "tensors with a grad_fn accumulate across episodes"


# -------------------------------------------------------------------------------------- the API


def test_adapt_under_no_grad_keeps_no_graph_and_gives_the_same_params():
    model = _mlp()
    sx, sy, _, _ = _data(2)
    maml = l2o.MAML(model, inner_lr=LR, inner_steps=2)
    live = maml.adapt(F.mse_loss, sx, sy)
    with torch.no_grad():
        frozen = maml.adapt(F.mse_loss, sx, sy)
    for k in live:
        assert frozen[k].grad_fn is None
        torch.testing.assert_close(frozen[k], live[k].detach(), rtol=1e-14, atol=0)


def test_maml_parameters_and_forward():
    model = _mlp()
    assert list(l2o.MAML(model).parameters()) == list(model.parameters())  # SGD has no meta-params
    lstm = l2o.LSTMRule(hidden_size=4)
    joint = l2o.MAML(model, rule=lstm)
    assert len(list(joint.parameters())) == len(list(model.parameters())) + len(list(lstm.parameters()))
    x = torch.randn(3, 2, dtype=torch.float64)
    torch.testing.assert_close(joint(None, x), model(x))
    torch.testing.assert_close(joint(joint.params(), x), model(x))


def test_joint_init_and_lstm_rule_get_meta_gradients():
    model = _mlp(act=nn.ReLU)
    lstm = l2o.LSTMRule(hidden_size=4, output_scale=0.1).double()
    maml = l2o.MAML(model, inner_steps=2, rule=lstm)
    sx, sy, qx, qy = _data(3, 3)
    params = maml.adapt_batch(F.mse_loss, sx, sy)
    torch.vmap(F.mse_loss)(maml.forward_batch(params, qx), qy).mean().backward()
    for name, p in maml.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bad_arguments_are_refused():
    model = _mlp()
    with pytest.raises(ValueError, match="inner_steps"):
        l2o.MAML(model, inner_steps=0)
    with pytest.raises(ValueError, match="inner_lr"):
        l2o.MAML(model, inner_lr=-1.0)
    with pytest.raises(TypeError, match="first_order"):
        l2o.MAML(model, first_order=1)
    with pytest.raises(TypeError, match="Rule"):
        l2o.MAML(model, rule=torch.optim.SGD)
    with pytest.raises(ValueError, match="no parameters"):
        l2o.MAMLInit(nn.ReLU())
    sx, sy, _, _ = _data(0, 2)
    with pytest.raises(ValueError, match="scalar"):
        l2o.MAML(model).adapt_batch(lambda p, y: (p - y) ** 2, sx, sy)
    with pytest.raises(ValueError, match="query"):
        l2o.SupervisedTask(model, F.mse_loss, (sx, sy)).sample_batch(META, torch.Generator())


def test_adaptation_curve_reads_the_query_split_after_each_step():
    family = SineFamily(meta_batch_size=3, dtype=torch.float64)
    task = family.sample(torch.Generator().manual_seed(2))
    torch.manual_seed(2)
    maml = l2o.MAML(family.model(), inner_lr=0.01, inner_steps=3, first_order=True)
    curve = l2o.adaptation_curve(maml.rule, task, maml.init.expand(3), steps=3)
    assert curve.shape == (4, 3) and curve.grad_fn is None
    for t in range(4):
        params = maml.init.expand(3) if t == 0 else maml.adapt_batch(F.mse_loss, *task.support, steps=t)
        torch.testing.assert_close(curve[t], task.loss(params, task.query).detach(), rtol=1e-12, atol=0)
