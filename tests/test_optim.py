"""Conformance tests of the torch.optim adapter, in the style of torch's own optimizer tests.

Generic tests iterate over ``RULES``, a table of rule configs (a learned LSTM and every
hand-designed rule); specific tests pin the semantics against ``torch.optim`` itself.
"""

from __future__ import annotations

import copy
import gc
import io
import json
import math
import pickle
import warnings
from pathlib import Path
from typing import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import l2o
import l2o.pretrained as pretrained_mod
from l2o.checkpoints import CheckpointError, save_rule
from l2o.rules.lstm import LSTMRule

# ---------------------------------------------------------------------------------------- utilities


def small_lstm(seed: int = 0, **kwargs) -> LSTMRule:
    """A small random LSTM rule (seeded), scaled so that its steps are moderate."""
    torch.manual_seed(seed)
    kwargs.setdefault("hidden_size", 8)
    kwargs.setdefault("output_scale", 0.1)
    return LSTMRule(**kwargs)


#: rule configs every generic test runs over (name -> factory)
RULES: dict[str, Callable[[], l2o.Rule]] = {
    "lstm": small_lstm,
    "lstm_log_sign": lambda: small_lstm(1, preprocess="log_sign"),
    "lstm_rnnprop": lambda: small_lstm(1, preprocess="rnnprop"),
    "lstm_nesterov": lambda: small_lstm(2, preprocess="log_sign", nesterov_lr=0.05),
    "sgd": lambda: l2o.SGD(lr=0.05),
    "sgd_momentum": lambda: l2o.SGD(lr=0.05, momentum=0.9, weight_decay=0.01),
    "nag": lambda: l2o.NAG(lr=0.05),
    "rmsprop": lambda: l2o.RMSprop(lr=0.01, momentum=0.5, centered=True),
    "adam": lambda: l2o.Adam(lr=0.01),
}


class MLP(nn.Module):
    def __init__(self, seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 7)
        self.fc2 = nn.Linear(7, 3)
        self.scale = nn.Parameter(torch.tensor(1.0))  # a 0-d parameter
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                if p.dim() > 0:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x))) * self.scale


def batch(step: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(16, 5, generator=gen).to(dtype), torch.randn(16, 3, generator=gen).to(dtype)


def loss_of(model: nn.Module, step: int) -> torch.Tensor:
    x, y = batch(step, next(model.parameters()).dtype)
    return ((model(x) - y) ** 2).mean()


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, start: int = 0,
          sched=None) -> list[float]:
    losses = []
    for t in range(start, start + steps):
        opt.zero_grad()
        loss = loss_of(model, t)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_params_equal(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), f"{name} differs: max |diff| {(p - q).abs().max().item()}"


def rule_state_bytes(opt: l2o.LearnedOptimizer) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for k, v in s.items()
               if isinstance(v, torch.Tensor) and k != "step")


# ------------------------------------------------------------------------------------- basics


@pytest.mark.parametrize("name", RULES)
def test_is_a_torch_optimizer_and_trains(name):
    model = MLP()
    opt = l2o.LearnedOptimizer(model.parameters(), rule=RULES[name]())
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.defaults["lr"] == 1.0 and opt.param_groups[0]["lr"] == 1.0
    before = params_of(model)
    train(model, opt, 3)
    for p0, p in zip(before, model.parameters()):
        assert torch.isfinite(p).all()
        assert not torch.equal(p0, p)
    for p in model.parameters():
        assert opt.state[p]["step"] == 3


def test_rule_is_copied_and_frozen():
    rule = small_lstm()
    opt = l2o.LearnedOptimizer(MLP().parameters(), rule=rule)
    assert opt.rule is not rule
    assert all(not w.requires_grad for w in opt.rule.parameters())
    assert all(w.requires_grad for w in rule.parameters())  # the caller's rule is untouched
    assert not opt.rule.training
    for w, w0 in zip(opt.rule.parameters(), rule.parameters()):
        assert torch.equal(w, w0)


