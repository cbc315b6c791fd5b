r"""The torch twins of the compiled kernels: the same contracts, in torch.

What runs wherever the kernels do not (float64, CUDA, no C compiler, ``L2O_KERNELS=0``, inside
:func:`torch.compile`), and what the kernels are checked against when they are loaded. The gate
math is written once, in :func:`gates_` (forward) and :func:`gates_backward_`: with the
pre-activations :math:`a = W[x; h] + b` of one layer,

.. math::
    i, f, o = \sigma(a_i), \sigma(a_f), \sigma(a_o), \quad g = \tanh(a_g) = 2\sigma(2a_g) - 1,
    \quad c' = f c + i g, \quad h' = o \tanh(c'),

with :math:`\tanh(x) = 2\sigma(2x) - 1` throughout (``tanh`` is several times slower than
``sigmoid`` on CPU), and the backward, given the gradients :math:`\delta h` at :math:`h'` and
:math:`\delta c` at :math:`c'`:

.. math::
    \delta c \mathrel{+}= \delta h\, o\, (1 - \tanh^2 c'), \quad
    \delta a = [\delta c\, g\, i(1-i);\ \delta c\, c\, f(1-f);\ \delta h \tanh c'\, o(1-o);\
    \delta c\, i\, (1-g^2)], \quad \delta c_{\text{old}} = \delta c\, f.

:func:`lstm_cell` is the twin of :func:`l2o.kernels.lstm_cell`'s ``cell``, :data:`AUTOGRAD` of
:func:`l2o.kernels.lstm_autograd`'s forward and backward, and :func:`mlp_update` of
:meth:`l2o.kernels.MLPKernel.update` (one step of :class:`l2o.MLPRule` on whole tensors). Every
function works in place on the tensors it is given, for any float dtype and device.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from .mlp_constants import FEATURE_CLIP, GRAD_CLIP, MAGNITUDE_CLIP, NUM_FEATURES, TINY

__all__ = ["gates_", "gates_backward_", "lstm_cell", "Autograd", "AUTOGRAD", "mlp_update"]


def gates_(gates: Tensor, c: Tensor, c_new: Tensor, tanh_c: Tensor, h: Tensor) -> None:
    r"""The gate math of one layer (module docstring), in place. ``gates`` ``(4H, m)`` holds the
    pre-activations ``[a_i; a_f; a_o; 2 a_g]`` (cell-gate rows doubled) on entry and the activations
    ``[i; f; o; g]`` on return; writes :math:`c'` to ``c_new`` (which may be ``c``), :math:`\tanh(c')`
    to ``tanh_c`` and :math:`h'` to ``h``, all ``(H, m)``."""
    i, f, o, g = gates.sigmoid_().split(c.shape[0])
    g.mul_(2.0).sub_(1.0)
    torch.mul(f, c, out=c_new).addcmul_(i, g)
    torch.mul(c_new, 2.0, out=tanh_c).sigmoid_().mul_(2.0).sub_(1.0)
    torch.mul(o, tanh_c, out=h)


def gates_backward_(act: Tensor, c: Tensor, tanh_c: Tensor, dh: Tensor, dc_new: Tensor | None, dact: Tensor,
                    dc: Tensor) -> None:
    r"""The backward of :func:`gates_` (module docstring): from the activations ``act`` ``(4H, m)``,
    the old cell ``c``, :math:`\tanh(c')` and the gradients ``dh`` at :math:`h'` and ``dc_new`` at
    :math:`c'` (``None``: zero), writes the gradient of the pre-activations (not doubled) to ``dact``
    and that of ``c`` to ``dc``."""
    hidden = c.shape[0]
    i, f, o, g = act.split(hidden)
    one_minus_t2 = torch.mul(tanh_c, tanh_c).neg_().add_(1.0)
    dcv = torch.mul(dh, o).mul_(one_minus_t2)
    if dc_new is not None:
        dcv.add_(dc_new)
    di, df, do, dg = dact.split(hidden)
    torch.mul(dcv, g, out=di)
    torch.mul(dcv, c, out=df)
    torch.mul(dh, tanh_c, out=do)
    ifo = act[: 3 * hidden]
    dact[: 3 * hidden].mul_(ifo - ifo * ifo)
    torch.mul(dcv, i, out=dg).mul_(torch.mul(g, g).neg_().add_(1.0))
    torch.mul(dcv, f, out=dc)


def _output(h: Tensor, u: Tensor, w: Tensor, b: Tensor | float) -> None:
    r"""``u`` (``m`` elements, any shape) := the output layer :math:`w^\top h + b`."""
    u2, w2 = u.view(1, -1), w.view(1, -1)
    if isinstance(b, Tensor):
        torch.addmm(b.reshape(1, 1), w2, h, out=u2)
    else:
        torch.mm(w2, h, out=u2).add_(b)


def lstm_cell(scratch: Tensor) -> Callable[..., None]:
    r"""The twin of :func:`l2o.kernels.lstm_cell`'s ``cell(gates, c, h, h_copy=None, out=None)``
    (same contract: ``c`` and ``h`` overwritten with the new state), using ``scratch`` (at least
    ``H * m`` elements) for :math:`\tanh(c')`."""

    def cell(gates: Tensor, c: Tensor, h: Tensor, h_copy: Tensor | None = None,
             out: tuple[Tensor, Tensor, Tensor | float] | None = None) -> None:
        hidden, m = c.shape
        gates_(gates, c, c, scratch[: hidden * m].view(hidden, m), h)
        if h_copy is not None:
            h_copy.copy_(h)
        if out is not None:
            _output(h, *out)

    return cell


class Autograd(NamedTuple):
    """The twin of :class:`l2o.kernels.LSTMAutograd` (same methods and contracts)."""

    def forward(self, act: Tensor, bias: Tensor, c: Tensor, c_new: Tensor, h: Tensor, tanh_c: Tensor,
                h_copy: Tensor | None = None, out: tuple[Tensor, Tensor, Tensor | float] | None = None) -> None:
        """:meth:`l2o.kernels.LSTMAutograd.forward`: ``act`` holds :math:`W[x; h]` on entry."""
        hidden = c.shape[0]
        act[: 3 * hidden].add_(bias[: 3 * hidden].unsqueeze(1))
        act[3 * hidden:].add_(bias[3 * hidden:].unsqueeze(1)).mul_(2.0)
        gates_(act, c, c_new, tanh_c, h)
        if h_copy is not None:
            h_copy.copy_(h)
        if out is not None:
            _output(h, *out)

    def backward(self, act: Tensor, c: Tensor, tanh_c: Tensor, dh_parts: tuple[Tensor | None, Tensor | None],
                 du: Tensor | None, out_w: Tensor | None, dc_new: Tensor | None, dact: Tensor, dc: Tensor) -> None:
        """:meth:`l2o.kernels.LSTMAutograd.backward`."""
        parts = [p for p in dh_parts if p is not None]
        if du is not None and out_w is not None:
            parts.append(out_w.reshape(-1, 1) * du.reshape(1, -1))
        dh = torch.zeros_like(c) if not parts else parts[0] if len(parts) == 1 else sum(parts[1:], parts[0])
        gates_backward_(act, c, tanh_c, dh, dc_new, dact, dc)


#: The twin of the meta-training kernels (it has no state).
AUTOGRAD = Autograd()


def mlp_update(entries: list, coef: tuple[float, ...], first: Tensor, hidden: Tensor, last: Tensor) -> None:
    r"""The twin of :meth:`l2o.kernels.MLPKernel.update` (same arguments and contract): one step of
    :class:`l2o.MLPRule` on whole tensors, the accumulators updated in place and each update
    written to its ``u`` (the math of :mod:`l2o.rules.mlp`)."""
    w1, w2, w3, beta_v, w_v, w_f, ib1, ib2, ib3, ibv, ibf, sq, eps, lr, log_lr, residual, ratio = coef
    F, H = NUM_FEATURES, first.shape[1]
    for (I, n, R, C, factored, rank), (g, p, m1, m2, m3, v, r, c, u) in entries:
        g = g.reshape(I, n).clamp(-GRAD_CLIP, GRAD_CLIP)
        p, v = p.reshape(I, n), v.view(I, n)
        ms = [m.view(I, n) for m in (m1, m2, m3)]
        for m, w in zip(ms, (w1, w2, w3)):
            m.lerp_(g, w)
        v.mul_(beta_v).addcmul_(g, g, value=w_v)
        sums = torch.stack([(x * x).sum(-1) for x in (g, p, *ms)] + [v.sum(-1)], dim=-1)
        mean = sums * (1.0 / max(n, 1))
        s = torch.rsqrt(torch.cat((mean[:, :5], (mean[:, 5:] + TINY) * ibv), dim=1) + TINY).unsqueeze(-1)
        sigma = torch.sqrt(v + TINY) * sq
        inv = torch.reciprocal(sigma + eps)
        adam = ms[0] * inv
        fac_g, fac_m = g * inv, adam * ib1
        if factored:
            g2 = (g * g).view(I, R, C)
            r2, c2 = r.view(I, R), c.view(I, C)
            r2.lerp_(g2.sum(-1) * (1.0 / max(C, 1)), w_f)
            c2.lerp_(g2.sum(-2) * (1.0 / max(R, 1)), w_f)
            alpha = torch.rsqrt(r2 / (r2.sum(-1, keepdim=True) * (1.0 / max(R, 1)) + TINY) + TINY)
            gamma = torch.reciprocal(torch.sqrt(c2 * ibf + TINY) + eps)
            rho = (alpha.unsqueeze(-1) * gamma.unsqueeze(-2)).reshape(I, n)
            fac_g, fac_m = g * rho, ms[0] * rho * ib1
        rows = [g * s[:, 0], p * s[:, 1], ms[0] * s[:, 2], ms[1] * s[:, 3], ms[2] * s[:, 4], sigma * s[:, 5],
                adam * ib1, ms[1] * inv * ib2, ms[2] * inv * ib3, g * inv, fac_g, fac_m]
        x = torch.stack(rows, dim=1).clamp(-FEATURE_CLIP, FEATURE_CLIP)  # (I, F, n)
        h = torch.relu(torch.matmul(first[rank, :, :F], x) + first[rank, :, F:])
        for w in hidden:
            h = torch.relu(torch.matmul(w[:, :H], h) + w[:, H:])
        out = torch.matmul(last[:, :H], h) + last[:, H:]
        direction, magnitude = out[:, 0], out[:, 1]
        if residual:
            direction = direction + adam * ib1
        step = torch.exp(magnitude.clamp(-MAGNITUDE_CLIP, MAGNITUDE_CLIP) + log_lr) * direction * -lr
        if ratio > 0.0:
            limit = (ratio * lr * math.exp(log_lr)) * torch.sqrt((adam * ib1).square().mean(-1, keepdim=True) + TINY)
            rms = step.square().mean(-1, keepdim=True).sqrt()
            step = step * torch.where(rms > limit, limit / rms, torch.ones_like(rms))
        u.view(I, n).copy_(step)
