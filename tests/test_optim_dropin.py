"""What a drop-in optimizer must honour: decoupled weight decay per param group, param-group keys
(used or refused), non-finite steps never written, and one rule call per param group for rules
with per-tensor state; every hand-designed rule still follows its ``torch.optim`` namesake."""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any, Callable

import pytest
import torch
from torch import nn

import l2o
from l2o.rules.lstm import LSTMRule

# ---------------------------------------------------------------------------------------- utilities


class Net(nn.Module):
    """fc1 (7x5 + 7), fc2 (3x7 + 3) and a 0-d scale; random non-degenerate weights."""

    def __init__(self, dtype: torch.dtype = torch.float64, seed: int = 0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 7)
        self.fc2 = nn.Linear(7, 3)
        self.scale = nn.Parameter(torch.tensor(1.0))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + (1.0 if p.dim() == 0 else 0.0))
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x))) * self.scale


def backward(model: nn.Module, t: int) -> None:
    gen = torch.Generator().manual_seed(100 + t)
    dtype = model.fc1.weight.dtype
    x, y = torch.randn(16, 5, generator=gen).to(dtype), torch.randn(16, 3, generator=gen).to(dtype)
    for p in model.parameters():
        p.grad = None
    ((model(x) - y) ** 2).mean().backward()


def groups(model: nn.Module, extra: nn.Parameter | None = None, **per_group: Any) -> list[dict[str, Any]]:
    """Hugging Face style: weights (with ``extra``, a parameter that never gets a gradient) and the rest."""
    decay = [model.fc1.weight, model.fc2.weight] + ([extra] if extra is not None else [])
    return [{"params": decay, **per_group.get("decay", {})},
            {"params": [model.fc1.bias, model.fc2.bias, model.scale], **per_group.get("rest", {})}]


def assert_close_models(a: nn.Module, b: nn.Module, rtol: float = 1e-12, atol: float = 1e-13) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def assert_equal_models(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), f"{name} differs by {(p - q).abs().max().item()}"


def small_lstm(seed: int = 0, **kwargs: Any) -> LSTMRule:
    torch.manual_seed(seed)
    return LSTMRule(hidden_size=kwargs.pop("hidden_size", 6), output_scale=kwargs.pop("output_scale", 0.1), **kwargs)


# ----------------------------------------------------------------------------------- weight decay


def test_weight_decay_with_the_adam_rule_is_torch_adamw():
    """Two groups with different weight decay, a parameter that never gets a gradient, 20 steps,
    float64: the trajectory of torch.optim.AdamW(lr=1e-3)."""
    a, b = Net(), Net()
    unused_a, unused_b = (nn.Parameter(torch.randn(4, dtype=torch.float64)) for _ in range(2))
    with torch.no_grad():
        unused_b.copy_(unused_a)
    per_group = {"decay": {"weight_decay": 0.1}, "rest": {"weight_decay": 0.01}}
    opt_a = l2o.LearnedOptimizer(groups(a, unused_a, **per_group), rule=l2o.Adam(lr=1e-3))
    opt_b = torch.optim.AdamW(groups(b, unused_b, **per_group), lr=1e-3)
    assert [g["weight_decay"] for g in opt_a.param_groups] == [0.1, 0.01]
    for t in range(20):
        for m, o in ((a, opt_a), (b, opt_b)):
            backward(m, t)
            o.step()
        assert_close_models(a, b)
    assert torch.equal(unused_a, unused_b) and unused_a not in opt_a.state
    moved = (a.fc1.weight - Net().fc1.weight).abs().max()
    assert moved > 1e-3  # the comparison is not between parameters that stayed put


