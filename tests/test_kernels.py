"""The compiled LSTM-cell kernel (l2o.kernels): same results as the torch path, safe fallbacks."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

import l2o
from l2o import kernels
from l2o.rules import LSTMRule
from l2o.rules import lstm as lstm_module

HAVE_COMPILER = kernels._compiler() is not None
needs_compiler = pytest.mark.skipif(not HAVE_COMPILER, reason="no C compiler on this machine (the torch path runs instead)")

CONFIGS = [
    dict(),
    dict(preprocess="log_sign", output_scale=0.1),
    dict(hidden_size=7, num_layers=3),
    dict(num_layers=1, hidden_size=33),
    dict(preprocess="rnnprop", hidden_size=6, adam_lr=0.01),
]


@pytest.fixture
def fresh_kernels(monkeypatch, tmp_path):
    """A kernels module that has loaded nothing, caching into tmp_path."""
    monkeypatch.setenv("L2O_CACHE", str(tmp_path))
    monkeypatch.delenv("L2O_KERNELS", raising=False)
    monkeypatch.setattr(kernels, "_kernel", kernels._UNLOADED)
    monkeypatch.setattr(kernels, "_warned", False)
    monkeypatch.setattr(kernels, "_enabled", None)
    return tmp_path


def _run(rule, params, steps, seed, scale_of):
    """update_ over ``steps`` steps from a fresh state; returns the updates and final state."""
    state = rule.init(params)
    outs = []
    for t in range(steps):
        g = torch.Generator().manual_seed(seed + t)
        grads = {k: torch.randn(v.shape, generator=g) * scale_of(t) for k, v in params.items()}
        updates, state = rule.update_(grads, state, params, step=t)
        outs.append({k: u.clone() for k, u in updates.items()})
    return outs, state


@needs_compiler
def test_builds_and_is_cached(fresh_kernels):
    assert kernels.is_available()
    built = list((fresh_kernels / "kernels").glob("lstm_cell-*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    kernels._kernel = kernels._UNLOADED  # as in a new process: reuses the build instead of compiling again
    assert kernels.is_available()
    assert [p.stat().st_mtime_ns for p in (fresh_kernels / "kernels").glob("lstm_cell-*.so")] == [mtime]


@needs_compiler
@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
@pytest.mark.parametrize("block", [1, 17, 8192])
def test_kernel_matches_torch_path(kw, block, monkeypatch):
    """float32 update_ with the kernel equals the torch path to float rounding over 6 steps (gradient
    scales 1e-4 to 1e1), for column counts that are and are not multiples of the 16-wide vectors."""
    monkeypatch.setattr(lstm_module, "BLOCK_COLUMNS", block)
    torch.manual_seed(0)
    rule = LSTMRule(**kw)
    params = {"a": torch.randn(50, 7), "b": torch.randn(3), "c": torch.zeros(0), "d": torch.randn(())}
    scale = lambda t: 10.0 ** (t - 4)  # noqa: E731
    kernels.set_enabled(True)
    try:
        assert kernels.is_available()
        got, got_state = _run(rule, params, 6, 100, scale)
        kernels.set_enabled(False)
        want, want_state = _run(rule, params, 6, 100, scale)
    finally:
        kernels.set_enabled(True)
    for g_step, w_step in zip(got, want):
        for k in params:
            torch.testing.assert_close(g_step[k], w_step[k], rtol=2e-5, atol=1e-6)
    for a, b in zip([*got_state.hidden, *got_state.cell], [*want_state.hidden, *want_state.cell]):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)
        assert float(a.abs().max()) > 1e-3  # the state moved


@needs_compiler
def test_kernel_threads_give_identical_results():
    """The OpenMP split over column chunks changes nothing: every element is computed alike."""
    torch.manual_seed(0)
    gates = torch.randn(80, 5000) * 3
    c0, h0 = torch.randn(20, 5000), torch.randn(20, 5000)
    results = []
    for threads in (1, 2, 3):
        c, h, hc, u = c0.clone(), h0.clone(), torch.empty(20, 5000), torch.empty(5000)
        w = torch.randn(20, generator=torch.Generator().manual_seed(1))
        cell = kernels.lstm_cell(gates, c, h, threads=threads)
        assert cell is not None
        cell(gates, c, h, hc, out=(u, w, 0.5))
        results.append((c, h, hc, u))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
    c, h, hc, u = results[0]
    assert torch.equal(hc, h)
    torch.testing.assert_close(u, w @ h + 0.5, rtol=1e-5, atol=1e-5)
    i, f, o = (torch.sigmoid(gates[k * 20:(k + 1) * 20]) for k in range(3))
    c_ref = f * c0 + i * torch.tanh(gates[60:] / 2)  # the cell rows hold 2 a_g
    torch.testing.assert_close(c, c_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h, o * torch.tanh(c_ref), rtol=1e-5, atol=1e-6)


@needs_compiler
def test_kernel_extremes_nan_and_inf():
    """Huge pre-activations saturate like torch's sigmoid; NaN stays NaN (a NaN gradient must not
    turn into a finite update); infinities saturate."""
    special = [0.0, 1e-30, -1e-30, 20.0, -20.0, 88.0, -88.0, 1e30, -1e30, float("inf"), float("-inf"), float("nan")]
    vals = torch.tensor(special + [0.3] * 4 + special)  # full vectors, then a short last one (28 columns)
    m = vals.numel()
    gates = vals.repeat(4, 1)
    c, h = torch.ones(1, m), torch.zeros(1, m)
    cell = kernels.lstm_cell(gates, c, h)
    assert cell is not None
    cell(gates, c, h)
    i = torch.sigmoid(vals)
    c_ref = i * 1.0 + i * torch.tanh(vals / 2)
    h_ref = i * torch.tanh(c_ref)
    nan = torch.isnan(vals)
    assert torch.isnan(c[0][nan]).all() and torch.isnan(h[0][nan]).all()
    torch.testing.assert_close(c[0][~nan], c_ref[~nan], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(h[0][~nan], h_ref[~nan], rtol=1e-6, atol=1e-7)


def test_kernel_declines_what_it_cannot_serve():
    """float64, non-contiguous rows, or disabled: None, so the caller uses torch."""
    g32, s32 = torch.zeros(8, 4), torch.zeros(2, 4)
    assert kernels.lstm_cell(g32.double(), s32.double(), s32.double()) is None
    assert kernels.lstm_cell(g32, s32.t().contiguous().t(), s32) is None
    kernels.set_enabled(False)
    try:
        assert kernels.lstm_cell(g32, s32, s32) is None and not kernels.is_available()
    finally:
        kernels.set_enabled(True)
    with pytest.raises(TypeError, match="True or False"):
        kernels.set_enabled("yes")  # type: ignore[arg-type]


def test_env_var_disables(fresh_kernels, monkeypatch):
    monkeypatch.setenv("L2O_KERNELS", "0")
    assert not kernels.is_available()
    assert not (fresh_kernels / "kernels").exists()  # nothing compiled


def test_no_compiler_warns_once_and_falls_back(fresh_kernels, monkeypatch):
    """A missing compiler costs speed, not correctness: one RuntimeWarning, then the torch path."""
    monkeypatch.setenv("CC", str(fresh_kernels / "no-such-compiler"))
    monkeypatch.setattr(shutil, "which", lambda name: None)
    torch.manual_seed(0)
    rule = LSTMRule()
    params = {"w": torch.randn(40)}
    with pytest.warns(RuntimeWarning, match="could not build the compiled LSTM kernel"):
        got, _ = _run(rule, params, 2, 0, lambda t: 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got_again, _ = _run(rule, params, 2, 0, lambda t: 1.0)  # no second warning
    with torch.no_grad():
        state = rule.init(params)
        g = torch.Generator().manual_seed(0)
        want, _ = rule.update({"w": torch.randn(40, generator=g)}, state, params, step=0)
    torch.testing.assert_close(got[0]["w"], want["w"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got_again[0]["w"], got[0]["w"], rtol=0, atol=0)


def test_compile_error_falls_back(fresh_kernels, monkeypatch):
    """A compiler that fails (here: `false`) is reported in the warning; nothing half-written is cached."""
    false = shutil.which("false")
    if false is None:
        pytest.skip("no `false` executable")
    monkeypatch.setenv("CC", false)
    with pytest.warns(RuntimeWarning, match="using the torch implementation"):
        assert not kernels.is_available()
    assert list((fresh_kernels / "kernels").glob("*")) == []


@needs_compiler
def test_learned_optimizer_uses_kernel_and_matches_torch_path():
    """The drop-in optimizer's float32 trajectory with and without the kernel agrees to rounding."""
    def trajectory():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Sigmoid(), torch.nn.Linear(9, 2))
        opt = l2o.LearnedOptimizer(model.parameters(), pretrained="quadratic", lr=0.1)
        x, y = torch.randn(32, 6), torch.randn(32, 2)
        losses = []
        for _ in range(5):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses, [p.detach().clone() for p in model.parameters()]

    losses_k, params_k = trajectory()
    kernels.set_enabled(False)
    try:
        losses_t, params_t = trajectory()
    finally:
        kernels.set_enabled(True)
    assert losses_k[-1] < losses_k[0]
    torch.testing.assert_close(torch.tensor(losses_k), torch.tensor(losses_t), rtol=1e-5, atol=1e-7)
    for a, b in zip(params_k, params_t):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---- meta-training: the fused autograd step's kernel forward and backward ----

