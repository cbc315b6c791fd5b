"""The compiled LSTM kernels (l2o.kernels; the MLP rule's: test_mlp_kernel.py): same results as the
torch path, on the default and the portable build; the load-time self-test of every entry point, the
cache folder checks and the fallbacks."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

import l2o
from l2o import kernels
from l2o.kernels import selftest
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


@pytest.fixture(scope="session")
def portable_library():
    """The portable build (``L2O_KERNELS_PORTABLE=1``: no ``-march=native``, the C sources'
    portable branch), built, loaded and self-tested beside the default one."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("L2O_KERNELS_PORTABLE", "1")
        flag_sets = kernels._flag_sets()
        fns = kernels._load()
    assert all(kernels._PORTABLE_FLAG in flags and "-march=native" not in flags for flags in flag_sets)
    assert fns is not None, "the portable kernels did not build or failed their self-test"
    return fns


@pytest.fixture(params=["native", "portable"])
def variant(request, monkeypatch):
    """Runs a test on the default build and again on the portable one (what machines without
    AVX-512 compile), so that both C branches are built and checked on every machine."""
    if request.param == "portable":
        monkeypatch.setattr(kernels, "_kernel", request.getfixturevalue("portable_library"))
    return request.param


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
    if hasattr(os, "getuid"):  # a folder and a file no one else can write
        assert stat.S_IMODE((fresh_kernels / "kernels").stat().st_mode) == 0o700
        assert stat.S_IMODE(built[0].stat().st_mode) & 0o022 == 0
    mtime = built[0].stat().st_mtime_ns
    kernels._kernel = kernels._UNLOADED  # as in a new process: reuses the build instead of compiling again
    assert kernels.is_available()
    assert [p.stat().st_mtime_ns for p in (fresh_kernels / "kernels").glob("lstm_cell-*.so")] == [mtime]


@needs_compiler
@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
@pytest.mark.parametrize("block,variant", [(1, "native"), (17, "native"), (8192, "native"), (17, "portable"),
                                           (8192, "portable")], indirect=["variant"])
def test_kernel_matches_torch_path(kw, block, variant, monkeypatch):
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
def test_kernel_threads_give_identical_results(variant):
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
def test_kernel_extremes_nan_and_inf(variant):
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
    with pytest.warns(RuntimeWarning, match="could not build the compiled kernels"):
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
def test_learned_optimizer_uses_kernel_and_matches_torch_path(variant):
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
def test_autograd_kernel_as_accurate_as_torch_path(kw, n, second_order, variant, monkeypatch):
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
def test_autograd_kernel_unused_outputs(variant):
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
def test_autograd_kernels_threads_identical_and_saturation(variant):
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


# ---- safe builds: no fast-math, a self-test at load, private cache folders ----

def _source() -> bytes:
    return b"\n".join(path.read_bytes() for path in kernels._SOURCES)


@needs_compiler
@pytest.mark.parametrize("flag", ["-ffast-math", "-ffinite-math-only"])
def test_sources_refuse_fast_math(flag, tmp_path):
    """Every flag set turns fast-math off first, and a compiler in fast-math mode stops at the
    source's #error (fast-math folds the exp's rounding away and loses NaN: a silent wrong kernel)."""
    for flags in kernels._FLAG_SETS:
        assert flags[:2] == ["-O3", "-fno-fast-math"]
    proc = subprocess.run([kernels._compiler(), "-O3", flag, "-shared", "-fPIC", "-x", "c", "-", "-o",
                           str(tmp_path / "k.so")], input=_source(), capture_output=True)
    assert proc.returncode != 0
    assert b"need IEEE float semantics" in proc.stderr


@needs_compiler
def test_portable_build_is_its_own_cache_entry(portable_library, monkeypatch):
    native = kernels._build(kernels._compiler(), _source())
    monkeypatch.setenv("L2O_KERNELS_PORTABLE", "1")
    portable = kernels._build(kernels._compiler(), _source())
    assert native != portable and native.parent == portable.parent
    assert native.is_file() and portable.is_file()


@pytest.fixture
def reloaded_kernels(monkeypatch):
    """A kernels module that has loaded nothing (as in a new process), using the usual cache."""
    monkeypatch.delenv("L2O_KERNELS", raising=False)
    monkeypatch.setattr(kernels, "_kernel", kernels._UNLOADED)
    monkeypatch.setattr(kernels, "_warned", False)
    monkeypatch.setattr(kernels, "_enabled", None)


