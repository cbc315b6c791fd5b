r"""The coordinate-wise LSTM rule of Andrychowicz et al. (2016).

Every coordinate :math:`i` of every optimizee tensor is one row of a batch; one small LSTM with
shared weights :math:`\Phi` runs on all rows at once, each row with its own hidden state:

.. math::
    x_t^i &= \operatorname{pre}(\nabla_i f(\theta_t)) \\
    (h^{i}_{t+1}, c^{i}_{t+1}) &= \operatorname{LSTM}_\Phi(x_t^i, h_t^i, c_t^i)
        \quad\text{(stacked, } L \text{ layers of } H \text{ units)}\\
    u_t^i &= s \cdot (w_{\text{out}}^\top h^{i,(L)}_{t+1} + b_{\text{out}}),
    \qquad \theta_{t+1}^i = \theta_t^i + u_t^i

with the output scale :math:`s` (paper: 1 on quadratics, 0.1 on MNIST). Each layer is the standard
LSTM cell with gates :math:`i, f, o = \sigma(\cdot)` and :math:`g = \tanh(\cdot)`:
:math:`c' = f \odot c + i \odot g`, :math:`h' = o \odot \tanh(c')`.

Because the weights are shared and rows never interact, the rule is separable per tensor and
equivariant to permuting coordinates.

Implementation: all state is stored feature-major, ``(H, N)``, so that every gate is a contiguous
block of memory, and one :class:`torch.autograd.Function` computes a whole step (all layers and the
output) with a hand-written backward; for float32 CPU state its gate math, forward and backward,
runs in the compiled kernel of :mod:`l2o.kernels` (one pass per layer each way), elsewhere in the
kernel's torch twin (:mod:`l2o.kernels.twin`, which writes the gate math once, with
:math:`\tanh(x) = 2\sigma(2x) - 1`: ``tanh`` is several times slower than ``sigmoid`` on CPU).
``fused=False`` selects a plain-autograd reference implementation of the same math with the
standard ``tanh`` (used by the tests, and twice differentiable).

:meth:`LSTMRule.update_` (what the drop-in optimizer calls) computes the same step without autograd,
overwriting the state in place and walking the coordinates in blocks of :data:`BLOCK_COLUMNS`, so
that a block's gate tensor stays in cache and nothing of the size of the whole gate tensor
(``4H x N``: 340 MB for a 1M-parameter model) is ever allocated. For float32 CPU state the gate
math after each block's matrix product runs in one pass of the compiled kernel of
:mod:`l2o.kernels` (the same math; its torch twin runs where it is unavailable, and under
:func:`torch.compile`, which can trace ``update_`` and ``update`` whole).

:meth:`LSTMRule.tape` (what first-order meta-training runs, through ``l2o.unroll(..., tape=True)``)
runs a whole truncation in the compiled tape kernel, without a graph per step; see
:mod:`l2o.rules.lstm_tape`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .. import kernels
from ..kernels import twin
from ..tree import Params, flatten, num_elements, split_like
from .base import (Rule, RuleTape, check_bool, check_hyperparameter, check_params, check_positive_int,
                   check_update_args)
from .lstm_tape import LSTMTape, tape_supported
from .preprocess import PREPROCESSORS, RNNPROP_BETAS, num_features, preprocess, rnnprop_inputs

__all__ = ["LSTMRule", "LSTMState", "MAX_PREPROCESS_P", "BLOCK_COLUMNS"]

#: Largest accepted ``preprocess_p``: :math:`e^p` must stay finite in float32.
MAX_PREPROCESS_P = 80.0

#: Coordinates per block of :meth:`LSTMRule.update_`. Measured on a 1M-parameter MLP (one thread,
#: ``benchmarks/speed_step.py``), ms per step by block size: 512: 478, 1024: 404, 2048: 350,
#: 8192: 322-337, 16384: 330, 32768: 450; whole tensors at once (``update``): 1212. Small blocks pay
#: the ~25 op dispatches per block; large ones fall out of cache (the gates of a block are
#: ``4H x block`` floats, 2.6 MB here, within L3).
BLOCK_COLUMNS = 8192


class LSTMState(NamedTuple):
    """Per-coordinate recurrent state: one ``(H, N)`` hidden and cell tensor per layer; with
    ``preprocess="rnnprop"`` the gradient's running moments ``(m, √v)``, each ``(N,)`` (else empty);
    with ``nesterov_lr`` the Nesterov residual's momentum buffer ``(b,)``, ``(N,)`` (else empty)."""

    hidden: tuple[Tensor, ...]
    cell: tuple[Tensor, ...]
    moments: tuple[Tensor, ...] = ()
    velocity: tuple[Tensor, ...] = ()