def test_lstm_state_layout_and_equivalence_with_one_call_on_all_params():
    """Per-parameter calls equal one rule call on all params at once (the LSTM is separable)."""
    rule = small_lstm()
    model = MLP()
    params0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = l2o.LearnedOptimizer(model.parameters(), rule=rule)
    loss = loss_of(model, 0)
    loss.backward()
    grads = {k: v.grad.detach().clone() for k, v in model.named_parameters()}
    opt.step()
    with torch.no_grad():
        updates, state = rule.update(grads, rule.init(params0), params0, step=0)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), params0[k] + updates[k], rtol=1e-6, atol=1e-7)
        s = opt.state[p]
        assert set(s) == {"step", "hidden.0", "hidden.1", "cell.0", "cell.1"}
        assert s["hidden.0"].shape == (8, p.numel()) and s["hidden.0"].dtype == torch.float32
    # state of the whole-tree call is the concatenation of the per-parameter states
    # (float32; step() may use the compiled kernel, whose sigmoid differs from torch's by ~1 ulp)
    hidden = torch.cat([opt.state[p]["hidden.1"] for p in model.parameters()], dim=1)
    torch.testing.assert_close(hidden, state.hidden[1], rtol=1e-6, atol=5e-7)


def test_hand_rule_state_names_follow_torch():
    model = MLP()
    opt = l2o.LearnedOptimizer(model.parameters(), rule=l2o.Adam())
    train(model, opt, 1)
    ref_model = MLP()
    ref = torch.optim.Adam(ref_model.parameters())
    train(ref_model, ref, 1)
    assert set(opt.state[model.fc1.weight]) == set(ref.state[ref_model.fc1.weight]) == {"step", "exp_avg", "exp_avg_sq"}


# --------------------------------------------------------------------------------- lr + schedulers

SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "MultiStepLR": lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[1, 3], gamma=0.5),
    "ExponentialLR": lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9),
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 1.0 / (1 + e)),
    "MultiplicativeLR": lambda o: torch.optim.lr_scheduler.MultiplicativeLR(o, lambda e: 0.8),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=6),
    "CosineAnnealingWarmRestarts": lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=3),
    "LinearLR": lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.25, total_iters=4),
    "ConstantLR": lambda o: torch.optim.lr_scheduler.ConstantLR(o, factor=0.5, total_iters=2),
    "PolynomialLR": lambda o: torch.optim.lr_scheduler.PolynomialLR(o, total_iters=5, power=2.0),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1.0, total_steps=8, cycle_momentum=False),
    "CyclicLR": lambda o: torch.optim.lr_scheduler.CyclicLR(o, base_lr=0.1, max_lr=1.0, step_size_up=2,
                                                            cycle_momentum=False),
    "SequentialLR": lambda o: torch.optim.lr_scheduler.SequentialLR(
        o, [torch.optim.lr_scheduler.LinearLR(o, start_factor=0.5, total_iters=2),
            torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9)], milestones=[2]),
    "ReduceLROnPlateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=0),
}


@pytest.mark.parametrize("name", SCHEDULERS)
def test_every_lr_scheduler_drives_lr(name):
    model = MLP()
    opt = l2o.LearnedOptimizer(model.parameters(), rule=small_lstm())
    sched = SCHEDULERS[name](opt)
    lrs = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(6):
            opt.zero_grad()
            loss = loss_of(model, t)
            loss.backward()
            opt.step()
            if name == "ReduceLROnPlateau":
                sched.step(1.0)  # a metric that never improves
            else:
                sched.step()
            lrs.append(opt.param_groups[0]["lr"])
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)], [str(w.message) for w in caught]
    assert len(set(lrs)) > 1, lrs
    assert all(math.isfinite(lr) and lr >= 0 for lr in lrs)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # the scheduler's own state round-trips next to the optimizer's
    sched.load_state_dict(sched.state_dict())


def test_hand_rule_times_group_lr_matches_torch_sgd():
    """lr multiplies the rule's update: SGD(lr=0.1) with lr=0.5 takes torch SGD(lr=0.05)'s steps."""
    for rule_lr, group_lr, exact in ((0.1, 0.5, False), (0.25, 0.5, True)):
        a, b = MLP(dtype=torch.float64), MLP(dtype=torch.float64)
        opt_a = l2o.LearnedOptimizer(a.parameters(), rule=l2o.SGD(lr=rule_lr), lr=group_lr)
        opt_b = torch.optim.SGD(b.parameters(), lr=rule_lr * group_lr)
        train(a, opt_a, 5)
        train(b, opt_b, 5)
        if exact:  # power-of-two lrs: no rounding in either product, so bitwise equal
            assert_params_equal(a, b)
        else:  # the adapter rounds u = -0.1 g before adding 0.5 u: equal to within a few ulps
            for p, q in zip(a.parameters(), b.parameters()):
                torch.testing.assert_close(p, q, rtol=1e-14, atol=1e-15)