def test_weight_decay_default_and_decoupled_from_the_gradient():
    """The constructor's weight_decay is the default of every group; the decay is
    θ <- (1 - lr η λ) θ + lr u with u the rule's update at the undecayed θ (η: the rule's lr)."""
    a, b = Net(), Net()
    opt_a = l2o.LearnedOptimizer(a.parameters(), rule=l2o.SGD(lr=0.1, momentum=0.9), lr=0.5, weight_decay=0.2)
    opt_b = l2o.LearnedOptimizer(b.parameters(), rule=l2o.SGD(lr=0.1, momentum=0.9), lr=0.5)
    assert opt_a.defaults["weight_decay"] == 0.2 and opt_b.defaults["weight_decay"] == 0.0
    opt_a.add_param_group({"params": [nn.Parameter(torch.zeros(2, dtype=torch.float64))]})
    assert opt_a.param_groups[1]["weight_decay"] == 0.2
    before = [p.detach().clone() for p in a.parameters()]
    for m, o in ((a, opt_a), (b, opt_b)):
        backward(m, 0)
        o.step()
    for p0, p, q in zip(before, a.parameters(), b.parameters()):
        # b took the undecayed step p0 + lr u; a also shrank p0 by lr * η * λ = 0.5 * 0.1 * 0.2
        torch.testing.assert_close(p, (1 - 0.5 * 0.1 * 0.2) * p0 + (q - p0), rtol=1e-14, atol=1e-15)


def test_weight_decay_with_schedulers_and_a_state_dict_round_trip():
    """OneCycleLR (cycle_momentum=False) and LambdaLR drive the group lr, which scales the decay
    as AdamW's lr does; their keys (initial_lr, max_lr, min_lr) are accepted, and a mid-run
    state_dict round trip of optimizer and scheduler continues the identical trajectory."""
    schedulers: dict[str, Callable[[torch.optim.Optimizer, float], Any]] = {
        "OneCycleLR": lambda o, m: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=m, total_steps=20,
                                                                       cycle_momentum=False),
        "LambdaLR": lambda o, m: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 1.0 / (1 + e)),
    }
    for name, make in schedulers.items():
        a, b = Net(), Net()
        per_group = {"decay": {"weight_decay": 0.1}, "rest": {"weight_decay": 0.0}}
        opt_a = l2o.LearnedOptimizer(groups(a, **per_group), rule=l2o.Adam(lr=1e-3))
        opt_b = torch.optim.AdamW(groups(b, **per_group), lr=1e-3)
        sched_a, sched_b = make(opt_a, 1.0), make(opt_b, 1e-3)
        for t in range(10):
            for m, o, s in ((a, opt_a, sched_a), (b, opt_b, sched_b)):
                backward(m, t)
                o.step()
                s.step()
            assert_close_models(a, b)
        if name == "OneCycleLR":
            assert {"initial_lr", "max_lr", "min_lr"} <= set(opt_a.param_groups[0])
        # round trip: a fresh optimizer and scheduler loaded mid-run continue bitwise like the original
        c = Net()
        c.load_state_dict(a.state_dict())
        opt_c = l2o.LearnedOptimizer(groups(c, **per_group), rule=l2o.Adam(lr=1e-3))
        sched_c = make(opt_c, 1.0)
        opt_c.load_state_dict(opt_a.state_dict())
        sched_c.load_state_dict(sched_a.state_dict())
        for t in range(10, 20):
            for m, o, s in ((a, opt_a, sched_a), (b, opt_b, sched_b), (c, opt_c, sched_c)):
                backward(m, t)
                o.step()
                s.step()
            assert_close_models(a, b)
            assert_equal_models(a, c)
        assert opt_c.param_groups[0]["lr"] == opt_a.param_groups[0]["lr"] != 1.0, name


@pytest.mark.parametrize("wd, err", [(-0.1, ValueError), (math.nan, ValueError), (math.inf, ValueError),
                                     ("0.1", TypeError), (True, TypeError), (None, TypeError)])
def test_bad_weight_decay_is_refused(wd, err):
    model = Net()
    with pytest.raises(err, match="weight_decay"):
        l2o.LearnedOptimizer(model.parameters(), rule=l2o.Adam(), weight_decay=wd)
    opt = l2o.LearnedOptimizer([model.fc1.weight], rule=l2o.Adam())
    with pytest.raises(err, match="weight_decay"):
        opt.add_param_group({"params": [model.fc1.bias], "weight_decay": wd})
    assert len(opt.param_groups) == 1