def _break(monkeypatch, entry):
    """Make one entry point of the loaded library wrong by a little (what a miscompiled kernel does)."""
    def off(t):
        t.add_(1e-2)

    if entry == "l2o_lstm_cell_f32":
        real_bind = kernels._bind_cell

        def bind(fns, threads):
            cell = real_bind(fns, threads)
            return lambda gates, c, h, h_copy=None, out=None: (cell(gates, c, h, h_copy, out), off(h))
        monkeypatch.setattr(kernels, "_bind_cell", bind)
    elif entry in ("l2o_lstm_forward_f32", "l2o_lstm_backward_f32"):
        name = entry.split("_")[2]
        real = getattr(kernels.LSTMAutograd, name)
        last = -1 if name == "backward" else 3  # dc, or c_new

        def wrong(self, *args, **kw):
            real(self, *args, **kw)
            off(args[last])
        monkeypatch.setattr(kernels.LSTMAutograd, name, wrong)
    elif entry == "l2o_tape_forward_f32":
        real_forward = kernels.TapeKernel.forward
        monkeypatch.setattr(kernels.TapeKernel, "forward", lambda self, *a: real_forward(self, *a) + 1e-2)
    elif entry == "l2o_mlp_update_f32":
        real_update = kernels.MLPKernel.update

        def wrong_update(self, entries, *args):
            real_update(self, entries, *args)
            for _, tensors in entries:
                off(tensors[-1])
        monkeypatch.setattr(kernels.MLPKernel, "update", wrong_update)
    else:
        real_backward = kernels.TapeKernel.backward
        monkeypatch.setattr(kernels.TapeKernel, "backward",
                            lambda self, *a: tuple(g * 1.01 for g in real_backward(self, *a)))


@needs_compiler
@pytest.mark.parametrize("entry", ["l2o_lstm_cell_f32", "l2o_lstm_forward_f32", "l2o_lstm_backward_f32",
                                   "l2o_tape_forward_f32", "l2o_tape_backward_f32", "l2o_mlp_update_f32"])
def test_self_test_failure_warns_once_and_falls_back(reloaded_kernels, monkeypatch, entry):
    """A library whose entry point disagrees with the torch twin is not used: one warning naming
    the entry point, then the torch path."""
    _break(monkeypatch, entry)
    expected = f"failed their self-test against torch \\({entry}.* differs from its torch twin"
    with pytest.warns(RuntimeWarning, match=expected):
        assert not kernels.is_available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not kernels.is_available()  # no second warning, no second load
        assert kernels.lstm_cell(torch.zeros(8, 4), torch.zeros(2, 4), torch.zeros(2, 4)) is None
        assert kernels.lstm_tape(2, 1, 4, 2, 10) is None
        assert kernels.mlp_update(8) is None


@needs_compiler
def test_self_test_passes_on_the_real_library_and_is_repeatable(reloaded_kernels):
    """The library as built passes, and the check leaves the global random state alone."""
    assert kernels.is_available()
    fns = kernels._kernel
    args = (kernels._bind_cell(fns, 1), kernels.LSTMAutograd(fns, 1), lambda *d: kernels.TapeKernel(fns, *d, threads=1),
            kernels.MLPKernel(fns, 1))
    state = torch.random.get_rng_state()
    assert selftest.check(*args) is None and selftest.check(*args) is None
    assert torch.equal(torch.random.get_rng_state(), state)


posix_only = pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX ownership and modes")


@pytest.fixture(scope="session")
def usual_library():
    """The library built from these sources in the usual cache (built there if it is not yet)."""
    return kernels._build(kernels._compiler(), _source())


@pytest.fixture
def cache_folders(usual_library, fresh_kernels, monkeypatch):
    """Both kernel folders under tmp_path (``$L2O_CACHE/kernels`` and the fallback in the temporary
    folder), and the usual library, which a test copies where it wants instead of compiling."""
    monkeypatch.setattr(tempfile, "tempdir", str(fresh_kernels / "tmp"))
    (fresh_kernels / "tmp").mkdir()
    return fresh_kernels / "kernels", fresh_kernels / "tmp" / f"l2o-kernels-{os.getuid()}", usual_library


def _plant(folder, mode, name, content):
    """``folder`` made with ``mode``, holding the file ``name`` (mode 0o700) with ``content``."""
    folder.mkdir(parents=True)
    (folder / name).write_bytes(content)
    (folder / name).chmod(0o700)
    folder.chmod(mode)
    return folder / name


PLANTED = b"planted: loading this would fail"


@needs_compiler
@posix_only
def test_cache_folder_writable_by_others_is_refused(cache_folders):
    """Another user could plant a library in a folder they can write: l2o warns and skips it (the
    file planted there is never loaded) and uses the private fallback folder."""
    primary, fallback, built = cache_folders
    _plant(primary, 0o777, built.name, PLANTED)
    usable = _plant(fallback, 0o700, built.name, built.read_bytes())
    with pytest.warns(RuntimeWarning, match=f"not using the compiled-kernel cache folder {primary}: it is writable "
                                            "by its group and others \\(mode 777\\)"):
        assert kernels.is_available()
        assert kernels._build(kernels._compiler(), _source()) == usable


@needs_compiler
@posix_only
def test_private_cache_folder_is_used_quietly(cache_folders):
    primary, fallback, built = cache_folders
    usable = _plant(primary, 0o700, built.name, built.read_bytes())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.is_available()
        assert kernels._build(kernels._compiler(), _source()) == usable
    assert not fallback.exists()  # never needed, never made