def test_scheduler_on_hand_rule_matches_torch():
    a, b = MLP(dtype=torch.float64), MLP(dtype=torch.float64)
    opt_a = l2o.LearnedOptimizer(a.parameters(), rule=l2o.SGD(lr=1.0, momentum=0.9), lr=0.1)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    train(a, opt_a, 8, sched=torch.optim.lr_scheduler.StepLR(opt_a, step_size=3, gamma=0.5))
    train(b, opt_b, 8, sched=torch.optim.lr_scheduler.StepLR(opt_b, step_size=3, gamma=0.5))
    assert opt_a.param_groups[0]["lr"] == opt_b.param_groups[0]["lr"] == 0.025
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("name", ["lstm", "adam"])
def test_update_scales_linearly_with_lr(name):
    models = [MLP(), MLP()]
    opts = [l2o.LearnedOptimizer(m.parameters(), rule=RULES[name](), lr=lr) for m, lr in zip(models, (1.0, 0.375))]
    p0 = params_of(models[0])
    for m, o in zip(models, opts):
        train(m, o, 1)
    for before, p1, p2 in zip(p0, models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p2 - before, 0.375 * (p1 - before), rtol=1e-5, atol=1e-7)


def test_hand_adam_matches_torch_adam():
    a, b = MLP(dtype=torch.float64), MLP(dtype=torch.float64)
    opt_a = l2o.LearnedOptimizer(a.parameters(), rule=l2o.Adam(lr=0.01))
    opt_b = torch.optim.Adam(b.parameters(), lr=0.01)
    train(a, opt_a, 6)
    train(b, opt_b, 6)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)


def test_loads_a_torch_adam_state_dict_into_the_adam_rule():
    """torch.optim.Adam's state has the same names; its float-tensor step is read as an int."""
    a, b = MLP(dtype=torch.float64), MLP(dtype=torch.float64)
    ref = torch.optim.Adam(a.parameters(), lr=0.01)
    train(a, ref, 3)
    b.load_state_dict(a.state_dict())
    opt = l2o.LearnedOptimizer(b.parameters(), rule=l2o.Adam(lr=0.01))
    with pytest.warns(RuntimeWarning, match="dropped param-group keys"):  # betas, eps, ...: the rule's own apply
        opt.load_state_dict(ref.state_dict())
    opt.param_groups[0]["lr"] = 1.0  # torch's group lr 0.01 came along; the rule holds lr here
    assert opt.state[b.fc1.weight]["step"] == 3
    train(a, ref, 3, start=3)
    train(b, opt, 3, start=3)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)


# ------------------------------------------------------------------------------ state_dict round trip


def _round_trip(opt_factory, dtype=torch.float32, via_bytes=True):
    model = MLP(dtype=dtype)
    opt = opt_factory(model.parameters())
    train(model, opt, 5)
    sd = opt.state_dict()
    if via_bytes:
        buf = io.BytesIO()
        torch.save(sd, buf)
        buf.seek(0)
        sd = torch.load(buf, weights_only=True)
    fresh_model = MLP(seed=99, dtype=dtype)
    fresh_model.load_state_dict(model.state_dict())
    fresh_opt = opt_factory(fresh_model.parameters())
    fresh_opt.load_state_dict(sd)
    train(model, opt, 5, start=5)
    train(fresh_model, fresh_opt, 5, start=5)
    assert_params_equal(model, fresh_model)
    for p, q in zip(model.parameters(), fresh_model.parameters()):
        s, t = opt.state[p], fresh_opt.state[q]
        assert s.keys() == t.keys()
        for k in s:
            if isinstance(s[k], torch.Tensor):
                assert s[k].dtype == t[k].dtype and torch.equal(s[k], t[k]), k
            else:
                assert s[k] == t[k], k
    return opt, fresh_opt


@pytest.mark.parametrize("name", RULES)
def test_state_dict_round_trip_continues_identical_trajectory(name):
    _round_trip(lambda ps: l2o.LearnedOptimizer(ps, rule=RULES[name](), lr=0.5))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_state_dict_round_trip_keeps_lstm_state_dtype(dtype):
    """torch would cast all floating state to the param's dtype (lossy for bfloat16 params)."""
    opt, fresh = _round_trip(lambda ps: l2o.LearnedOptimizer(ps, rule=small_lstm()), dtype=dtype)
    for s in fresh.state.values():
        assert s["cell.0"].dtype == torch.float32


def test_state_dict_round_trip_with_state_dtype_and_two_groups():
    def factory(ps):
        ps = list(ps)
        return l2o.LearnedOptimizer([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.25}], rule=small_lstm(),
                                    state_dtype=torch.bfloat16)

    _, fresh = _round_trip(factory)
    assert fresh.param_groups[1]["lr"] == 0.25
    for s in fresh.state.values():
        assert s["hidden.1"].dtype == torch.bfloat16