def test_weight_decay_needs_a_nominal_step_size():
    """An LSTM rule declares no nominal step size: weight_decay > 0 is refused (0 is fine);
    declaring one (nominal_lr) makes it apply; a decay factor <= 0 is refused."""
    model = Net(torch.float32)
    with pytest.raises(ValueError, match="nominal step size.*LSTMRule declares none"):
        l2o.LearnedOptimizer(model.parameters(), rule=small_lstm(), weight_decay=0.1)
    with pytest.raises(ValueError, match="nominal step size"):
        l2o.LearnedOptimizer([{"params": [model.fc1.weight], "weight_decay": 0.01}], rule=small_lstm())
    l2o.LearnedOptimizer(model.parameters(), rule=small_lstm(), weight_decay=0.0)
    rule = small_lstm()
    rule.nominal_lr = 1e-2
    a, b = Net(torch.float32), Net(torch.float32)
    opt_a = l2o.LearnedOptimizer(a.parameters(), rule=rule, weight_decay=0.5)
    opt_b = l2o.LearnedOptimizer(b.parameters(), rule=rule)
    before = [p.detach().clone() for p in a.parameters()]
    for m, o in ((a, opt_a), (b, opt_b)):
        backward(m, 0)
        o.step()
    for p0, p, q in zip(before, a.parameters(), b.parameters()):
        torch.testing.assert_close(p, (1 - 1e-2 * 0.5) * p0 + (q - p0), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match=">= 1"):
        l2o.LearnedOptimizer(a.parameters(), rule=l2o.SGD(lr=0.5), weight_decay=2.0)
    opt = l2o.LearnedOptimizer(a.parameters(), rule=small_lstm())
    opt.param_groups[0]["weight_decay"] = 0.1  # written into the group later: refused at step, nothing moves
    backward(a, 1)
    before = [p.detach().clone() for p in a.parameters()]
    with pytest.raises(ValueError, match="nominal step size"):
        opt.step()
    assert all(torch.equal(p0, p) for p0, p in zip(before, a.parameters()))


# ----------------------------------------------------------------------------------- group keys


@pytest.mark.parametrize("key, hint", [("momentum", "hyperparameter of the rule"), ("betas", "rule=l2o.Adam"),
                                       ("foreach", "no 'foreach' option"), ("learning_rate", "does not use")])
def test_unknown_group_keys_are_refused_naming_the_key_and_the_accepted_ones(key, hint):
    model = Net()
    accepted = "accepted keys: params, lr, weight_decay (read by the optimizer) and param_names, initial_lr"
    with pytest.raises(ValueError, match=f"param group 0 has key '{key}'.*{hint}") as info:
        l2o.LearnedOptimizer([{"params": model.parameters(), key: 0.9}], rule=l2o.Adam())
    assert accepted in str(info.value)
    opt = l2o.LearnedOptimizer([model.fc1.weight], rule=l2o.Adam())
    with pytest.raises(ValueError, match=f"param group 1 has key '{key}'"):
        opt.add_param_group({"params": [model.fc1.bias], key: 0.9})
    assert len(opt.param_groups) == 1
    # a key written into a group later is refused at the next step, before anything changes
    opt.param_groups[0][key] = 0.9
    backward(model, 0)
    before = model.fc1.weight.detach().clone()
    with pytest.raises(ValueError, match=f"param group 0 has key '{key}'"):
        opt.step()
    assert torch.equal(before, model.fc1.weight) and not opt.state


def test_differentiable_true_is_refused():
    with pytest.raises(ValueError, match="differentiable=True"):
        l2o.LearnedOptimizer([{"params": Net().parameters(), "differentiable": True}], rule=l2o.Adam())