class _FusedLSTMStep(torch.autograd.Function):
    r"""One step of the stacked coordinate-wise LSTM and its output layer, hand-differentiated.

    Inputs: ``x (F, N)``, ``L`` hidden ``(H, N)``, ``L`` cell ``(H, N)``, ``L`` (weight, bias)
    pairs, output weight ``(1, H)`` and bias ``(1,)``. Outputs: ``u (N,)``, new hidden, new cell.

    Per layer: one product :math:`W [x; h]`, then one call of the gate math
    (:func:`l2o.kernels.lstm_autograd`'s compiled forward for float32 CPU tensors, else its torch
    twin, :data:`l2o.kernels.twin.AUTOGRAD`) that turns it into the activations (kept for the
    backward, with :math:`c` and :math:`\tanh(c')`) and writes the new state, a copy of
    :math:`h'` into the next layer's ``[x; h]`` and, on the top layer, the output. The backward,
    per layer from the top: one call gives the pre-activations' gradient ``dact`` and the old
    cell's (the gradient at :math:`h'` summed inside it from the layer above, the next step and
    the output layer), then :math:`dW = dact\,[x; h]^\top`, :math:`db = \sum_j dact`,
    :math:`d[x; h] = W^\top dact` (only the rows something needs).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, num_layers: int, *args: Tensor):
        hs, cs = args[:num_layers], args[num_layers:2 * num_layers]
        layer_params = args[2 * num_layers:4 * num_layers]
        out_w, out_b = args[4 * num_layers], args[4 * num_layers + 1]
        compiled = kernels.lstm_autograd(x, *args)
        ops = twin.AUTOGRAD if compiled is None else compiled
        L, (H, n) = num_layers, hs[0].shape
        new = dict(dtype=x.dtype, device=x.device)
        hs, cs = [h.contiguous() for h in hs], [c.contiguous() for c in cs]
        out_w = out_w.contiguous()
        u = torch.empty(n, **new)
        xh = torch.cat((x, hs[0]))
        new_h, new_c, saved = [], [], []
        for layer in range(L):
            act = torch.mm(layer_params[2 * layer], xh)
            c_new, h_new, tanh_c = (torch.empty(H, n, **new) for _ in range(3))
            saved += [xh, cs[layer], act, tanh_c]
            if layer + 1 < L:  # h' goes straight into the next layer's [x; h]
                xh = torch.empty(2 * H, n, **new)
                xh[H:].copy_(hs[layer + 1])
                ops.forward(act, layer_params[2 * layer + 1], cs[layer], c_new, h_new, tanh_c, h_copy=xh[:H])
            else:
                ops.forward(act, layer_params[2 * layer + 1], cs[layer], c_new, h_new, tanh_c, out=(u, out_w, out_b))
            new_h.append(h_new)
            new_c.append(c_new)
        ctx.ops, ctx.num_layers, ctx.hidden = ops, L, H
        ctx.set_materialize_grads(False)  # absent gradients stay None: the backward reads them as zero
        ctx.save_for_backward(new_h[-1], out_w, *layer_params[0::2], *saved)
        return (u, *new_h, *new_c)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, du: Tensor | None, *douts: Tensor | None):
        ops, L, H = ctx.ops, ctx.num_layers, ctx.hidden
        top, out_w, *rest = ctx.saved_tensors
        weights, saved = rest[:L], rest[L:]
        need = ctx.needs_input_grad  # (x, num_layers, *hs, *cs, *params, out_w, out_b)

        def contiguous(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.contiguous()

        du = contiguous(du)
        dh_out, dc_out = [contiguous(t) for t in douts[:L]], [contiguous(t) for t in douts[L:]]
        new = dict(dtype=top.dtype, device=top.device)
        n = top.shape[1]
        if du is None:
            d_out_w, d_out_b = torch.zeros_like(out_w), torch.zeros(1, **new)
        else:
            d_out_w, d_out_b = (du.unsqueeze(0) @ top.t()), du.sum(0, keepdim=True)
        d_hs: list[Tensor | None] = [None] * L
        d_cs: list[Tensor | None] = [None] * L
        d_params: list[Tensor | None] = [None] * (2 * L)
        dx = dh_above = None
        for layer in reversed(range(L)):
            xh, c, act, tanh_c = saved[4 * layer:4 * layer + 4]
            dact, dc = torch.empty(4 * H, n, **new), torch.empty(H, n, **new)
            last = layer == L - 1
            ops.backward(act, c, tanh_c, (dh_above, dh_out[layer]), du if last else None, out_w if last else None,
                         dc_out[layer], dact, dc)
            w = weights[layer]
            d_params[2 * layer], d_params[2 * layer + 1] = dact @ xh.t(), dact.sum(1)
            d_cs[layer] = dc
            n_in = w.shape[1] - H
            if layer > 0 or need[0]:
                dxh = w.t() @ dact
                d_hs[layer] = dxh[n_in:]
                if layer > 0:
                    dh_above = dxh[:n_in]
                else:
                    dx = dxh[:n_in]
            elif need[2]:  # only the old hidden state's gradient: skip the input rows' product
                d_hs[layer] = w[:, n_in:].t() @ dact
        return (dx, None, *d_hs, *d_cs, *d_params, d_out_w, d_out_b)


def _blocked_step_(x: Tensor, hs: Sequence[Tensor], cs: Sequence[Tensor], weights: Sequence[Tensor],
                    biases: Sequence[Tensor], out_w: Tensor, out_b: Tensor, block: int, use_kernel: bool = True) -> Tensor:
    r"""The forward of :class:`_FusedLSTMStep` without autograd, in place and block by block.

    Overwrites ``hs`` and ``cs`` (each ``(H, N)``) with the new state and returns the raw output
    ``u (N,)``. Per block of columns and layer: ``[x; h]`` is gathered in one buffer, one ``addmm``
    gives the gates (cell rows of the weights doubled), and one ``cell`` call does the rest: the
    compiled :func:`l2o.kernels.lstm_cell` (``use_kernel`` and float32 CPU tensors, when it is
    available) or its torch twin :func:`l2o.kernels.twin.lstm_cell`. Every intermediate lives in
    buffers allocated once.
    """
    features, n = x.shape
    hidden = hs[0].shape[0]
    doubled = torch.ones(4 * hidden, 1, dtype=out_w.dtype, device=out_w.device)
    doubled[3 * hidden:] = 2.0
    ws = [w.detach() * doubled for w in weights]
    bs = [b.detach().unsqueeze(1) * doubled for b in biases]
    ow, ob = out_w.detach(), out_b.detach().unsqueeze(1)
    width = max(1, min(block, n))
    new = dict(dtype=out_w.dtype, device=out_w.device)
    xh_bufs = [torch.empty(w.shape[1] * width, **new) for w in ws]
    gate_buf = torch.empty(4 * hidden * width, **new)
    u = torch.empty(1, n, **new)
    cell = kernels.lstm_cell(gate_buf.view(4 * hidden, width), *hs, *cs, u, ow) if use_kernel else None
    if cell is None:
        cell = twin.lstm_cell(torch.empty(hidden * width, **new))
    # every block's views made by one split per tensor (not sliced per block and layer)
    columns = [x.split(block, 1), *(t.split(block, 1) for t in hs), *(t.split(block, 1) for t in cs), u.split(block, 1)]
    L = len(hs)
    for views in zip(*columns):
        m = views[0].shape[1]
        xhs = [buf[: w.shape[1] * m].view(w.shape[1], m) for buf, w in zip(xh_bufs, ws)]  # contiguous, also for the last block
        xhs[0][:features].copy_(views[0])
        for layer, (ws_l, bs_l, xh) in enumerate(zip(ws, bs, xhs)):
            h, c = views[1 + layer], views[1 + L + layer]
            xh[xh.shape[0] - hidden:].copy_(h)
            s = torch.addmm(bs_l, ws_l, xh, out=gate_buf[: 4 * hidden * m].view(4 * hidden, m))
            if layer + 1 < L:  # the new h goes straight into the next layer's [x; h] buffer
                cell(s, c, h, xhs[layer + 1][:hidden])
            else:
                cell(s, c, h, out=(views[-1], ow, ob))
    return u[0]


def _reference_step(x: Tensor, hs: Sequence[Tensor], cs: Sequence[Tensor], layer_params: Sequence[Tensor],
                    out_w: Tensor, out_b: Tensor):
    """Plain-autograd version of :class:`_FusedLSTMStep` (same math, standard tanh)."""
    hidden = hs[0].shape[0]
    new_h, new_c = [], []
    inp = x
    for layer, (h, c) in enumerate(zip(hs, cs)):
        gates = layer_params[2 * layer] @ torch.cat((inp, h)) + layer_params[2 * layer + 1].unsqueeze(1)
        i, f, o = (torch.sigmoid(gates[k * hidden:(k + 1) * hidden]) for k in range(3))
        g = torch.tanh(gates[3 * hidden:])
        c = f * c + i * g
        h = o * torch.tanh(c)
        new_h.append(h)
        new_c.append(c)
        inp = h
    u = (out_w @ inp + out_b.unsqueeze(1)).squeeze(0)
    return (u, *new_h, *new_c)


class LSTMRule(Rule):
    r"""Coordinate-wise LSTM update rule (learned; its weights are the meta-params Φ).

    Args:
        hidden_size: units per layer :math:`H` (paper: 20).
        num_layers: stacked LSTM layers :math:`L` (paper: 2).
        preprocess: the inputs :math:`\operatorname{pre}`: ``"none"`` (paper, quadratics),
            ``"log_sign"`` (paper, App. A) or ``"rnnprop"`` (Adam-normalised gradient and
            momentum, Lv et al. 2017; see :mod:`l2o.rules.preprocess`).
        preprocess_p: the :math:`p` of ``log_sign`` (paper: 10), in :math:`(0, 80]`.
        output_scale: :math:`s` multiplying the output layer (paper: 1 on quadratics, 0.1 on MNIST).
        zero_init_output: start with a zero output layer, so the untrained rule proposes no update.
        fused: use the hand-differentiated fused step (fast) or the plain-autograd reference.
        adam_lr: with ``preprocess="rnnprop"``, add an Adam step to the LSTM's output,
            :math:`u_t \mathrel{+}= -\eta\, \hat m_t / (\sqrt{\hat v_t} + \epsilon)`, whose step
            size :math:`\eta` (initialised to ``adam_lr``, learned as :math:`\log\eta`) is a
            meta-param. With ``zero_init_output`` the untrained rule is Adam (with the ``rnnprop``
            moments' ``rnnprop_betas``, by default 0.95 and 0.95), and meta-training learns its
            step size and corrections to it (a residual learned optimizer).
        momentum_lr: with ``preprocess="rnnprop"``, add a momentum step,
            :math:`u_t \mathrel{+}= -\eta_m \hat m_t` with :math:`\hat m_t = m_t / (1 - \beta_1^t)`
            the bias-corrected running mean of the gradient (β1 of ``rnnprop_betas``, by default
            0.95), i.e. SGD with momentum; :math:`\eta_m` (initialised to ``momentum_lr``) is
            learned as :math:`\log\eta_m`. With ``zero_init_output`` the untrained rule is momentum
            SGD and meta-training learns corrections to it. Not invariant to the gradient's scale, unlike the rest of the rule.
        nesterov_lr: with any inputs, add a Nesterov momentum step (``torch.optim.SGD(nesterov=True)``)
            with its own buffer :math:`b_t = \mu b_{t-1} + g_t` (:math:`b_{-1} = 0`):
            :math:`u_t \mathrel{+}= -\eta_n (g_t + \mu b_t)`, its step size :math:`\eta_n`
            (initialised to ``nesterov_lr``) learned as :math:`\log\eta_n`. With
            ``zero_init_output`` the untrained rule is exactly NAG at that learning rate, and
            meta-training learns its step size and the LSTM's corrections to it.
        nesterov_momentum: the :math:`\mu \in [0, 1)` of ``nesterov_lr`` (default 0.9, fixed).
        rnnprop_betas: the moment decay rates :math:`(\beta_1, \beta_2)` of the ``rnnprop`` inputs
            (and so of the Adam and momentum residuals), each in :math:`[0, 1)`; default RNNprop's
            (0.95, 0.95). ``(0.9, 0.999)`` with ``adam_lr`` and ``zero_init_output`` makes the
            untrained rule exactly ``torch.optim.Adam`` at ``lr=adam_lr`` (its default betas).

    Weights follow ``nn.LSTM``'s initialisation, :math:`\mathcal U(-1/\sqrt H, 1/\sqrt H)`, with
    the forget-gate bias set to 1. Gate order in each ``weight_l`` is (input, forget, output, cell).
    """

    name = "lstm"
    adam_lr: float | None
    momentum_lr: float | None
    nesterov_lr: float | None

    def __init__(self, hidden_size: int = 20, num_layers: int = 2, preprocess: str = "none",
                 preprocess_p: float = 10.0, output_scale: float = 1.0, zero_init_output: bool = False,
                 fused: bool = True, adam_lr: float | None = None, momentum_lr: float | None = None,
                 nesterov_lr: float | None = None, nesterov_momentum: float = 0.9,
                 rnnprop_betas: Sequence[float] = RNNPROP_BETAS) -> None:
        super().__init__()
        check_positive_int("hidden_size", hidden_size)
        check_positive_int("num_layers", num_layers)
        if not isinstance(preprocess, str) or preprocess not in PREPROCESSORS:
            raise ValueError(f"unknown preprocess {preprocess!r}; choose one of {', '.join(PREPROCESSORS)}")
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.preprocess = preprocess
        # e^p scales the small-gradient branch of log_sign: beyond ~88 it overflows float32 (and 0 * inf = NaN)
        self.preprocess_p = check_hyperparameter("preprocess_p", preprocess_p, low=0.0, high=MAX_PREPROCESS_P,
                                                 low_inclusive=False)
        self.output_scale = check_hyperparameter("output_scale", output_scale, low=0.0, low_inclusive=False)
        self.zero_init_output = check_bool("zero_init_output", zero_init_output)
        self.fused = check_bool("fused", fused)
        # residual steps; their log step sizes are meta-params. Adam and momentum read the rnnprop
        # moments (the reason is named when they are missing); Nesterov keeps its own buffer.
        for name, value, needs_rnnprop in (("adam_lr", adam_lr, "the Adam direction is its first input"),
                                           ("momentum_lr", momentum_lr, "the momentum is its running mean of the gradient"),
                                           ("nesterov_lr", nesterov_lr, None)):
            if value is not None:
                if needs_rnnprop and preprocess != "rnnprop":
                    raise ValueError(f"{name} needs preprocess='rnnprop' ({needs_rnnprop}), got preprocess={preprocess!r}")
                value = check_hyperparameter(name, value, low=0.0, low_inclusive=False)
                setattr(self, f"log_{name}", nn.Parameter(torch.tensor(math.log(value))))
            setattr(self, name, value)
        self.nesterov_momentum = check_hyperparameter("nesterov_momentum", nesterov_momentum, low=0.0, high=1.0,
                                                      high_inclusive=False)
        if not isinstance(rnnprop_betas, (tuple, list)) or len(rnnprop_betas) != 2:
            raise TypeError(f"rnnprop_betas must be a pair (beta1, beta2), got {rnnprop_betas!r}")
        self.rnnprop_betas = tuple(check_hyperparameter(f"rnnprop_betas[{i}]", b, low=0.0, high=1.0, high_inclusive=False)
                                   for i, b in enumerate(rnnprop_betas))
        if self.rnnprop_betas != RNNPROP_BETAS and preprocess != "rnnprop":
            raise ValueError(f"rnnprop_betas are the moment rates of preprocess='rnnprop', got preprocess={preprocess!r}")
        in_features = num_features(preprocess)
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for layer in range(num_layers):
            n_in = (in_features if layer == 0 else hidden_size) + hidden_size
            self.weights.append(nn.Parameter(torch.empty(4 * hidden_size, n_in)))
            self.biases.append(nn.Parameter(torch.empty(4 * hidden_size)))
        self.out_weight = nn.Parameter(torch.empty(1, hidden_size))
        self.out_bias = nn.Parameter(torch.empty(1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise Φ (uniform in ±1/√H, forget bias 1, optional zero output layer)."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        H = self.hidden_size
        with torch.no_grad():
            for w, b in zip(self.weights, self.biases):
                w.uniform_(-bound, bound)
                b.uniform_(-bound, bound)
                b[H:2 * H].fill_(1.0)
            if self.zero_init_output:
                self.out_weight.zero_()
                self.out_bias.zero_()
            else:
                self.out_weight.uniform_(-bound, bound)
                self.out_bias.uniform_(-bound, bound)

    def config(self) -> dict[str, Any]:
        return {
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "preprocess": self.preprocess,
            "preprocess_p": self.preprocess_p,
            "output_scale": self.output_scale,
            "zero_init_output": self.zero_init_output,
            "fused": self.fused,
            **({} if self.adam_lr is None else {"adam_lr": self.adam_lr}),  # older checkpoints have no key
            **({} if self.momentum_lr is None else {"momentum_lr": self.momentum_lr}),
            **({} if self.nesterov_lr is None else {"nesterov_lr": self.nesterov_lr,
                                                     "nesterov_momentum": self.nesterov_momentum}),
            **({} if self.rnnprop_betas == RNNPROP_BETAS else {"rnnprop_betas": list(self.rnnprop_betas)}),
        }

    def init(self, params: Params) -> LSTMState:
        """Zero hidden and cell states, ``(H, N)`` per layer, ``N`` = coordinates in ``params``."""
        check_params(params, rule="LSTMRule")
        n = num_elements(params)
        ref = self.out_weight
        zeros = tuple(torch.zeros(self.hidden_size, n, dtype=ref.dtype, device=ref.device)
                      for _ in range(2 * self.num_layers))
        moments: tuple[Tensor, ...] = ()
        if self.preprocess == "rnnprop":
            moments = (torch.zeros(n, dtype=ref.dtype, device=ref.device), torch.zeros(n, dtype=ref.dtype, device=ref.device))
        velocity = () if self.nesterov_lr is None else (torch.zeros(n, dtype=ref.dtype, device=ref.device),)
        return LSTMState(zeros[: self.num_layers], zeros[self.num_layers:], moments, velocity)

    def _check_state(self, state: Any, n: int, what: str) -> None:
        """``state`` must be an :class:`LSTMState` of this rule's layers and hidden size, for the
        ``n`` coordinates of ``what`` (named in the error)."""
        if not isinstance(state, LSTMState):
            raise TypeError(f"LSTMRule.update: state must be the LSTMState that rule.init(params) returned, "
                            f"got {type(state).__name__}")
        L, H = self.num_layers, self.hidden_size
        layers = [*state.hidden, *state.cell]
        if (len(state.hidden) != L or len(state.cell) != L
                or not all(isinstance(t, Tensor) and t.dim() == 2 and t.shape[0] == H for t in layers)
                or len({t.shape[1] for t in layers}) != 1):
            shapes = [tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in layers]
            raise ValueError(f"LSTMRule.update: state does not fit this rule ({L} layers of {H} units): hidden and "
                             f"cell have shapes {shapes}; call rule.init(params) with this rule")
        if self.preprocess == "rnnprop" and (len(state.moments) != 2 or not all(
                isinstance(t, Tensor) and t.shape == (layers[0].shape[1],) for t in state.moments)):
            raise ValueError("LSTMRule.update: preprocess='rnnprop' needs the gradient moments in state.moments; "
                             "call rule.init(params) with this rule")
        if (self.nesterov_lr is not None) != bool(state.velocity) or (state.velocity and not (
                len(state.velocity) == 1 and isinstance(state.velocity[0], Tensor)
                and state.velocity[0].shape == (layers[0].shape[1],))):
            raise ValueError("LSTMRule.update: state.velocity must hold the Nesterov buffer exactly when the rule has "
                             "nesterov_lr; call rule.init(params) with this rule")
        if layers[0].shape[1] != n:
            raise ValueError(f"LSTM state has {layers[0].shape[1]} coordinates but the {what} have {n}: "
                             "call rule.init(params) for these params")

    def _inputs(self, grads: Params, state: LSTMState, params: Params,
                step: int) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...], Tensor]:
        """Checked arguments -> the preprocessed inputs ``x (F, N)``, the new moments, the new
        Nesterov buffer and the flat gradient."""
        check_update_args(grads, params, step, rule="LSTMRule")
        if not params:
            raise ValueError("LSTMRule.update: params is empty; pass at least one tensor")
        flat = flatten(grads).to(self.out_weight.dtype)
        self._check_state(state, flat.shape[0], "grads")
        return (*self._features(flat, state.moments, state.velocity, step), flat)

    def _features(self, flat: Tensor, moments: tuple[Tensor, ...], velocity: tuple[Tensor, ...],
                  step: int) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
        """The flat gradient -> the inputs ``x (F, N)``, the new moments and Nesterov buffer."""
        if velocity:  # b_t = mu b_{t-1} + g_t
            velocity = (velocity[0] * self.nesterov_momentum + flat,)
        if self.preprocess == "rnnprop":
            x, m, v = rnnprop_inputs(flat, moments[0], moments[1], step, self.rnnprop_betas)
            return x, (m, v), velocity
        return preprocess(flat, self.preprocess, self.preprocess_p), moments, velocity

    def _residuals(self, x: Tensor, moments: tuple[Tensor, ...], velocity: tuple[Tensor, ...], grad: Tensor,
                   step: int) -> list[tuple[Tensor, Tensor]]:
        r"""``(log step size, direction d)`` of each residual step, :math:`u \mathrel{-}= e^{\log\eta} d`."""
        out = []
        if self.adam_lr is not None:  # the Adam residual: -eta * m_hat / (sqrt(v_hat) + eps)
            out.append((self.log_adam_lr, x[0]))
        if self.momentum_lr is not None:  # the momentum residual: -eta_m * m_hat
            out.append((self.log_momentum_lr, moments[0] / (1.0 - self.rnnprop_betas[0] ** (step + 1))))
        if velocity:  # the Nesterov residual: -eta_n * (g + mu * b)
            out.append((self.log_nesterov_lr, grad + self.nesterov_momentum * velocity[0]))
        return out

    def _updates(self, raw: Tensor, x: Tensor, params: Params, moments: tuple[Tensor, ...],
                 velocity: tuple[Tensor, ...], grad: Tensor, step: int) -> Params:
        """Scale the LSTM output (and add the residuals), then cut it into ``params``' shapes."""
        u = raw * self.output_scale
        for log_lr, direction in self._residuals(x, moments, velocity, grad, step):
            u = u - log_lr.exp() * direction
        return split_like(u, params)

    def check_update(self, grads: Params, state: LSTMState, params: Params, *, step: int) -> None:
        """What :meth:`update` checks (see :meth:`l2o.Rule.check_update`)."""
        check_update_args(grads, params, step, rule="LSTMRule")
        if not params:
            raise ValueError("LSTMRule.update: params is empty; pass at least one tensor")
        self._check_state(state, num_elements(grads), "grads")

    def update_unchecked(self, grads: Params, state: LSTMState, params: Params, *, step: int,
                         loss: Tensor | None = None) -> tuple[Params, LSTMState]:
        """:meth:`update` without the argument checks. Under :func:`torch.compile` a ``fused`` rule
        takes its step through the plain-autograd reference (the same math; the hand-written
        backward's buffers written with ``out=`` are not traceable)."""
        flat = flatten(grads).to(self.out_weight.dtype)
        x, moments, velocity = self._features(flat, state.moments, state.velocity, step)
        grad = flat
        layer_params = [t for pair in zip(self.weights, self.biases) for t in pair]
        if self.fused and not torch.compiler.is_compiling():
            out = _FusedLSTMStep.apply(x, self.num_layers, *state.hidden, *state.cell, *layer_params,
                                       self.out_weight, self.out_bias)
        else:
            out = _reference_step(x, state.hidden, state.cell, layer_params, self.out_weight, self.out_bias)
        L = self.num_layers
        new_state = LSTMState(tuple(out[1:1 + L]), tuple(out[1 + L:1 + 2 * L]), moments, velocity)
        return self._updates(out[0], x, params, moments, velocity, grad, step), new_state

    def tape(self, params: Params, state: LSTMState, steps: int) -> RuleTape | None:
        """A :class:`~l2o.rules.lstm_tape.LSTMTape` for ``steps`` first-order steps (one kernel call per
        step, one for the truncation's backward), or ``None`` where the compiled kernels do not
        serve this rule and state: ``fused=False``, not float32 on the CPU, a state carrying a
        graph, or no kernels (see :mod:`l2o.kernels`)."""
        check_params(params, rule="LSTMRule")
        check_positive_int("steps", steps)
        n = num_elements(params)
        self._check_state(state, n, "params")
        if not tape_supported(self, state, params):
            return None
        return LSTMTape(self, state, steps, n)

    @torch.no_grad()
    def update_(self, grads: Params, state: LSTMState, params: Params, *, step: int,
                loss: Tensor | None = None) -> tuple[Params, LSTMState]:
        """:meth:`update` without autograd, overwriting ``state``'s hidden and cell tensors.

        The same math (equal up to float rounding), computed block by block over the coordinates
        (:data:`BLOCK_COLUMNS`) with buffers allocated once per call: on a 1M-parameter MLP this is
        several times faster than :meth:`update` and allocates no ``4H x N`` gate tensor; with
        float32 CPU state, the compiled cell kernel (:mod:`l2o.kernels`) makes it another 1.4x
        faster. State tensors must have the rule's dtype and device (as ``init`` makes them).
        """
        x, moments, velocity, grad = self._inputs(grads, state, params, step)
        for t in (*state.hidden, *state.cell):
            if t.dtype != self.out_weight.dtype or t.device != self.out_weight.device:
                raise ValueError(f"LSTMRule.update_: state tensors are {t.dtype} on {t.device} but the rule is "
                                 f"{self.out_weight.dtype} on {self.out_weight.device}; convert the state (or use update)")
        raw = _blocked_step_(x, state.hidden, state.cell, list(self.weights), list(self.biases), self.out_weight,
                             self.out_bias, BLOCK_COLUMNS)
        return (self._updates(raw, x, params, moments, velocity, grad, step),
                LSTMState(state.hidden, state.cell, moments, velocity))