def _meta_gradients(rule, theta0, steps, second_order):
    """Meta-loss sum_t |theta_t|^2 over ``steps`` LSTM steps on a fixed nonlinear gradient field;
    returns the meta-loss, its gradients for every meta-param and (second order) for theta0."""
    params = {"a": theta0.clone().requires_grad_(second_order)}
    theta, state, total = params["a"], rule.init(params), 0.0
    for t in range(steps):
        g = torch.sin(3.0 * theta) * 5.0 + 0.1 * theta
        updates, state = rule.update({"a": g if second_order else g.detach()}, state, {"a": theta}, step=t)
        theta = theta + updates["a"]
        total = total + (theta * theta).sum()
    inputs = [*rule.parameters(), *([params["a"]] if second_order else [])]
    return total.detach(), torch.autograd.grad(total, inputs)


@needs_compiler
@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
@pytest.mark.parametrize("n", [7, 1300])
@pytest.mark.parametrize("second_order", [False, True], ids=["first", "second"])
def test_autograd_kernel_as_accurate_as_torch_path(kw, n, second_order, monkeypatch):
    """Meta-gradients through 5 steps with the kernel forward/backward (float32) are as close to the
    float64 truth as the torch path's float32 ones (within 10x, plus 2e-5 of their scale), for
    column counts below one vector and with a tail after the 512/1024-column chunks."""
    import copy

    calls = []  # one per step that ran the compiled forward
    real = kernels.lstm_autograd

    def counted(*tensors, **kw):
        found = real(*tensors, **kw)
        if found is not None:
            calls.append(1)
        return found

    monkeypatch.setattr(kernels, "lstm_autograd", counted)
    torch.manual_seed(0)
    rule = LSTMRule(**kw)
    theta0 = torch.randn(n)
    loss64, want = _meta_gradients(copy.deepcopy(rule).double(), theta0.double(), 5, second_order)
    assert not calls  # float64 runs the torch path
    kernels.set_enabled(False)
    try:
        loss_t, torch32 = _meta_gradients(rule, theta0, 5, second_order)
    finally:
        kernels.set_enabled(True)
    assert not calls
    loss_k, kernel32 = _meta_gradients(rule, theta0, 5, second_order)
    assert len(calls) == 5
    assert abs(float(loss_k) - float(loss64)) <= 10 * abs(float(loss_t) - float(loss64)) + 1e-6 * float(loss64)
    for k, t, w in zip(kernel32, torch32, want):
        scale = float(w.abs().max())
        assert scale > 0
        err_k, err_t = float((k.double() - w).abs().max()), float((t.double() - w).abs().max())
        assert err_k <= 10 * err_t + 2e-5 * scale, (err_k, err_t, scale)