def test_state_dict_round_trip_without_serialising_and_mid_run_of_fresh_params():
    _round_trip(lambda ps: l2o.LearnedOptimizer(ps, rule=small_lstm()), via_bytes=False)


def test_load_state_dict_refuses_a_different_rule_and_changes_nothing():
    model = MLP()
    adam = l2o.LearnedOptimizer(model.parameters(), rule=l2o.Adam())
    train(model, adam, 2)
    lstm = l2o.LearnedOptimizer(model.parameters(), rule=small_lstm())
    train(model, lstm, 2)
    before = copy.deepcopy(lstm.state_dict())
    with pytest.raises(ValueError, match="different rule"):
        lstm.load_state_dict(adam.state_dict())
    bigger = l2o.LearnedOptimizer(model.parameters(), rule=small_lstm(hidden_size=4))
    with pytest.raises(ValueError, match="shape"):
        bigger.load_state_dict(lstm.state_dict())
    with pytest.raises(ValueError):
        lstm.load_state_dict({"state": {}})
    after = lstm.state_dict()
    for k in before["state"]:
        for name, v in before["state"][k].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(after["state"][k][name]))


# ------------------------------------------------------------------------------- closure, groups


@pytest.mark.parametrize("name", ["lstm", "adam"])
def test_closure_is_run_with_grad_and_its_loss_returned(name):
    model = MLP()
    opt = l2o.LearnedOptimizer(model.parameters(), rule=RULES[name]())
    calls = []

    def closure():
        assert torch.is_grad_enabled()
        opt.zero_grad()
        loss = loss_of(model, 0)
        loss.backward()
        calls.append(loss)
        return loss

    before = params_of(model)
    with torch.no_grad():  # as some training loops do; the closure still gets autograd
        out = opt.step(closure)
    assert len(calls) == 1 and out is calls[0]
    assert not torch.equal(before[0], model.fc1.weight)
    assert opt.step() is None


def test_param_groups_with_different_lr_equal_separate_optimizers():
    a, b = MLP(), MLP()
    groups = [{"params": [a.fc1.weight, a.fc1.bias], "lr": 0.5}, {"params": [a.fc2.weight, a.fc2.bias, a.scale]}]
    opt = l2o.LearnedOptimizer(groups, rule=small_lstm(), lr=0.1)
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.1]
    sep = [l2o.LearnedOptimizer([b.fc1.weight, b.fc1.bias], rule=small_lstm(), lr=0.5),
           l2o.LearnedOptimizer([b.fc2.weight, b.fc2.bias, b.scale], rule=small_lstm(), lr=0.1)]
    for t in range(4):
        for m, opts in ((a, [opt]), (b, sep)):
            for o in opts:
                o.zero_grad()
            loss_of(m, t).backward()
            for o in opts:
                o.step()
    assert_params_equal(a, b)


def test_add_param_group_gets_defaults_and_is_validated():
    model = MLP()
    extra = nn.Parameter(torch.randn(4))
    opt = l2o.LearnedOptimizer([model.fc1.weight], rule=small_lstm(), lr=0.3)
    opt.add_param_group({"params": [extra]})
    assert opt.param_groups[1]["lr"] == 0.3
    opt.add_param_group({"params": [model.fc1.bias], "lr": 2.0})
    assert opt.param_groups[2]["lr"] == 2.0
    extra.grad = torch.ones(4)
    before = extra.detach().clone()
    opt.step()
    assert not torch.equal(before, extra)
    for bad, err in (({"params": [nn.Parameter(torch.randn(2))], "lr": 0.0}, ValueError),
                     ({"params": [torch.zeros(3, dtype=torch.int64)]}, TypeError)):
        with pytest.raises(err):
            opt.add_param_group(bad)
        assert len(opt.param_groups) == 3
    with pytest.raises(ValueError, match="more than one"):  # torch's own check still applies
        opt.add_param_group({"params": [extra]})


def test_zero_grad_and_step_hooks():
    model = MLP()
    opt = l2o.LearnedOptimizer(model.parameters(), rule=small_lstm())
    seen = []
    opt.register_step_post_hook(lambda o, args, kwargs: seen.append(o))
    train(model, opt, 1)
    assert seen == [opt]
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------------------------- deepcopy, pickle


