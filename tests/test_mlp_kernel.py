"""The compiled MLP-rule kernel (l2o.kernels.mlp_update, mlp_rule.c): MLPRule.update_ with it equals
the torch path and update to float32 rounding (vectors, matrices, conv weights, tensors of several
chunks and groups, instances, deeper and non-residual rules, the shipped generalist), on the default
and the portable build; the same bits on 1 and 2 threads; the fallbacks; the optimizer still skips
non-finite gradients."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import l2o
from l2o import MLPRule, kernels
from l2o.kernels import selftest, twin
from l2o.tree import state_leaves
from tests.test_kernels import needs_compiler, portable_library, variant  # noqa: F401 (fixtures)
from tests.helpers import trained_mlp_rule

#: Every kind of tensor the kernel distinguishes: a scalar, vectors, matrices with rows shorter and
#: longer than a vector, a conv weight, an empty tensor, and tensors of several 4096-coordinate
#: chunks and several phase-1 groups (more than 8192 coordinates), one of them with ragged rows.
SHAPES = {"scale": (), "bias": (37,), "weight": (13, 21), "wide": (3, 50), "conv": (6, 4, 3, 3), "empty": (0, 4),
          "long": (20_001,), "big": (70, 301)}


def _generalist() -> MLPRule:
    rule = l2o.load_pretrained("generalist")
    assert isinstance(rule, MLPRule)
    return rule


RULES = {
    "generalist": _generalist,
    "trained": lambda: trained_mlp_rule(total_steps=6),
    "two_layers": lambda: trained_mlp_rule(1, hidden_layers=2, hidden_size=5),
    "plain": lambda: trained_mlp_rule(2, residual=False, hidden_size=11, exp_mult=0.5),
    "bounded": lambda: trained_mlp_rule(4, max_step_ratio=0.3),
}


def _problem(instance_dims: int = 0, seed: int = 0, steps: int = 5):
    gen = torch.Generator().manual_seed(seed)
    shapes = SHAPES if instance_dims == 0 else {k: (3, *s[-2:]) for k, s in SHAPES.items() if s}
    params = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    grads = [{k: torch.randn(s, generator=gen) * 10.0 ** (t - 3) for k, s in shapes.items()} for t in range(steps)]
    grads[1]["weight"] = torch.zeros_like(grads[1]["weight"])  # a zero gradient on the way
    grads[2]["bias"][0] = 1e20  # clipped
    return params, grads


def _run(rule: MLPRule, params, grads_seq, *, inplace: bool = True, enabled: bool = True):
    kernels.set_enabled(enabled)
    try:
        state, out = rule.init(params), []
        for t, grads in enumerate(grads_seq):
            fn = rule.update_ if inplace else rule.update
            with torch.no_grad():
                updates, state = fn(grads, state, params, step=t)
            out.append({k: u.clone() for k, u in updates.items()})
            params = {k: p + out[-1][k] for k, p in params.items()}
    finally:
        kernels.set_enabled(True)
    return out, state


def _near(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal to float32 rounding: relative 2e-5, and 2e-6 of the tensor's largest magnitude for
    entries where the network's direction and Adam's nearly cancel."""
    scale = float(b.abs().max()) if b.numel() else 0.0
    torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6 * scale + 1e-30)


def _close(got, want, state_got, state_want):
    for a, b in zip(got, want):
        for k in b:
            _near(a[k], b[k])
    for a, b in zip(state_leaves(state_got), state_leaves(state_want)):
        _near(a, b)


@needs_compiler
@pytest.mark.parametrize("name", list(RULES))
@pytest.mark.parametrize("instance_dims", [0, 1])
def test_kernel_equals_torch_path_and_update(name, instance_dims, variant):  # noqa: F811
    rule = RULES[name]()
    rule.instance_dims = instance_dims
    params, grads = _problem(instance_dims)
    assert kernels.is_available() and rule._compiled_kernel(grads[0], rule.init(params), params) is not None
    got, s_got = _run(rule, params, grads)
    want, s_want = _run(rule, params, grads, enabled=False)
    _close(got, want, s_got, s_want)
    ref, s_ref = _run(rule, params, grads, inplace=False)
    _close(got, ref, s_got, s_ref)
    assert all(float(u.abs().max()) > 0 for u in got[-1].values() if u.numel())


@needs_compiler
def test_threads_give_identical_bits(variant):  # noqa: F811
    rule = _generalist()
    params, grads = _problem()
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(_run(rule, params, grads))
    finally:
        torch.set_num_threads(before)
    (a, sa), (b, sb) = results
    for x, y in zip(a, b):
        for k in x:
            assert torch.equal(x[k], y[k])
    for x, y in zip(state_leaves(sa), state_leaves(sb)):
        assert torch.equal(x, y)