@needs_compiler
@posix_only
def test_both_folders_refused_falls_back_to_torch(cache_folders, monkeypatch):
    """Folders of another user (here: every folder, seen by a process of another user id) are
    refused, the temporary one too; then the torch path runs."""
    primary, fallback, built = cache_folders
    _plant(primary, 0o700, built.name, built.read_bytes())
    uid = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: uid + 1)
    _plant(fallback.with_name(f"l2o-kernels-{uid + 1}"), 0o700, built.name, built.read_bytes())
    with pytest.warns(RuntimeWarning) as record:
        assert not kernels.is_available()
    messages = [str(w.message) for w in record]
    owned = f"owned by user id {uid}, not by this user ({uid + 1})"
    assert any(f"cache folder {primary}: it is {owned}" in m for m in messages)
    assert any(f"cache folder {fallback.with_name(f'l2o-kernels-{uid + 1}')}: it is {owned}" in m for m in messages)
    assert any("could not build the compiled kernels" in m for m in messages)


@needs_compiler
@posix_only
def test_library_writable_by_others_is_compiled_again(cache_folders):
    """A cached library that others could have replaced is not loaded; its (private) folder gets a
    new build in its place."""
    primary, _, built = cache_folders
    planted = _plant(primary, 0o700, built.name, PLANTED)
    planted.chmod(0o666)
    with pytest.warns(RuntimeWarning, match=f"not using the compiled-kernel library {planted}: it is writable by "
                                            "its group and others"):
        assert kernels.is_available()
    assert stat.S_IMODE(planted.stat().st_mode) == 0o700 and planted.read_bytes()[:4] == b"\x7fELF"


# ---- torch.compile: with the kernels off (or under tracing) the step is plain torch ----

def _compiled_matches_eager(method, backend, kernels_on, rtol=1e-6, atol=1e-7):
    """``rule.<method>`` traced whole (``fullgraph=True``) gives the eager updates and state."""
    torch.manual_seed(0)
    rule = LSTMRule(preprocess="log_sign", hidden_size=6)
    params = {"a": torch.randn(5, 7), "b": torch.randn(3)}
    grads = {k: torch.randn(v.shape) for k, v in params.items()}

    def step(g, s, p):
        return getattr(rule, method)(g, s, p, step=0)

    kernels.set_enabled(kernels_on)
    assert kernels.is_available() == (kernels_on and HAVE_COMPILER)  # eager runs the kernel when on
    try:
        torch._dynamo.reset()
        got, got_state = torch.compile(step, fullgraph=True, backend=backend)(grads, rule.init(params), params)
        want, want_state = step(grads, rule.init(params), params)
    finally:
        kernels.set_enabled(True)
        torch._dynamo.reset()
    for k in params:
        torch.testing.assert_close(got[k], want[k], rtol=rtol, atol=atol)
        assert float(want[k].detach().abs().max()) > 0
    for a, b in zip([*got_state.hidden, *got_state.cell], [*want_state.hidden, *want_state.cell]):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def _in_fresh_process(*checks: str) -> None:
    """Run ``_compiled_matches_eager(...)`` for each argument list in ``checks`` in a new Python
    process: compiling leaves tracing state (fake tensors) in the process that would upset the
    tests that count live tensors."""
    root = Path(__file__).resolve().parents[1]
    code = "from tests.test_kernels import _compiled_matches_eager as check\n" + "".join(
        f"check({args})\n" for args in checks)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_step_compiles_to_one_graph():
    """No lock, ctypes or data_ptr in the step: with the kernels off, fullgraph tracing of update_
    and update works and gives the eager numbers; with them on (where there is a compiler) the
    kernels step aside under tracing (the twin is traced) while eager runs them, and the two agree
    to the kernel's rounding (as in test_kernel_matches_torch_path). The "eager" backend checks
    the tracing alone; the slow test below runs the compilers."""
    checks = ["'update_', 'eager', kernels_on=False", "'update', 'eager', kernels_on=False"]
    if HAVE_COMPILER:
        checks.append("'update_', 'eager', kernels_on=True, rtol=2e-5, atol=1e-6")
    _in_fresh_process(*checks)


@pytest.mark.slow
def test_step_compiles_with_aot_autograd_and_inductor():
    """The same through AOT autograd (update) and the default backend, inductor (update_: generated
    code, so a looser match: float32 reassociation)."""
    _in_fresh_process("'update', 'aot_eager', kernels_on=False",
                      "'update_', 'inductor', kernels_on=False, rtol=2e-5, atol=1e-6")


@needs_compiler
def test_loaded_step_takes_no_lock(monkeypatch):
    """After the first load, a step reads module globals only: the loading lock is never taken."""
    assert kernels.is_available()

    class NoLock:
        def __enter__(self):
            raise AssertionError("the kernels' lock was taken after loading")

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(kernels, "_lock", NoLock())
    rule = LSTMRule()
    params = {"w": torch.randn(40)}
    state = rule.init(params)
    rule.update_({"w": torch.randn(40)}, state, params, step=0)
    rule.update({"w": torch.randn(40)}, state, params, step=0)