@pytest.mark.parametrize("name", ["lstm", "adam"])
def test_deepcopy_and_pickle(name):
    model = MLP()
    opt = l2o.LearnedOptimizer(model.parameters(), rule=RULES[name](), lr=0.5)
    train(model, opt, 3)
    m2, o2 = copy.deepcopy((model, opt))
    m3, o3 = pickle.loads(pickle.dumps((model, opt)))
    for o in (o2, o3):
        assert isinstance(o, l2o.LearnedOptimizer) and o.rule is not opt.rule
        assert o.param_groups[0]["lr"] == 0.5
    p, q = model.fc1.weight, m2.fc1.weight
    for k, v in opt.state[p].items():
        if isinstance(v, torch.Tensor):
            assert v.data_ptr() != o2.state[q][k].data_ptr()
    for m, o in ((model, opt), (m2, o2), (m3, o3)):
        train(m, o, 3, start=3)
    assert_params_equal(model, m2)
    assert_params_equal(model, m3)


# ------------------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float32_and_float64_params(name, dtype):
    model = MLP(dtype=dtype)
    opt = l2o.LearnedOptimizer(model.parameters(), rule=RULES[name]())
    train(model, opt, 3)
    for p in model.parameters():
        assert p.dtype == dtype and torch.isfinite(p).all()


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3), (torch.float64, 1e-5)])
def test_low_precision_params_follow_the_float32_trajectory(dtype, tol):
    """The LSTM computes in float32 whatever the param dtype; the update is cast back."""
    ref, low = MLP(), MLP(dtype=dtype)
    p0 = params_of(ref)
    opt_ref = l2o.LearnedOptimizer(ref.parameters(), rule=small_lstm())
    opt_low = l2o.LearnedOptimizer(low.parameters(), rule=small_lstm())
    train(ref, opt_ref, 5)
    train(low, opt_low, 5)
    for before, p, q in zip(p0, ref.parameters(), low.parameters()):
        assert q.dtype == dtype
        moved = (p - before).norm()
        err = (q.float() - p).norm()
        assert err <= tol * max(moved.item(), p.norm().item()), (dtype, err.item(), moved.item())
    for s in opt_low.state.values():
        assert s["hidden.0"].dtype == torch.float32


def test_model_moved_to_another_dtype_mid_run():
    model = MLP()
    for name in ("lstm", "adam"):
        opt = l2o.LearnedOptimizer(model.parameters(), rule=RULES[name]())
        train(model, opt, 2)
        model.double()
        train(model, opt, 2, start=2)
        model.float()
        assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.state[model.fc1.weight]["exp_avg"].dtype == torch.float64  # follows the param, as computed