@needs_compiler
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_flushes_subnormals_and_restores_the_callers_mode(threads, variant):  # noqa: F811
    """Subnormal accumulators (decayed momenta of coordinates whose gradient stays near zero) come
    out of the kernel as zeros, where the torch path keeps them subnormal; the updates agree, and
    the calling thread still computes subnormals afterwards."""
    rule = _generalist()
    tiny = torch.finfo(torch.float32).tiny
    gen = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(30, 40, generator=gen), "b": torch.randn(70_000, generator=gen)}
    grads = {k: torch.randn(p.shape, generator=gen) * 1e-3 for k, p in params.items()}
    for g in grads.values():
        g.view(-1)[::2] = 0.0  # half the coordinates: no gradient, their accumulators decay
    results = []
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for enabled in (True, False):
            state = rule.init(params)
            for acc in (*state.momentum, state.second_moment):
                for k, t in acc.items():
                    t.fill_(tiny / 4)  # subnormal
            kernels.set_enabled(enabled)
            with torch.no_grad():
                updates, state = rule.update_(grads, state, params, step=2000)
            results.append(({k: u.clone() for k, u in updates.items()}, state))
    finally:
        kernels.set_enabled(True)
        torch.set_num_threads(before)
    (got, s_got), (want, s_want) = results
    for k in params:
        idle = grads[k].view(-1) == 0
        kernel_m, torch_m = s_got.momentum[0][k].view(-1)[idle], s_want.momentum[0][k].view(-1)[idle]
        assert torch.all(kernel_m == 0) and torch.all((torch_m > 0) & (torch_m < tiny))
        _near(got[k], want[k])
    assert float(torch.tensor(tiny) / 4) > 0  # the caller's floating-point mode is untouched


@needs_compiler
@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_kernel_matches_its_twin_with_nan_and_wide_hidden_layers(ratio):
    """The twin contract directly: H beyond the unrolled 8, a NaN gradient stays NaN (never a
    finite update, with or without the max_step_ratio bound), and the self-test's own cases pass."""
    mlp = kernels.mlp_update(40, threads=1)
    assert mlp is not None
    assert selftest._mlp(mlp, torch.Generator().manual_seed(1)) is None
    assert selftest._mlp_case(mlp, torch.Generator().manual_seed(2), 40, 2, True) is None
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(100, generator=gen)
    g[7] = float("nan")
    tensors = [g, torch.randn(100, generator=gen), *(torch.zeros(100) for _ in range(4)), torch.zeros(0),
               torch.zeros(0)]
    first, hidden, last = torch.randn(3, 40, 13), torch.empty(0, 40, 41), torch.randn(2, 41)
    coef = (0.1, 0.01, 0.001, 0.999, 0.001, 0.001, 10.0, 100.0, 1000.0, 1000.0, 1000.0, 1000.0 ** 0.5, 1e-8,
            1e-3, 0.0, 1.0, ratio)
    outs = []
    for fn in (mlp.update, twin.mlp_update):
        entry = ((1, 100, 1, 100, 0, 0), (*(t.clone() for t in tensors), torch.empty(100)))
        fn([entry], coef, first, hidden, last)
        outs.append(entry[1][-1])
    assert outs[0][7].isnan() and outs[1][7].isnan()
    assert torch.isnan(outs[0]).sum() == torch.isnan(outs[1]).sum()  # the NaN reaches the sums: all NaN
    both = ~outs[1].isnan()
    _near(outs[0][both], outs[1][both])


def test_torch_path_where_the_kernel_does_not_fit():
    """float64 rules, non-contiguous or non-CPU-float32 tensors, hidden layers wider than the kernel
    serves, and disabled kernels: no kernel (the torch blocks run)."""
    rule = _generalist()
    params, grads = _problem(steps=3)
    state = rule.init(params)
    assert kernels.mlp_update(kernels.MLP_MAX_HIDDEN + 1) is None
    bad = dict(grads[0], weight=grads[0]["weight"].t().contiguous().t())
    assert not bad["weight"].is_contiguous()
    assert rule._compiled_kernel(bad, state, params) is None
    half = dict(params, bias=params["bias"].half())
    assert rule._compiled_kernel(grads[0], state, half) is None
    rule64 = _generalist().double()
    assert rule64._compiled_kernel(grads[0], rule64.init(params), params) is None
    kernels.set_enabled(False)
    try:
        assert rule._compiled_kernel(grads[0], state, params) is None
    finally:
        kernels.set_enabled(True)


@needs_compiler
def test_optimizer_skips_a_nonfinite_gradient_and_warns():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    opt = l2o.LearnedOptimizer(model.parameters())
    model(torch.randn(8, 6)).square().mean().backward()
    model[0].weight.grad[0, 0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    assert any("gradient" in str(w.message) for w in caught)
    after = list(model.parameters())
    assert torch.equal(after[0], before[0])  # skipped, state kept
    assert not torch.equal(after[2], before[2])  # the others stepped
    assert all(torch.isfinite(p).all() for p in after)


def test_kernel_constants_are_the_rules():
    """mlp_rule.c's MLP_* defines are the numbers of l2o.kernels.mlp_constants, which the rule uses."""
    import re
    from pathlib import Path

    from l2o.kernels import mlp_constants
    from l2o.rules import mlp

    source = (Path(kernels.__file__).parent / "mlp_rule.c").read_text()
    defines = {name: float(value.rstrip("f")) for name, value in
               re.findall(r"^#define (MLP_[A-Z_]+) ([0-9.e+-]+f?)\b", source, flags=re.M)}
    python = {"MLP_F": "NUM_FEATURES", "MLP_TINY": "TINY", "MLP_GRAD_CLIP": "GRAD_CLIP",
              "MLP_FEATURE_CLIP": "FEATURE_CLIP", "MLP_MAGNITUDE_CLIP": "MAGNITUDE_CLIP"}
    for define, name in python.items():
        assert defines[define] == getattr(mlp_constants, name), define
        assert getattr(mlp, name) is getattr(mlp_constants, name), name
