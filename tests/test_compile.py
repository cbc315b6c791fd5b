"""The compiled unroll engine (``compile=``): the same numbers as the eager engine, for the
hand-designed rules, Meta-SGD and the LSTM, first and second order; batches drawn in the eager
order; validation once per unroll; the fallback and its warning; MAML's verbs, meta_train and the
CLI with compile.

Most tests trace with the ``aot_eager`` backend (AOTAutograd's forward and backward graphs, run
without generating code: the same graph inductor would compile, in a fraction of the time); one
test runs inductor itself."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn

import l2o
from l2o.compiling import CompileOptions, CompileWarning, compile_options
from l2o.rules.base import unchecked_update
from l2o.tasks import META, TRAIN
from l2o.unroll import init_inner, truncate, unroll

AOT = CompileOptions(backend="aot_eager", fallback=False)


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Equal to float rounding: float64 throughout, so a few ulps."""
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=lambda m: f"{what}: {m}")


class NoisyTask:
    """Two batched linear-regression instances whose training batches are drawn from the generator
    (so the order of the draws shows), with a separate meta split."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
        self.w = torch.randn(2, 3, 1, generator=g, dtype=torch.float64)

    def init(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {k: torch.randn(2, *v.shape, generator=generator, dtype=torch.float64) * 0.5
                for k, v in self.model.named_parameters()}

    def sample_batch(self, split: str, generator: torch.Generator):
        x = torch.randn(2, 5 if split == TRAIN else 7, 3, generator=generator, dtype=torch.float64)
        return x, x @ self.w

    def loss(self, params, batch):
        x, y = batch
        one = lambda p, xb, yb: ((torch.func.functional_call(self.model, p, (xb,)) - yb) ** 2).mean()  # noqa: E731
        return torch.vmap(one)(params, x, y)


def _rules() -> dict[str, l2o.Rule]:
    task = NoisyTask()
    shapes = dict(task.model.named_parameters())
    return {
        "sgd": l2o.SGD(lr=0.1),
        "sgd-momentum-wd": l2o.SGD(lr=0.1, momentum=0.9, weight_decay=0.01),
        "nag": l2o.NAG(lr=0.05),
        "rmsprop": l2o.RMSprop(lr=0.01, centered=True, momentum=0.5, eps_root=1e-12),
        "adam": l2o.Adam(lr=0.01, eps_root=1e-12),
        "metasgd": l2o.MetaSGD(shapes, lr=0.05),
        "lstm": l2o.LSTMRule(hidden_size=4, output_scale=0.01, fused=False).double(),
        "lstm-fused": l2o.LSTMRule(hidden_size=4, output_scale=0.01).double(),
    }


def _run(rule: l2o.Rule, compile, *, second_order: bool, meta_split: str, weights, objective: str = "loss",
         steps: int = 3, start: l2o.InnerState | None = None):
    task = NoisyTask()
    gen = torch.Generator().manual_seed(5)
    theta0 = {k: v.requires_grad_() for k, v in task.init(torch.Generator().manual_seed(1)).items()}
    inner = init_inner(rule, task, gen, params=theta0) if start is None else start
    result = unroll(rule, task, inner, steps=steps, generator=gen, weights=weights, meta_split=meta_split,
                    second_order=second_order, objective=objective, compile=compile)
    wrt = list(theta0.values()) + [p for p in rule.parameters()]
    grads = torch.autograd.grad(result.meta_loss, wrt, allow_unused=True)
    return result, [torch.zeros_like(w) if g is None else g for w, g in zip(wrt, grads)], gen


CASES = [  # (second_order, meta_split, weights, objective)
    (True, META, [0.0, 0.0, 1.0], "loss"),
    (True, TRAIN, [1.0, 0.5, 2.0], "log_loss"),
    (False, TRAIN, None, "loss"),
    (False, META, [0.0, 1.0, 1.0], "log_loss"),
]


@pytest.mark.parametrize("name", list(_rules()))
@pytest.mark.parametrize("case", CASES, ids=["so-meta-final", "so-train-log", "fo-train", "fo-meta-log"])
def test_compiled_unroll_equals_eager(name, case):
    second_order, meta_split, weights, objective = case
    rule = _rules()[name]
    eager, g_eager, gen_eager = _run(rule, False, second_order=second_order, meta_split=meta_split, weights=weights,
                                     objective=objective)
    comp, g_comp, gen_comp = _run(rule, AOT, second_order=second_order, meta_split=meta_split, weights=weights,
                                  objective=objective)
    _close(comp.meta_loss, eager.meta_loss, "meta-loss")
    _close(comp.losses, eager.losses, "losses")
    assert comp.finite and eager.finite and comp.inner.step == eager.inner.step == 3
    for k in eager.inner.params:
        _close(comp.inner.params[k], eager.inner.params[k], f"params[{k}]")
    for a, b in zip(l2o.tree.state_leaves(comp.inner.rule_state), l2o.tree.state_leaves(eager.inner.rule_state)):
        _close(a, b, "rule state")
    assert any(float(g.abs().max()) > 0 for g in g_eager)
    for a, b in zip(g_comp, g_eager):
        _close(a, b, "meta-gradient")
    # the batches were drawn in the eager order: both generators end in the same state
    assert torch.equal(gen_comp.get_state(), gen_eager.get_state())


def test_first_order_cached_gradients_continue_the_same_truncations():
    rule = l2o.Adam(lr=0.01, eps_root=1e-12)
    results = {}
    for compile in (False, AOT):
        task = NoisyTask()
        gen = torch.Generator().manual_seed(3)
        inner = init_inner(rule, task, gen, params=task.init(torch.Generator().manual_seed(1)))
        out = []
        for _ in range(3):  # the second and third truncations start from the cached gradients
            res = unroll(rule, task, inner, steps=2, generator=gen, compile=compile)
            inner = truncate(res.inner)
            out.append(res.meta_loss.detach())
        assert inner.grads is not None
        results[bool(compile)] = (out, inner)
    for a, b in zip(*(r[0] for r in results.values())):
        _close(a, b, "meta-loss")
    for k, v in results[False][1].params.items():
        _close(results[True][1].params[k], v, k)


def test_non_finite_losses_are_reported():
    rule = l2o.SGD(lr=1e200)
    for compile in (False, AOT):
        res, _, _ = _run(rule, compile, second_order=False, meta_split=TRAIN, weights=None)
        assert not res.finite


def test_the_engine_validates_once_per_unroll_then_steps_unchecked(monkeypatch):
    rule = l2o.Adam(lr=0.01)
    calls = {"check": 0, "update": 0}
    check, update = rule.check_update, rule.update

    def count_check(*a, **k):
        calls["check"] += 1
        return check(*a, **k)

    def count_update(*a, **k):
        calls["update"] += 1
        return update(*a, **k)

    monkeypatch.setattr(rule, "check_update", count_check)
    monkeypatch.setattr(rule, "update", count_update)
    _run(rule, False, second_order=False, meta_split=TRAIN, weights=None, steps=4)
    assert calls == {"check": 1, "update": 0}


def test_a_subclass_that_overrides_update_keeps_its_update():
    class Halved(l2o.SGD):
        def update(self, grads, state, params, *, step, loss=None):
            updates, state = super().update(grads, state, params, step=step, loss=loss)
            return {k: u * 0.5 for k, u in updates.items()}, state

    class Own(l2o.SGD):
        def update_unchecked(self, grads, state, params, *, step, loss=None):
            return {k: -g for k, g in grads.items()}, state

    params = {"w": torch.ones(3)}
    grads = {"w": torch.full((3,), 2.0)}
    for rule, expected in ((Halved(lr=0.1), 0.9), (Own(lr=0.1), -1.0), (l2o.SGD(lr=0.1), 0.8)):
        _, step = unchecked_update(rule)
        new, _ = step(grads, rule.init(params), params, step=0)
        torch.testing.assert_close(new["w"], torch.full((3,), expected))


def test_a_bad_state_is_refused_before_any_step():
    task = NoisyTask()
    rule = l2o.Adam()
    gen = torch.Generator()
    params = task.init(gen)
    bad = l2o.InnerState(params, rule.init({"other": torch.zeros(2)}), 0)
    for compile in (False, AOT):
        with pytest.raises(ValueError, match="call Adam.init"):
            unroll(rule, task, bad, steps=2, generator=gen, compile=compile)


# ------------------------------------------------------------------------------------------- options


def test_compile_options_are_checked():
    assert compile_options(False) is None and compile_options(None) is None
    assert compile_options(True) == CompileOptions()
    assert compile_options("aot_eager").backend == "aot_eager"
    with pytest.raises(TypeError, match="compile must be True, False"):
        compile_options(1)
    with pytest.raises(TypeError, match="fallback must be True or False"):
        CompileOptions(fallback="no")
    with pytest.raises(ValueError, match="compile must be True, False or a torch.compile backend"):
        l2o.MetaTrainConfig(compile=3).validate()


def test_failed_compilation_warns_and_falls_back_to_the_eager_numbers():
    rule = l2o.SGD(lr=0.1)
    eager, g_eager, _ = _run(rule, False, second_order=True, meta_split=META, weights=[0.0, 0.0, 1.0])
    with pytest.warns(CompileWarning, match="torch.compile of the unroll failed .*no_such_backend.*running it eagerly"):
        comp, g_comp, _ = _run(rule, CompileOptions(backend="no_such_backend"), second_order=True, meta_split=META,
                               weights=[0.0, 0.0, 1.0])
    assert torch.equal(comp.meta_loss, eager.meta_loss)
    for a, b in zip(g_comp, g_eager):
        assert torch.equal(a, b)
    with warnings.catch_warnings():  # once per configuration: the second call runs eagerly at once
        warnings.simplefilter("error")
        _run(rule, CompileOptions(backend="no_such_backend"), second_order=True, meta_split=META,
             weights=[0.0, 0.0, 1.0])


def test_fallback_false_raises_the_compile_error():
    with pytest.raises(Exception, match="no_such_backend_either"):
        _run(l2o.SGD(lr=0.1), CompileOptions(backend="no_such_backend_either", fallback=False), second_order=False,
             meta_split=TRAIN, weights=None)


def test_an_error_of_the_callers_own_is_raised_as_it_is_without_the_warning():
    maml = l2o.MAML(nn.Linear(2, 1).double(), compile=CompileOptions(backend="aot_eager"))
    x = torch.randn(4, 2, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileWarning)
        with pytest.raises(ValueError, match="loss_fn must return a scalar"):
            maml.adapt(lambda p, y: (p - y) ** 2, x, torch.zeros(4, 1, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------- MAML


def _maml_pair(rule_name: str, first_order: bool):
    out = []
    for compile in (False, AOT):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(2, 6), nn.ReLU(), nn.Linear(6, 1)).double()
        rule = l2o.MetaSGD(model, lr=0.1).double() if rule_name == "metasgd" else None
        out.append(l2o.MAML(model, inner_lr=0.1, inner_steps=2, first_order=first_order, rule=rule, compile=compile))
    return out


def _episodes(b: int = 3):
    g = torch.Generator().manual_seed(2)
    return [torch.randn(b, n, d, generator=g, dtype=torch.float64) for n, d in ((5, 2), (5, 1), (7, 2), (7, 1))]


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("rule_name", ["sgd", "metasgd"])
def test_maml_verbs_compiled_equal_eager(rule_name, first_order):
    sx, sy, qx, qy = _episodes()
    results = []
    warnings.simplefilter("error", CompileWarning)  # compiled, not an eager fallback (pytest restores filters)
    for maml in _maml_pair(rule_name, first_order):
        losses = {
            "batched": lambda: ((maml.forward_batch(maml.adapt_batch(F.mse_loss, sx, sy), qx) - qy) ** 2).mean((1, 2)).mean(),
            "query": lambda: maml.query_loss_batch(F.mse_loss, sx, sy, qx, qy),
            "one task": lambda: F.mse_loss(maml(maml.adapt(F.mse_loss, sx[0], sy[0]), qx[0]), qy[0]),
        }
        values, grads = [], []
        for fn in losses.values():  # a compiled backward runs once (no retain_graph): one graph per gradient
            value = fn()
            values.append(value.detach())
            grads.append(torch.autograd.grad(value, list(maml.parameters())))
        results.append((values, grads))
    (values_e, grads_e), (values_c, grads_c) = results
    _close(values_e[1], values_e[0], "query_loss_batch vs adapt_batch + forward_batch")
    for a, b in zip(values_c, values_e):
        _close(a, b, "meta-loss")
    for ge, gc in zip(grads_e, grads_c):
        for a, b in zip(gc, ge):
            _close(a, b, "meta-gradient")
    for a, b in zip(grads_e[1], grads_e[0]):
        _close(a, b, "query_loss_batch's meta-gradient")


def test_maml_inside_a_users_torch_compile_is_traced_functionally():
    maml, _ = _maml_pair("sgd", False)
    sx, sy, qx, qy = _episodes()

    def meta_loss():
        pred = maml.forward_batch(maml.adapt_batch(F.mse_loss, sx, sy), qx)
        return ((pred - qy) ** 2).mean()

    compiled = torch.compile(meta_loss, backend="aot_eager", fullgraph=True)  # autograd.grad would break the graph
    expected = meta_loss()
    got = compiled()
    _close(got, expected, "meta-loss")
    for a, b in zip(torch.autograd.grad(got, list(maml.parameters())),
                    torch.autograd.grad(expected, list(maml.parameters()))):
        _close(a, b, "meta-gradient")


def test_maml_compiled_lstm_rule_equals_eager():
    sx, sy, qx, qy = _episodes(2)
    values = []
    for compile in (False, AOT):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).double()
        rule = l2o.LSTMRule(hidden_size=3, output_scale=0.1, fused=False).double()
        maml = l2o.MAML(model, inner_steps=2, rule=rule, compile=compile)
        loss = maml.query_loss_batch(F.mse_loss, sx, sy, qx, qy)
        values.append((loss, torch.autograd.grad(loss, list(maml.parameters()))))
    _close(values[1][0], values[0][0], "meta-loss")
    for a, b in zip(values[1][1], values[0][1]):
        _close(a, b, "meta-gradient")


# ----------------------------------------------------------------------------------- meta_train, CLI


def test_meta_train_maml_mode_compiled_equals_eager():
    from optimizees.sine import SineFamily

    results = []
    for compile in (False, "aot_eager"):
        torch.manual_seed(0)
        family = SineFamily(meta_batch_size=3, hidden=(8,), dtype=torch.float64)
        init = l2o.MAMLInit(family.model())
        rule = l2o.MetaSGD(init.model, lr=0.01)
        config = l2o.MetaTrainConfig(epochs=3, horizon=1, truncation=1, step_weights="final", meta_split=META,
                                     second_order=True, validate_every=0, meta_lr=1e-3, compile=compile)
        result = l2o.meta_train(rule, family, config, progress=False, init=init)
        results.append((result.history["epoch_loss"], [p.detach().clone() for p in init.parameters()]))
    (loss_e, p_e), (loss_c, p_c) = results
    assert len(loss_c) == len(loss_e) == 3
    for a, b in zip(loss_c, loss_e):
        assert math.isclose(a, b, rel_tol=1e-12)
    for a, b in zip(p_c, p_e):
        _close(a, b, "θ0 after meta-training")


def test_cli_maml_compile(tmp_path):
    from l2o.cli import main

    out = tmp_path / "sine.pt"
    code = main(["maml", "--task", "sine", "--iterations", "2", "--validate-every", "1", "--num-val-tasks", "1",
                 "--eval-tasks", "4", "--eval-steps", "1", "--meta-batch", "2", "--no-progress", "--compile",
                 "aot_eager", "--out", str(out)])
    assert code == 0 and out.is_file()
    rule = l2o.load_rule(out)
    assert rule is not None


def test_cli_meta_train_accepts_compile():
    from l2o.cli import build_parser

    args = build_parser().parse_args(["meta-train", "--task", "quadratic", "--out", "x.pt", "--compile"])
    assert args.compile is True
    args = build_parser().parse_args(["meta-train", "--task", "quadratic", "--out", "x.pt", "--compile", "aot_eager"])
    assert args.compile == "aot_eager"


# ------------------------------------------------------------------------------------------- inductor


def test_inductor_maml_second_order_equals_eager_to_float32_rounding():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    sx, sy, qx, qy = (torch.randn(4, n, d, generator=g) for n, d in ((6, 1), (6, 1), (6, 1), (6, 1)))
    values = []
    for compile in (False, CompileOptions(fallback=False)):
        torch.manual_seed(0)
        maml = l2o.MAML(nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1)), inner_lr=0.01, compile=compile)
        loss = maml.query_loss_batch(F.mse_loss, sx, sy, qx, qy)
        values.append((loss, torch.autograd.grad(loss, list(maml.parameters()))))
    torch.testing.assert_close(values[1][0], values[0][0], rtol=1e-6, atol=1e-6)
    for a, b in zip(values[1][1], values[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_inductor_per_task_adaptation_equals_eager():
    """One task at a time (params are the module's own, unbatched), where inductor once computed
    wrong SGD steps (``add(..., alpha=)`` of a ``torch.func.grad`` output)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1))
    g = torch.Generator().manual_seed(1)
    sx, sy, qx, qy = (torch.randn(2, 5, 1, generator=g) for _ in range(4))
    values = []
    for compile in (False, CompileOptions(fallback=False)):
        maml = l2o.MAML(model, inner_lr=0.1, compile=compile)
        loss = sum(F.mse_loss(maml(maml.adapt(F.mse_loss, sx[b], sy[b]), qx[b]), qy[b]) for b in range(2))
        values.append((loss, torch.autograd.grad(loss, list(model.parameters()))))
    torch.testing.assert_close(values[1][0], values[0][0], rtol=1e-6, atol=1e-6)
    for a, b in zip(values[1][1], values[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(_rules()))
@pytest.mark.parametrize("case", CASES, ids=["so-meta-final", "so-train-log", "fo-train", "fo-meta-log"])
def test_inductor_unroll_equals_eager(name, case):
    second_order, meta_split, weights, objective = case
    rule = _rules()[name]
    eager, g_eager, _ = _run(rule, False, second_order=second_order, meta_split=meta_split, weights=weights,
                             objective=objective)
    comp, g_comp, _ = _run(rule, CompileOptions(fallback=False), second_order=second_order, meta_split=meta_split,
                           weights=weights, objective=objective)
    torch.testing.assert_close(comp.meta_loss, eager.meta_loss, rtol=1e-9, atol=1e-12)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