def test_rule_follows_the_param_device_via_a_cached_copy():
    """Runs without CUDA on the ``meta`` device: the rule is copied there lazily, once."""
    on_meta = nn.Parameter(torch.empty(3, 4, device="meta"))
    on_cpu = nn.Parameter(torch.randn(2))
    opt = l2o.LearnedOptimizer([on_meta, on_cpu], rule=small_lstm())
    for _ in range(2):
        on_meta.grad, on_cpu.grad = torch.empty(3, 4, device="meta"), torch.randn(2)
        opt.step()
    assert opt.state[on_meta]["hidden.0"].device.type == "meta"
    assert opt.state[on_cpu]["hidden.0"].device.type == "cpu"
    assert next(opt.rule.parameters()).device.type == "cpu"
    assert list(opt._device_rules) == [torch.device("meta")]
    opt.load_state_dict(opt.state_dict())
    assert opt.state[on_meta]["cell.1"].device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_params_match_cpu_and_load_cpu_state():
    cpu, gpu = MLP(), MLP().cuda()
    opt_cpu = l2o.LearnedOptimizer(cpu.parameters(), rule=small_lstm())
    opt_gpu = l2o.LearnedOptimizer(gpu.parameters(), rule=small_lstm())
    for t in range(3):
        for m, o in ((cpu, opt_cpu), (gpu, opt_gpu)):
            o.zero_grad()
            x, y = batch(t)
            ((m(x.to(m.fc1.weight.device)) - y.to(m.fc1.weight.device)) ** 2).mean().backward()
            o.step()
    for p, q in zip(cpu.parameters(), gpu.parameters()):
        torch.testing.assert_close(q.cpu(), p, rtol=1e-4, atol=1e-5)
        assert opt_gpu.state[q]["cell.1"].is_cuda
    assert next(opt_gpu.rule.parameters()).device.type == "cpu"  # the home copy stays; a CUDA copy is cached
    fresh = MLP().cuda()
    fresh.load_state_dict(cpu.state_dict())
    opt_fresh = l2o.LearnedOptimizer(fresh.parameters(), rule=small_lstm())
    opt_fresh.load_state_dict(opt_cpu.state_dict())
    assert all(s["hidden.0"].is_cuda for s in opt_fresh.state.values())
    train(fresh, opt_fresh, 1, start=3)
    train(cpu, opt_cpu, 1, start=3)
    for p, q in zip(cpu.parameters(), fresh.parameters()):
        torch.testing.assert_close(q.cpu(), p, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------- missing grads


@pytest.mark.parametrize("name", ["lstm", "adam", "sgd_momentum"])
def test_params_without_grad_are_untouched(name):
    model = MLP()
    unused = nn.Parameter(torch.randn(3, 2))
    frozen = nn.Parameter(torch.randn(4), requires_grad=False)
    opt = l2o.LearnedOptimizer([*model.parameters(), unused, frozen], rule=RULES[name]())
    before_unused, before_frozen = unused.detach().clone(), frozen.detach().clone()
    train(model, opt, 3)
    assert torch.equal(unused, before_unused) and torch.equal(frozen, before_frozen)
    assert unused not in opt.state and frozen not in opt.state  # (opt.state is a defaultdict)
    assert opt.state_dict()["state"].keys() == {0, 1, 2, 3, 4}


def test_frozen_submodule():
    model = MLP()
    model.fc1.requires_grad_(False)
    opt = l2o.LearnedOptimizer(model.parameters(), rule=small_lstm())
    before = model.fc1.weight.detach().clone()
    train(model, opt, 2)
    assert torch.equal(before, model.fc1.weight)


# ------------------------------------------------------------------------------------- errors


def test_at_most_one_source_of_rule(tmp_path):
    ps = list(MLP().parameters())
    assert isinstance(l2o.LearnedOptimizer(ps).rule, l2o.MLPRule)  # none: the shipped "generalist-bounded"
    with pytest.raises(ValueError, match="got pretrained and rule"):
        l2o.LearnedOptimizer(ps, pretrained="quadratic", rule=l2o.Adam())
    with pytest.raises(ValueError, match="got pretrained and checkpoint and rule"):
        l2o.LearnedOptimizer(ps, pretrained="x", checkpoint=tmp_path / "x.pt", rule=l2o.Adam())
    with pytest.raises(TypeError, match="l2o rule"):
        l2o.LearnedOptimizer(ps, rule=torch.optim.SGD(ps, lr=0.1))
    with pytest.raises(TypeError, match="l2o rule"):
        l2o.LearnedOptimizer(ps, rule=nn.Linear(2, 2))


@pytest.mark.parametrize("lr,err", [(0.0, ValueError), (-1.0, ValueError), (float("nan"), ValueError),
                                    (float("inf"), ValueError), ("0.1", TypeError), (True, TypeError)])
def test_bad_lr(lr, err):
    with pytest.raises(err, match="lr"):
        l2o.LearnedOptimizer(MLP().parameters(), rule=small_lstm(), lr=lr)


def test_bad_params():
    with pytest.raises(ValueError, match="empty parameter list"):
        l2o.LearnedOptimizer([], rule=small_lstm())
    gen = MLP().parameters()
    list(gen)
    with pytest.raises(ValueError, match="empty parameter list"):
        l2o.LearnedOptimizer(gen, rule=small_lstm())
    with pytest.raises(TypeError, match="single Tensor"):
        l2o.LearnedOptimizer(nn.Parameter(torch.ones(2)), rule=small_lstm())
    with pytest.raises(TypeError, match="complex"):
        l2o.LearnedOptimizer([nn.Parameter(torch.ones(2, dtype=torch.complex64))], rule=small_lstm())
    for dtype in (torch.int64, torch.int8, torch.bool):
        with pytest.raises(TypeError, match="not floating point"):
            l2o.LearnedOptimizer([torch.zeros(3, dtype=dtype)], rule=small_lstm())
    with pytest.raises(TypeError, match="state_dtype"):
        l2o.LearnedOptimizer(MLP().parameters(), rule=small_lstm(), state_dtype=torch.int8)


def test_sparse_gradients_are_refused_at_step_before_any_update():
    dense = nn.Parameter(torch.randn(3))
    emb = nn.Embedding(10, 3, sparse=True)
    opt = l2o.LearnedOptimizer([dense, *emb.parameters()], rule=small_lstm())
    (emb(torch.tensor([1, 2])).sum() + dense.sum()).backward()
    before = emb.weight.detach().clone(), dense.detach().clone()
    with pytest.raises(TypeError, match="sparse gradients"):
        opt.step()
    assert torch.equal(before[0], emb.weight) and torch.equal(before[1], dense)


def test_unknown_pretrained_name_lists_known(tiny_index):
    with pytest.raises(ValueError, match="unknown pretrained rule 'nope'.*'tiny'"):
        l2o.LearnedOptimizer(MLP().parameters(), pretrained="nope")


# ----------------------------------------------------------------------------- state_dtype, memory


def test_state_dtype_bfloat16_halves_state_and_stays_close():
    """Measured: after 20 steps the bf16-state trajectory deviates by ~3e-4 of the distance moved
    (~1e-3 after 100 steps); the test allows 5e-3."""
    ref, low = MLP(), MLP()
    p0 = params_of(ref)
    opt_ref = l2o.LearnedOptimizer(ref.parameters(), rule=small_lstm())
    opt_low = l2o.LearnedOptimizer(low.parameters(), rule=small_lstm(), state_dtype=torch.bfloat16)
    train(ref, opt_ref, 20)
    train(low, opt_low, 20)
    assert rule_state_bytes(opt_low) * 2 == rule_state_bytes(opt_ref)
    n = sum(p.numel() for p in ref.parameters())
    assert rule_state_bytes(opt_ref) == n * 2 * 2 * 8 * 4  # 2 layers x (h, c) x H floats per coordinate
    moved = torch.cat([(p - b).flatten() for p, b in zip(ref.parameters(), p0)]).norm()
    err = torch.cat([(p - q).flatten() for p, q in zip(ref.parameters(), low.parameters())]).norm()
    assert err <= 5e-3 * moved, (err.item(), moved.item())
    assert all(s["cell.1"].dtype == torch.bfloat16 for s in opt_low.state.values())


def test_memory_stays_flat_and_no_graph():
    model = MLP()
    opt = l2o.LearnedOptimizer(model.parameters(), rule=small_lstm())
    rule_weights = list(opt.rule.parameters())

    def live_tensors() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))

    train(model, opt, 3)
    counts = []
    for t in range(3, 40):
        train(model, opt, 1, start=t)
        for p in model.parameters():
            assert p.grad_fn is None and p.requires_grad and p.is_leaf
        for s in opt.state.values():
            for v in s.values():
                assert not isinstance(v, torch.Tensor) or (v.grad_fn is None and not v.requires_grad)
        assert all(w.grad is None for w in rule_weights)
        if t % 12 == 3:
            counts.append(live_tensors())
    assert torch.is_grad_enabled()
    # no growth from step to step; the first count may also hold garbage that earlier tests (compiled
    # graphs' caches) leave for the collector to free later
    assert len(set(counts[1:])) == 1 and counts[0] >= counts[1], counts