def test_keys_of_torch_and_common_trainers_are_accepted_and_named_parameters_name_warnings():
    model = Net()
    opt = l2o.LearnedOptimizer(
        [{"params": [model.fc1.weight], "name": "weights", "lr_scale": 0.5, "initial_lr": 1.0, "swa_lr": 0.1,
          "max_lr": 1.0, "min_lr": 0.0, "differentiable": False},
         {"params": [model.fc1.bias]}], rule=l2o.Adam(lr=1e-3))
    backward(model, 0)
    opt.step()
    assert opt.param_groups[0]["name"] == "weights" and opt.state[model.fc1.weight]["step"] == 1
    named = l2o.LearnedOptimizer(model.named_parameters(), rule=l2o.Adam())
    assert named.param_groups[0]["param_names"] == [n for n, _ in model.named_parameters()]
    sd = named.state_dict()
    assert sd["param_groups"][0]["param_names"] == ["scale", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    fresh = l2o.LearnedOptimizer(model.named_parameters(), rule=l2o.Adam())
    fresh.load_state_dict(sd)


def test_a_foreign_state_dict_loads_without_its_other_keys():
    """torch.optim.Adam's groups carry betas, eps, ...: they are dropped with a warning naming them;
    a saved group without weight_decay (an older state dict) keeps the current group's value."""
    model = Net()
    ref = torch.optim.Adam(model.parameters(), lr=0.01)
    backward(model, 0)
    ref.step()
    opt = l2o.LearnedOptimizer(model.parameters(), rule=l2o.Adam(lr=0.01), weight_decay=0.05)
    with pytest.warns(RuntimeWarning, match=r"dropped param-group keys \['amsgrad', 'betas'.*'eps'"):
        opt.load_state_dict(ref.state_dict())
    assert set(opt.param_groups[0]) == {"params", "lr", "weight_decay", "differentiable"}
    assert opt.param_groups[0]["weight_decay"] == 0.0  # torch.optim.Adam saved its (coupled) 0
    sd = opt.state_dict()
    del sd["param_groups"][0]["weight_decay"]
    opt2 = l2o.LearnedOptimizer(model.parameters(), rule=l2o.Adam(lr=0.01), weight_decay=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["weight_decay"] == 0.05


# ------------------------------------------------------------------------------- non-finite steps

NONFINITE_RULES: dict[str, Callable[[], l2o.Rule]] = {
    "adam": lambda: l2o.Adam(lr=1e-2),
    "sgd_momentum": lambda: l2o.SGD(lr=0.05, momentum=0.9),
    "lstm": lambda: small_lstm(1, preprocess="log_sign"),
}


@pytest.mark.parametrize("name", NONFINITE_RULES)
def test_a_nonfinite_step_is_skipped_kept_and_warned_once_by_name(name):
    """A NaN gradient in fc1.weight and an Inf in fc2.bias: those two tensors are left exactly as
    they were (value, rule state, step count), the others step; the warning names each once. The
    run then continues exactly like one in which those two had no gradient at that step."""
    dtype = torch.float32 if name == "lstm" else torch.float64
    a, b = Net(dtype), Net(dtype)
    opt_a = l2o.LearnedOptimizer(a.named_parameters(), rule=NONFINITE_RULES[name](), weight_decay=0.0)
    opt_b = l2o.LearnedOptimizer(b.named_parameters(), rule=NONFINITE_RULES[name]())
    for t in range(3):
        for m, o in ((a, opt_a), (b, opt_b)):
            backward(m, t)
            o.step()
    backward(a, 3)
    backward(b, 3)
    a.fc1.weight.grad[2, 1] = math.nan
    a.fc2.bias.grad[0] = math.inf
    b.fc1.weight.grad = b.fc2.bias.grad = None
    kept = {n: (p.detach().clone(), copy.deepcopy(opt_a.state[p])) for n, p in a.named_parameters()
            if n in ("fc1.weight", "fc2.bias")}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt_a.step()
        opt_b.step()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 2, messages
    assert any("parameter 'fc1.weight' (param group 0, position 1, shape (7, 5)) is not finite" in m for m in messages)
    assert any("parameter 'fc2.bias' (param group 0, position 4, shape (3,))" in m for m in messages)
    assert all("rule state was kept" in m for m in messages)
    assert all(w.filename == __file__ for w in caught)  # the warning points at the caller's step()
    for n, p in a.named_parameters():
        if n in kept:
            value, state = kept[n]
            assert torch.equal(p, value) and opt_a.state[p]["step"] == 3
            assert all(torch.equal(v, opt_a.state[p][k]) if isinstance(v, torch.Tensor) else v == opt_a.state[p][k]
                       for k, v in state.items())
    assert_equal_models(a, b)
    # non-finite again: skipped again, without a second warning; then the runs go on identically
    backward(a, 4)
    a.fc1.weight.grad.fill_(math.nan)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt_a.step()
    assert not caught and torch.equal(kept["fc1.weight"][0], a.fc1.weight)
    backward(b, 4)
    b.fc1.weight.grad = None
    opt_b.step()
    for t in range(5, 8):
        for m, o in ((a, opt_a), (b, opt_b)):
            backward(m, t)
            o.step()
    assert_equal_models(a, b)
    assert all(torch.isfinite(p).all() for p in a.parameters())


class _NewState(l2o.Rule):
    """A test rule: SGD (lr 0.1) whose update is Inf where |g| > 10 (from a finite gradient), with a
    running sum of the gradients as its state, computed anew by ``update``."""

    name = "test-new-state"
    per_tensor_state = True
    lr = 0.1

    def init(self, params):
        return ({k: torch.zeros_like(p) for k, p in params.items()},)

    def _updates(self, grads):
        return {k: torch.where(g.abs() > 10, math.inf, -self.lr * g) for k, g in grads.items()}

    def update(self, grads, state, params, *, step, loss=None):
        return self._updates(grads), ({k: state[0][k] + g for k, g in grads.items()},)

    def config(self):
        return {}


class _InPlace(_NewState):
    """:class:`_NewState` whose ``update_`` overwrites the state it is given."""

    name = "test-in-place"

    def update_(self, grads, state, params, *, step, loss=None):
        for k, g in grads.items():
            state[0][k].add_(g)
        return self._updates(grads), state


@pytest.mark.parametrize("in_place", [False, True])
def test_a_nonfinite_update_from_finite_gradients_keeps_or_resets_the_state(in_place):
    """A rule that computes a new state keeps the old one on a skipped step; one that overwrote it
    in place has it reset to the initial state (step 0), and the warning says so."""
    p, q = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
    opt = l2o.LearnedOptimizer([p, q], rule=_InPlace() if in_place else _NewState())
    for _ in range(2):
        p.grad, q.grad = torch.full((3,), 1.0), torch.full((2,), 1.0)
        opt.step()
    p.grad, q.grad = torch.tensor([1.0, 20.0, 1.0]), torch.full((2,), 1.0)
    p_before, q_before = p.detach().clone(), q.detach().clone()
    with pytest.warns(RuntimeWarning, match="the update of parameter \\(param group 0, position 0, shape \\(3,\\)\\)") as info:
        opt.step()
    assert len(info) == 1
    assert torch.equal(p.detach(), p_before) and torch.equal(q.detach(), q_before - 0.1)
    if in_place:
        assert "reset to the initial state" in str(info[0].message)
        assert opt.state[p]["step"] == 0 and torch.equal(opt.state[p]["0"], torch.zeros(3))
    else:
        assert "rule state was kept" in str(info[0].message)
        assert opt.state[p]["step"] == 2 and torch.equal(opt.state[p]["0"], torch.full((3,), 2.0))
    assert opt.state[q]["step"] == 3 and torch.equal(opt.state[q]["0"], torch.full((2,), 3.0))


def test_an_lstm_overflowing_from_finite_gradients_starts_afresh():
    """The LSTM's Nesterov residual overflows on a finite gradient near float32's max: the update is
    Inf, the parameter stays, and its (overwritten) state is reset to the initial state."""
    p = nn.Parameter(torch.ones(4))
    opt = l2o.LearnedOptimizer([p], rule=small_lstm(2, preprocess="log_sign", nesterov_lr=0.05))
    p.grad = torch.full((4,), 0.5)
    opt.step()
    before = p.detach().clone()
    p.grad = torch.full((4,), 3e38)
    with pytest.warns(RuntimeWarning, match="reset to the initial state"):
        opt.step()
    assert torch.equal(before, p) and opt.state[p]["step"] == 0
    assert all(torch.equal(v, torch.zeros_like(v)) for k, v in opt.state[p].items() if k != "step")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_finite_values_whose_sum_overflows_are_finite(dtype):
    """The finiteness check sums each tensor: a finite gradient and update whose sum overflows the
    dtype (float32: 1000 entries of 1e36; float16: of 60000) are still finite, so the step is
    written without a warning, while one Inf among them is caught."""
    big = 1e36 if dtype == torch.float32 else 60000.0
    p = nn.Parameter(torch.zeros(1000, dtype=dtype))
    opt = l2o.LearnedOptimizer([p], rule=l2o.SGD(lr=1.0))
    p.grad = torch.full((1000,), big, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert torch.equal(p.detach(), torch.full((1000,), -big, dtype=dtype))
    p.grad[7] = math.inf
    with pytest.warns(RuntimeWarning, match="is not finite"):
        opt.step()
    assert torch.equal(p.detach(), torch.full((1000,), -big, dtype=dtype))


# --------------------------------------------------------------------------- one call per group


class _Counting:
    """Wraps a rule's update_ to record the params keys of every call."""

    def __init__(self, opt: l2o.LearnedOptimizer) -> None:
        self.calls: list[list[str]] = []
        original = opt.rule.update_

        def update_(grads, state, params, *, step, loss=None):
            self.calls.append(list(params))
            return original(grads, state, params, step=step, loss=loss)

        opt.rule.update_ = update_


def test_rules_with_per_tensor_state_are_called_once_per_group():
    assert l2o.Rule.per_tensor_state is False and LSTMRule.per_tensor_state is False
    assert all(cls.per_tensor_state for cls in (l2o.SGD, l2o.NAG, l2o.RMSprop, l2o.Adam))
    model = Net()
    unused = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = l2o.LearnedOptimizer(groups(model, unused), rule=l2o.Adam())
    spy = _Counting(opt)
    backward(model, 0)
    opt.step()
    assert spy.calls == [["0", "1"], ["0", "1", "2"]]  # the unused parameter (position 2) has no gradient
    # a parameter that missed a step has its own step count: its own call
    backward(model, 1)
    model.fc2.weight.grad = None
    opt.step()
    backward(model, 2)
    spy.calls.clear()
    opt.step()
    assert spy.calls == [["0"], ["1"], ["0", "1", "2"]]
    assert opt.state[model.fc1.weight]["step"] == 3 and opt.state[model.fc2.weight]["step"] == 2
    lstm = l2o.LearnedOptimizer(groups(model), rule=small_lstm())
    spy = _Counting(lstm)
    backward(model, 3)
    lstm.step()
    assert spy.calls == [["p"]] * 5


HAND_RULES_VS_TORCH = {
    "sgd": (lambda: l2o.SGD(lr=0.05), lambda ps: torch.optim.SGD(ps, lr=0.05)),
    "sgd_momentum_dampening_wd": (lambda: l2o.SGD(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01),
                                  lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, dampening=0.1,
                                                             weight_decay=0.01)),
    "nag": (lambda: l2o.NAG(lr=0.05, momentum=0.8), lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.8,
                                                                              nesterov=True)),
    "rmsprop_centered_momentum": (lambda: l2o.RMSprop(lr=0.01, momentum=0.5, centered=True, weight_decay=0.01),
                                  lambda ps: torch.optim.RMSprop(ps, lr=0.01, momentum=0.5, centered=True,
                                                                 weight_decay=0.01)),
    "adam_wd": (lambda: l2o.Adam(lr=0.01, weight_decay=0.01), lambda ps: torch.optim.Adam(ps, lr=0.01,
                                                                                         weight_decay=0.01)),
}


@pytest.mark.parametrize("name", HAND_RULES_VS_TORCH)
def test_every_hand_rule_follows_torch_with_groups_and_missing_gradients(name):
    """Float64, two param groups, a parameter that never gets a gradient and one that misses a step
    (its step count falls behind the group's): the trajectory of the torch.optim namesake."""
    ours, theirs = HAND_RULES_VS_TORCH[name]
    a, b = Net(), Net()
    unused = [nn.Parameter(torch.ones(3, dtype=torch.float64)) for _ in range(2)]
    opt_a = l2o.LearnedOptimizer(groups(a, unused[0]), rule=ours())
    opt_b = theirs(groups(b, unused[1]))
    for t in range(10):
        for m, o in ((a, opt_a), (b, opt_b)):
            backward(m, t)
            if t == 4:
                m.fc1.bias.grad = None
            o.step()
        assert_close_models(a, b)
    assert opt_a.state[a.fc1.bias]["step"] == 9 and opt_a.state[a.fc1.weight]["step"] == 10
    assert torch.equal(unused[0], unused[1])


HAND_RULE_CONFIGS: dict[str, Callable[[], l2o.Rule]] = {
    "sgd": lambda: l2o.SGD(lr=0.05),
    "sgd_momentum": lambda: l2o.SGD(lr=0.05, momentum=0.9, dampening=0.2, weight_decay=0.01),
    "sgd_nesterov": lambda: l2o.SGD(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    "nag": lambda: l2o.NAG(lr=0.05),
    "rmsprop": lambda: l2o.RMSprop(lr=0.01),
    "rmsprop_all": lambda: l2o.RMSprop(lr=0.01, momentum=0.5, centered=True, weight_decay=0.01, eps_root=1e-8),
    "adam": lambda: l2o.Adam(lr=0.01),
    "adam_wd_eps_root": lambda: l2o.Adam(lr=0.01, weight_decay=0.01, eps_root=1e-8),
}


@pytest.mark.parametrize("name", HAND_RULE_CONFIGS)
def test_hand_rule_update_in_place_equals_update(name):
    """``update_`` (foreach, in place) gives ``update``'s numbers bitwise, overwrites the state it is
    given, and leaves the gradients and params alone; tensors of several shapes, dtypes and a 0-d one."""
    rule = HAND_RULE_CONFIGS[name]()
    gen = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(4, 3, generator=gen, dtype=torch.float64), "b": torch.randn(3, generator=gen),
              "s": torch.randn((), generator=gen, dtype=torch.float64), "e": torch.zeros(0)}
    state_a, state_b = rule.init(params), rule.init(params)
    for t in range(4):
        grads = {k: torch.randn(p.shape, generator=gen, dtype=p.dtype) for k, p in params.items()}
        copies = {k: g.clone() for k, g in grads.items()}
        before = [leaf for leaf in l2o.tree.state_leaves(state_b) if isinstance(leaf, torch.Tensor)]
        ua, state_a = rule.update(grads, state_a, params, step=t)
        ub, state_b = rule.update_(grads, state_b, params, step=t)
        assert ua.keys() == ub.keys() == params.keys()
        assert all(torch.equal(ua[k], ub[k]) and ub[k].dtype == params[k].dtype for k in params), t
        leaves_a, leaves_b = l2o.tree.state_leaves(state_a), l2o.tree.state_leaves(state_b)
        assert all(torch.equal(x, y) for x, y in zip(leaves_a, leaves_b)) and len(leaves_a) == len(leaves_b)
        assert all(x is y for x, y in zip(before, leaves_b))  # the same buffers, overwritten
        assert all(torch.equal(grads[k], copies[k]) for k in grads)
        params = {k: p + ua[k] for k, p in params.items()}