@needs_compiler
def test_autograd_kernel_unused_outputs():
    """Gradients that never arrive (an output not used by the loss) count as zero, as in torch."""
    torch.manual_seed(0)
    rule = LSTMRule(hidden_size=5, num_layers=2)
    x = torch.randn(1, 40)
    hs = [torch.randn(5, 40) for _ in range(2)]
    cs = [torch.randn(5, 40) for _ in range(2)]
    layer_params = [t for pair in zip(rule.weights, rule.biases) for t in pair]
    for pick in (lambda out: out[0].sum(), lambda out: out[1].sum() + out[4].square().sum()):
        got = []
        for enabled in (True, False):
            kernels.set_enabled(enabled)
            try:
                out = lstm_module._FusedLSTMStep.apply(x, 2, *hs, *cs, *layer_params, rule.out_weight, rule.out_bias)
                got.append(torch.autograd.grad(pick(out), list(rule.parameters()), allow_unused=True))
            finally:
                kernels.set_enabled(True)
        for a, b in zip(*got):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert any(float(a.abs().max()) > 0 for a in got[0])


@needs_compiler
def test_autograd_kernels_threads_identical_and_saturation():
    """The forward and backward kernels give bitwise-identical results on 1, 2 and 3 threads, and
    saturated or NaN pre-activations behave as in torch (finite gradients; NaN stays NaN)."""
    torch.manual_seed(0)
    H, m = 4, 3000
    act0 = torch.randn(4 * H, m) * 4
    act0[:, :12] = torch.tensor([1e30, -1e30, float("inf"), float("-inf"), 88.0, -88.0, 0.0, 20.0, -20.0, 1e-30,
                                 3.0, float("nan")])
    bias, c = torch.randn(4 * H), torch.randn(H, m)
    dh, dcn, du, w = torch.randn(H, m), torch.randn(H, m), torch.randn(m), torch.randn(1, H)
    results = []
    for threads in (1, 2, 3):
        k = kernels.lstm_autograd(act0, threads=threads)
        assert k is not None
        act, cn, h, tc, u = act0.clone(), torch.empty(H, m), torch.empty(H, m), torch.empty(H, m), torch.empty(m)
        k.forward(act, bias, c, cn, h, tc, out=(u, w, 0.25))
        dact, dc = torch.empty(4 * H, m), torch.empty(H, m)
        k.backward(act, c, tc, (dh, None), du, w, dcn, dact, dc)
        results.append((act, cn, h, tc, u, dact, dc))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))
    act, cn, h, tc, u, dact, dc = results[0]
    # torch reference of the same forward and backward (autograd)
    a = (act0 + bias.unsqueeze(1)).requires_grad_()
    c_ref = c.clone().requires_grad_()
    i, f, o = (torch.sigmoid(a[q * H:(q + 1) * H]) for q in range(3))
    g = torch.tanh(a[3 * H:])
    c_new = f * c_ref + i * g
    h_new = o * torch.tanh(c_new)
    u_ref = (w @ h_new).squeeze(0) + 0.25
    da, dc_ref = torch.autograd.grad([h_new, c_new, u_ref], [a, c_ref], [dh, dcn, du])
    nan = torch.isnan(act0[:, 11])
    assert nan.all() and torch.isnan(cn[:, 11]).all() and torch.isnan(dc[:, 11]).all()
    ok = slice(0, 11), slice(12, m)
    for cols in ok:
        torch.testing.assert_close(cn[:, cols], c_new.detach()[:, cols], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(h[:, cols], h_new.detach()[:, cols], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(tc[:, cols], torch.tanh(c_new.detach())[:, cols], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dact[:, cols], da[:, cols], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(dc[:, cols], dc_ref[:, cols], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(u[12:], u_ref.detach()[12:], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(dact[:, :11]).all()


def test_autograd_kernels_decline_float64_and_disabled():
    assert kernels.lstm_autograd(torch.zeros(3, dtype=torch.float64)) is None
    kernels.set_enabled(False)
    try:
        assert kernels.lstm_autograd(torch.zeros(3)) is None
    finally:
        kernels.set_enabled(True)