# ---------------------------------------------------------------------------------- hypothesis

_HYP_RULE = small_lstm(7, hidden_size=6, preprocess="log_sign", output_scale=1.0)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=st.lists(st.integers(0, 4), min_size=0, max_size=3),
       dtype=st.sampled_from([torch.float32, torch.float64]),
       k=st.integers(-30, 30), seed=st.integers(0, 2**16), steps=st.integers(1, 3))
def test_hypothesis_shapes_dtypes_and_gradient_magnitudes(shape, dtype, k, seed, steps):
    gen = torch.Generator().manual_seed(seed)
    p = nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype))
    opt = l2o.LearnedOptimizer([p], rule=_HYP_RULE, lr=0.5)
    for _ in range(steps):
        g = torch.randn(shape, generator=gen, dtype=torch.float64) * 10.0**k
        p.grad = g.to(dtype)
        before = p.detach().clone()
        opt.step()
        assert p.shape == tuple(shape) and p.dtype == dtype
        assert torch.isfinite(p).all()
        # the LSTM's output is bounded: |u| <= |w_out|_1 + |b_out| for any gradient
        bound = _HYP_RULE.out_weight.abs().sum() + _HYP_RULE.out_bias.abs().sum()
        assert ((p - before).abs() <= 0.5 * bound.item() * (1 + 1e-5) + 1e-6).all()
    assert opt.state[p]["hidden.0"].shape == (6, p.numel())


# ----------------------------------------------------------------------------------- pretrained


@pytest.fixture
def tiny_index(tmp_path, monkeypatch):
    """A temporary pretrained index with one LSTM checkpoint, ``tiny``."""
    rule = small_lstm(3)
    save_rule(tmp_path / "tiny.pt", rule, provenance={"task": "test"})
    entry = pretrained_mod.make_index_entry("tiny", tmp_path / "tiny.pt", description="a test rule",
                                            task="none", command="pytest")
    (tmp_path / "index.json").write_text(json.dumps({"format_version": 1, "rules": [entry]}))
    monkeypatch.setattr(pretrained_mod, "INDEX_PATH", tmp_path / "index.json")
    return tmp_path, rule


