"""``torch.compile(opt.step, fullgraph=True)`` of the drop-in optimizer with the compiled kernels off:
one graph per step, no graph breaks, a few compilations in all, and the eager results."""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import pytest
import torch
import torch._dynamo
from torch import nn

import l2o
from l2o import kernels
from l2o.rules.lstm import LSTMRule


@pytest.fixture
def kernels_off(monkeypatch):
    """The compiled kernels off for one test (they are called through raw pointers: not traceable)."""
    monkeypatch.setattr(kernels, "_enabled", kernels._enabled)  # restored after the test
    kernels.set_enabled(False)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Counter:
    """A torch.compile backend that counts the graphs it is given and runs them eagerly."""

    def __init__(self, backend: str = "eager") -> None:
        self.graphs = 0
        self.backend = backend

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        self.graphs += 1
        if self.backend == "eager":
            return gm.forward
        from torch._dynamo.backends.common import aot_autograd  # aot_eager: through AOTAutograd

        return aot_autograd(fw_compiler=lambda g, _: g.forward)(gm, example_inputs)


def make(rule: Callable[[], l2o.Rule], seed: int = 0, **kwargs: Any) -> tuple[nn.Module, l2o.LearnedOptimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2))
    unused = nn.Parameter(torch.randn(3))  # never gets a gradient
    model.register_parameter("unused", unused)
    groups = [{"params": [model[0].weight, model[2].weight, unused], "weight_decay": kwargs.pop("weight_decay", 0.0)},
              {"params": [model[0].bias, model[2].bias], "lr": 0.5}]
    return model, l2o.LearnedOptimizer(groups, rule=rule(), **kwargs)


def backward(model: nn.Module, t: int, nan: bool = False) -> None:
    gen = torch.Generator().manual_seed(t)
    x, y = torch.randn(8, 5, generator=gen), torch.randn(8, 2, generator=gen)
    model.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    if nan:
        model[0].weight.grad[0, 0] = math.nan


def run_pair(rule: Callable[[], l2o.Rule], backend: Any, steps: int, check: Callable[[nn.Module, nn.Module], None],
             **kwargs: Any) -> tuple[tuple[nn.Module, l2o.LearnedOptimizer], tuple[nn.Module, l2o.LearnedOptimizer]]:
    """The same run eagerly and through ``torch.compile(opt.step, fullgraph=True)``, compared after each step."""
    eager, compiled = make(rule, **kwargs), make(rule, **kwargs)
    step = torch.compile(compiled[1].step, backend=backend, fullgraph=True)
    for t in range(steps):
        backward(eager[0], t)
        backward(compiled[0], t)
        eager[1].step()
        step()
        check(eager[0], compiled[0])
    return eager, compiled


def bitwise(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), f"{name}: {(p - q).abs().max().item()}"


def assert_states(opt_a: l2o.LearnedOptimizer, opt_b: l2o.LearnedOptimizer, a: nn.Module, b: nn.Module,
                  **tolerance: float) -> None:
    for p, q in zip(a.parameters(), b.parameters()):
        assert (p in opt_a.state) == (q in opt_b.state)
        for k, v in opt_a.state.get(p, {}).items():
            if isinstance(v, torch.Tensor):
                torch.testing.assert_close(opt_b.state[q][k], v, **tolerance)
            else:
                assert opt_b.state[q][k] == v, k


@pytest.mark.parametrize("backend, rule", [("eager", lambda: l2o.Adam(lr=1e-2)),
                                           ("aot_eager", lambda: l2o.RMSprop(lr=1e-2, momentum=0.5, centered=True))])
def test_compiled_step_of_a_hand_rule_is_one_graph_and_bitwise_eager(kernels_off, backend, rule):
    counter = Counter(backend)
    (a, opt_a), (b, opt_b) = run_pair(rule, counter, 3, bitwise, weight_decay=0.1)
    # state creation, the first step count, then the step counts dynamic: three compilations in all
    assert counter.graphs == 3
    for t in range(3, 5):
        for m, o in ((a, opt_a.step), (b, torch.compile(opt_b.step, backend=counter, fullgraph=True))):
            backward(m, t)
            o()
        bitwise(a, b)
    assert counter.graphs == 3  # no recompilation as the steps go on
    assert_states(opt_a, opt_b, a, b, rtol=0, atol=0)
    assert opt_b.state[b[0].weight]["step"] == 5 and b.unused not in opt_b.state


def test_explain_reports_one_graph_and_no_break(kernels_off):
    model, opt = make(lambda: l2o.Adam(lr=1e-2), weight_decay=0.01)
    backward(model, 0)
    report = torch._dynamo.explain(opt.step)()
    assert report.graph_count == 1 and report.graph_break_count == 0, report


def test_compiled_step_of_the_lstm_rule_is_fullgraph_and_equals_eager(kernels_off):
    """The LSTM rule (torch path): equal to eager up to float32 rounding (the compiled graph's matrix
    products may round differently in the last bits), compiled three times in all."""
    counter = Counter()

    def close(a: nn.Module, b: nn.Module) -> None:
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)

    (a, opt_a), (b, opt_b) = run_pair(lambda: LSTMRule(hidden_size=4, output_scale=0.1), counter, 3, close)
    assert counter.graphs == 3
    assert_states(opt_a, opt_b, a, b, rtol=1e-5, atol=1e-6)


def test_compiled_step_never_writes_a_nonfinite_update(kernels_off):
    """Inside the compiled step a NaN gradient's update is masked out without a host synchronisation:
    the parameter stays (no warning), and as the rule (Adam) overwrote that tensor's state in place,
    the state is reset to the initial one; the other tensors step exactly as eagerly."""
    counter = Counter()
    (a, opt_a), (b, opt_b) = run_pair(lambda: l2o.Adam(lr=1e-2), counter, 3, bitwise, weight_decay=0.1)
    step = torch.compile(opt_b.step, backend=counter, fullgraph=True)
    backward(a, 3, nan=True)
    backward(b, 3, nan=True)
    w = b[0].weight
    before = w.detach().clone()
    with pytest.warns(RuntimeWarning, match="not finite"):
        opt_a.step()  # eagerly: the gradient is checked first, so the state is kept
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step()
    assert torch.equal(w, before) and torch.equal(a[0].weight, before)
    assert all(torch.equal(v, torch.zeros_like(v)) for k, v in opt_b.state[w].items() if k != "step")
    assert opt_a.state[a[0].weight]["step"] == 3 and opt_b.state[w]["step"] == 4
    assert not torch.equal(opt_a.state[a[0].weight]["exp_avg"], torch.zeros_like(w))
    bitwise(a, b)
    for p, q in zip(a.parameters(), b.parameters()):
        if q is not w and p in opt_a.state:
            assert all(torch.equal(opt_a.state[p][k], opt_b.state[q][k]) for k in ("exp_avg", "exp_avg_sq"))
    assert all(torch.isfinite(p).all() for p in b.parameters())


@pytest.mark.slow
def test_inductor_compiled_step_matches_eager(kernels_off):
    """The default backend (inductor generates fused C++ loops): equal to eager to float32 rounding."""
    def close(a: nn.Module, b: nn.Module) -> None:
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)

    run_pair(lambda: l2o.Adam(lr=1e-2), "inductor", 4, close, weight_decay=0.1)
