"""The numeric self-test a freshly loaded kernel library must pass before l2o uses it.

Every entry point runs once on small random inputs (sizes chosen so that full vectors, a short
last vector, a full and a partial 64-column tape block, the tape's 16-row tiles with a remainder,
and the MLP rule's vectors, factored matrices with rows shorter and longer than a vector, several
instances, a clipped gradient, and its specialised (width 8, one layer) and general network are
all exercised) and is compared with its torch twin (:mod:`l2o.kernels.twin`). A
library miscompiled (for example by a compiler in fast-math mode, which breaks the exp of
``lstm_gates.c``) or built for the wrong machine fails here, and l2o runs torch instead. The
whole test takes a few milliseconds.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from . import twin
from .twin import AUTOGRAD, lstm_cell

__all__ = ["TOLERANCE", "check"]

#: Largest accepted difference from the twin, relative to the largest magnitude of the twin's
#: result (at least 1). The kernels' float32 rounding differs from torch's by ~1e-6 here.
TOLERANCE = 1e-4

H, M = 5, 37  # hidden units (4H = 20 rows) and columns of the cell tests
T, F, L, N = 2, 2, 2, 70  # the tape test: steps, input features, layers, coordinates
CPU32 = dict(dtype=torch.float32, device="cpu")  # whatever the user's default dtype and device


def _randn(*shape: int, gen: torch.Generator, scale: float = 1.0) -> Tensor:
    return torch.randn(*shape, generator=gen, **CPU32) * scale


def _empty(*shape: int) -> Tensor:
    return torch.empty(*shape, **CPU32)


def _error(got: Tensor, want: Tensor) -> float:
    """Max difference relative to ``max(1, max |want|)``, where ``want`` is finite; elsewhere ``got``
    must equal it (NaN stays NaN: a NaN gradient must never become a finite update)."""
    got, want = got.double(), want.double()
    finite = torch.isfinite(want)
    if not torch.equal(got[~finite].nan_to_num(nan=0.5), want[~finite].nan_to_num(nan=0.5)):
        return float("inf")
    if not finite.any():
        return 0.0
    scale = max(1.0, float(want[finite].abs().max()))
    return float((got[finite] - want[finite]).abs().max()) / scale  # NaN (a failure) if got has NaN here


def _compare(name: str, got: tuple[Tensor, ...], want: tuple[Tensor, ...]) -> str | None:
    worst = max(_error(g, w) for g, w in zip(got, want))
    if not worst <= TOLERANCE:
        return f"{name} differs from its torch twin by {worst:.3g} (relative; at most {TOLERANCE:g} expected)"
    return None


def _cell(cell: Callable[..., None], gen: torch.Generator) -> str | None:
    gates = _randn(4 * H, M, gen=gen, scale=3.0)
    special = [float("nan"), float("inf"), float("-inf"), 1e30, -1e30] * 4
    gates[:, 0] = torch.tensor(special, **CPU32)  # NaN stays NaN, saturation saturates
    c, h = _randn(H, M, gen=gen), _randn(H, M, gen=gen)
    w = _randn(1, H, gen=gen)
    results = []
    for fn in (cell, lstm_cell(_empty(H * M))):
        g, c1, h1, copy, u = gates.clone(), c.clone(), h.clone(), _empty(H, M), _empty(1, M)
        fn(g, c1, h1, copy, out=(u, w, 0.25))
        results.append((c1, h1, copy, u))
    return _compare("l2o_lstm_cell_f32", *results)


def _autograd(autograd: Any, gen: torch.Generator) -> str | None:
    pre, bias = _randn(4 * H, M, gen=gen, scale=2.0), _randn(4 * H, gen=gen)
    c = _randn(H, M, gen=gen)
    dh, dh2, dc_new, du = (_randn(H, M, gen=gen), _randn(H, M, gen=gen),
                           _randn(H, M, gen=gen), _randn(M, gen=gen))
    w = _randn(1, H, gen=gen)
    forward, backward = [], []
    for ops in (autograd, AUTOGRAD):
        act, c_new, h, tanh_c, copy, u = pre.clone(), *(_empty(H, M) for _ in range(4)), _empty(M)
        ops.forward(act, bias, c, c_new, h, tanh_c, h_copy=copy, out=(u, w, 0.5))
        forward.append((act, c_new, h, tanh_c, copy, u))
        dact, dc = _empty(4 * H, M), _empty(H, M)
        ops.backward(act, c, tanh_c, (dh, dh2), du, w, dc_new, dact, dc)
        backward.append((dact, dc))
    return _compare("l2o_lstm_forward_f32", *forward) or _compare("l2o_lstm_backward_f32", *backward)


def _tape_twin(xs: Tensor, ws: list[Tensor], bs: list[Tensor], out_w: Tensor, out_b: float, h0: Tensor, c0: Tensor,
               du: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """What the tape computes, with the twin's forward and backward step by step: the outputs
    ``(T, N)``, the final h and c ``(L, H, N)``, and the flat weight, bias, output-weight and
    output-bias gradients."""
    hs, cs = list(h0), list(c0)
    saved, tops, us = [], [], []
    for s in range(T):
        inp, step = xs[s], []
        for layer in range(L):
            xh = torch.cat((inp, hs[layer]))
            act, c_new, h_new, tanh_c = ws[layer] @ xh, *(_empty(H, N) for _ in range(3))
            AUTOGRAD.forward(act, bs[layer], cs[layer], c_new, h_new, tanh_c)
            step.append((xh, cs[layer], act, tanh_c))
            hs[layer], cs[layer], inp = h_new, c_new, h_new
        saved.append(step)
        tops.append(inp)
        us.append((out_w @ inp).squeeze(0) + out_b)
    dws, dbs = [torch.zeros_like(w) for w in ws], [torch.zeros_like(b) for b in bs]
    dout_w, dout_b = torch.zeros(H, **CPU32), torch.zeros(1, **CPU32)
    dh_next: list[Tensor | None] = [None] * L
    dc_next: list[Tensor | None] = [None] * L
    for s in reversed(range(T)):
        dout_w += tops[s] @ du[s]
        dout_b += du[s].sum()
        dh_above = None
        for layer in reversed(range(L)):
            xh, c, act, tanh_c = saved[s][layer]
            top = layer == L - 1
            dact, dc = _empty(4 * H, N), _empty(H, N)
            AUTOGRAD.backward(act, c, tanh_c, (dh_above, dh_next[layer]), du[s] if top else None,
                              out_w if top else None, dc_next[layer], dact, dc)
            dws[layer] += dact @ xh.t()
            dbs[layer] += dact.sum(1)
            dxh = ws[layer].t() @ dact
            n_in = xh.shape[0] - H
            dh_next[layer], dc_next[layer], dh_above = dxh[n_in:], dc, dxh[:n_in]
    return (torch.stack(us), torch.stack(hs), torch.stack(cs), torch.cat([d.reshape(-1) for d in dws]), torch.cat(dbs),
            dout_w, dout_b)


def _tape(tape: Callable[..., Any], gen: torch.Generator) -> str | None:
    ws = [_randn(4 * H, (F if layer == 0 else H) + H, gen=gen, scale=0.5) for layer in range(L)]
    bs = [_randn(4 * H, gen=gen, scale=0.5) for _ in range(L)]
    out_w, out_b = _randn(1, H, gen=gen), 0.3
    h0, c0 = _randn(L, H, N, gen=gen), _randn(L, H, N, gen=gen)
    xs, du = _randn(T, F, N, gen=gen), _randn(T, N, gen=gen)
    weight, bias, flat_w = torch.cat([w.reshape(-1) for w in ws]), torch.cat(bs), out_w.reshape(-1)
    kernel = tape(T, F, H, L, N)
    kernel.start(h0, c0)
    problem = _compare("l2o_tape_start_f32 / l2o_tape_state_f32", kernel.state(0), (h0, c0))
    us = torch.stack([kernel.forward(s + 1, xs[s], weight, bias, flat_w, out_b) for s in range(T)])
    h, c = kernel.state(T)
    grads = kernel.backward(du, weight, flat_w)
    want = _tape_twin(xs, ws, bs, out_w, out_b, h0, c0, du)
    return (problem or _compare("l2o_tape_forward_f32", (us,), want[:1])
            or _compare("l2o_tape_state_f32", (h, c), want[1:3]) or _compare("l2o_tape_backward_f32", grads, want[3:]))


def _mlp_case(kernel: Any, gen: torch.Generator, hidden: int, layers: int, residual: bool,
              ratio: float = 0.0) -> str | None:
    shapes = [((1, 37, 1, 37, 0, 0), (37,)), ((1, 35, 5, 7, 1, 1), (5, 7)), ((2, 66, 3, 22, 1, 2), (2, 3, 2, 11)),
              ((3, 5, 1, 5, 0, 0), (3, 5))]
    first = _randn(3, hidden, 13, gen=gen, scale=0.5)
    hid = _randn(layers - 1, hidden, hidden + 1, gen=gen, scale=0.5)
    last = _randn(2, hidden + 1, gen=gen, scale=0.5)
    coef = (0.1, 0.01, 0.001, 0.999, 0.001, 0.01, 1 / 0.271, 1 / 0.0297, 1 / 0.003, 1 / 0.003, 1 / 0.003,
            (1 / 0.003) ** 0.5, 1e-8, 1e-3, 0.2, float(residual), ratio)
    inputs = []
    for dims, shape in shapes:
        I, n, R, C, factored, _ = dims
        g, p = _randn(*shape, gen=gen, scale=2.0), _randn(*shape, gen=gen)
        g.view(-1)[0] = 1e20  # clipped
        ms = [_randn(*shape, gen=gen, scale=0.3) for _ in range(3)]
        v = _randn(*shape, gen=gen).square()
        r = _randn(I, R, gen=gen).square() if factored else _empty(0)
        c = _randn(I, C, gen=gen).square() if factored else _empty(0)
        inputs.append((dims, (g, p, *ms, v, r, c)))
    results = []
    for fn in (kernel.update, twin.mlp_update):
        entries = [(dims, (*(t.clone() for t in ts), _empty(*ts[0].shape))) for dims, ts in inputs]
        fn(entries, coef, first, hid, last)
        results.append(tuple(t for _, ts in entries for t in ts[2:]))
    return _compare(f"l2o_mlp_update_f32 (H={hidden}, {layers} layers, max_step_ratio {ratio})", *results)


def _mlp(kernel: Any, gen: torch.Generator) -> str | None:
    return (_mlp_case(kernel, gen, 8, 1, True) or _mlp_case(kernel, gen, 5, 3, False)
            or _mlp_case(kernel, gen, 8, 1, True, 0.5))


@torch.no_grad()
def check(cell: Callable[..., None], autograd: Any, tape: Callable[..., Any], mlp: Any) -> str | None:
    """Run the kernels once against their twins: ``cell`` has :func:`l2o.kernels.lstm_cell`'s
    ``cell`` contract, ``autograd`` is an :class:`~l2o.kernels.LSTMAutograd`, ``tape(steps,
    features, hidden, layers, n)`` makes a :class:`~l2o.kernels.TapeKernel` and ``mlp`` is an
    :class:`~l2o.kernels.MLPKernel`. Returns ``None`` if all agree, else what failed: the entry
    point and its error (or the exception it raised)."""
    gen = torch.Generator(device="cpu").manual_seed(0)  # the global random state is left alone
    for part, kernel in ((_cell, cell), (_autograd, autograd), (_tape, tape), (_mlp, mlp)):
        try:
            problem = part(kernel, gen)
        except Exception as exc:  # a kernel that raises fails the test; l2o then runs torch
            return f"the {part.__name__.strip('_')} check raised {type(exc).__name__}: {exc}"
        if problem:
            return problem
    return None