def test_list_and_load_pretrained(tiny_index):
    directory, rule = tiny_index
    entries = l2o.list_pretrained()
    assert [e["name"] for e in entries] == ["tiny"]
    assert set(entries[0]) >= {"name", "description", "task", "config", "sha256", "command"}
    assert entries[0]["config"]["hidden_size"] == 8
    loaded = l2o.load_pretrained("tiny")
    for a, b in zip(loaded.parameters(), rule.parameters()):
        assert torch.equal(a, b)
    opt = l2o.LearnedOptimizer(MLP().parameters(), pretrained="tiny")
    for a, b in zip(opt.rule.parameters(), rule.parameters()):
        assert torch.equal(a, b)
    opt2 = l2o.LearnedOptimizer(MLP().parameters(), checkpoint=directory / "tiny.pt")
    for a, b in zip(opt2.rule.parameters(), rule.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="known pretrained rules: 'tiny'"):
        l2o.load_pretrained("quadratics")


def test_pretrained_checksum_mismatch_is_refused(tiny_index):
    directory, _ = tiny_index
    save_rule(directory / "tiny.pt", small_lstm(4))  # same config, different weights
    expected = json.loads((directory / "index.json").read_text())["rules"][0]["sha256"]
    found = pretrained_mod.sha256_file(directory / "tiny.pt")
    with pytest.raises(CheckpointError, match=f"tiny.pt.*{expected}.*{found}"):
        l2o.load_pretrained("tiny")
    (directory / "tiny.pt").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        l2o.load_pretrained("tiny")


def test_pretrained_config_mismatch_and_malformed_index(tiny_index):
    directory, _ = tiny_index
    index = json.loads((directory / "index.json").read_text())
    entry = index["rules"][0]

    def write(rules, version=1):
        (directory / "index.json").write_text(json.dumps({"format_version": version, "rules": rules}))

    write([{**entry, "config": {**entry["config"], "hidden_size": 20}}])
    with pytest.raises(CheckpointError, match="records config"):
        l2o.load_pretrained("tiny")
    for bad, match in (([{**entry, "file": "../tiny.pt"}], "bare file name"),
                       ([{**entry, "name": "run-2024-01-01T12"}], "names are lower-case"),
                       ([entry, entry], "repeats"),
                       ([{k: v for k, v in entry.items() if k != "sha256"}], "sha256"),
                       ([{**entry, "sha256": "abc"}], "hex")):
        write(bad)
        with pytest.raises(CheckpointError, match=match):
            l2o.list_pretrained()
    write([entry], version=2)
    with pytest.raises(CheckpointError, match="format_version"):
        l2o.load_pretrained("tiny")
    (directory / "index.json").write_text("not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        l2o.list_pretrained()


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > pwned.txt",))


def test_malicious_checkpoint_is_refused_even_with_a_matching_checksum(tiny_index, monkeypatch):
    directory, _ = tiny_index
    monkeypatch.chdir(directory)
    torch.save({"format": "l2o.rule", "evil": _Evil()}, directory / "tiny.pt")
    entry = json.loads((directory / "index.json").read_text())["rules"][0]
    entry["sha256"] = pretrained_mod.sha256_file(directory / "tiny.pt")
    (directory / "index.json").write_text(json.dumps({"format_version": 1, "rules": [entry]}))
    with pytest.raises(CheckpointError, match="refusing"):
        l2o.LearnedOptimizer(MLP().parameters(), pretrained="tiny")
    with pytest.raises(CheckpointError, match="refusing"):
        l2o.LearnedOptimizer(MLP().parameters(), checkpoint=directory / "tiny.pt")
    assert not (directory / "pwned.txt").exists()


def test_every_shipped_pretrained_rule_loads_and_steps():
    """Every entry of the real index (its checksum checked) loads and takes finite steps."""
    assert pretrained_mod.INDEX_PATH == Path(pretrained_mod.__file__).resolve().parent / "index.json"
    assert [entry["name"] for entry in l2o.list_pretrained()] == ["quadratic", "mnist", "mnist-nag", "mnist-paper",
                                                                  "generalist-bounded", "generalist", "generalist-base"]
    for entry in l2o.list_pretrained():
        rule = l2o.load_pretrained(entry["name"])
        assert rule.name in l2o.rules.RULES
        model = MLP()
        opt = l2o.LearnedOptimizer(model.parameters(), pretrained=entry["name"])
        train(model, opt, 2)
        assert all(torch.isfinite(p).all() for p in model.parameters())
