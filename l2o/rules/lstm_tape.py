r"""The LSTM rule's tape: a truncation of first-order meta-training in the compiled kernel.

:meth:`l2o.LSTMRule.tape` returns an :class:`LSTMTape` (the :class:`~l2o.rules.base.RuleTape`
contract) when the compiled kernels serve the rule (float32 on the CPU). Each :meth:`LSTMTape.step`
runs one step of all layers and the output layer on all coordinates in one kernel call, keeping
the activations in the tape (``l2o/kernels/lstm_tape.c``); :meth:`LSTMTape.backward` is one call
for the whole truncation: given the gradients :math:`\partial\mathcal L/\partial u_s` at the
updates :math:`u_s = s_{\text{out}}\, \text{raw}_s - \sum_r \eta_r d_{r,s}` (output scale, and the
residual steps of step sizes :math:`\eta_r = e^{\log\eta_r}` along directions :math:`d_{r,s}` that
do not depend on :math:`\Phi`), it returns

.. math:: \frac{\partial\mathcal L}{\partial\Phi_{\text{LSTM}}} = s_{\text{out}} \sum_s
          \Big(\frac{\partial\,\text{raw}_s}{\partial\Phi}\Big)^{\!\top}\frac{\partial\mathcal L}{\partial u_s},
          \qquad
          \frac{\partial\mathcal L}{\partial\log\eta_r} = -\eta_r \sum_s
          \Big\langle \frac{\partial\mathcal L}{\partial u_s}, d_{r,s}\Big\rangle.

The same numbers as differentiating :meth:`~l2o.LSTMRule.update` step by step (up to float32
rounding), without a graph, per-step buffers or autograd nodes.
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .. import kernels
from ..tree import Params, flatten, split_like

__all__ = ["LSTMTape", "tape_supported"]

# Tape memory of finished backwards, reused by the next truncation: a tape of a meta-training
# epoch is tens of MB, and allocating it afresh costs a page fault per 4 KB on every truncation.
_POOL: list[Tensor] = []
_POOL_SIZE = 2
_pool_lock = threading.Lock()


def _take_buffer() -> Tensor | None:
    with _pool_lock:
        return _POOL.pop() if _POOL else None


def _give_buffer(buffer: Tensor) -> None:
    with _pool_lock:
        if len(_POOL) < _POOL_SIZE:
            _POOL.append(buffer)


class LSTMTape:
    """A truncation of ``steps`` inner steps of ``rule`` (an :class:`~l2o.LSTMRule`) from ``state`` (its
    ``LSTMState``; see the module docstring).

    Made by :meth:`l2o.LSTMRule.tape`, which checks the arguments; the rule's weights are read once,
    here, so they must not change until :meth:`backward` has run.
    """

    def __init__(self, rule: nn.Module, state: Any, steps: int, n: int) -> None:
        self.rule, self.steps, self.n = rule, steps, n
        self.state_type = type(state)  # LSTMState, named without importing l2o.rules.lstm (which imports this)
        features = rule.weights[0].shape[1] - rule.hidden_size
        kernel = kernels.lstm_tape(steps, features, rule.hidden_size, rule.num_layers, n, buffer=_take_buffer())
        if kernel is None:  # pragma: no cover - LSTMRule.tape checks availability first
            raise RuntimeError("the compiled LSTM kernels are not available")
        self.kernel = kernel
        with torch.no_grad():
            self.weight = torch.cat([w.detach().reshape(-1) for w in rule.weights])
            self.bias = torch.cat([b.detach() for b in rule.biases])
            self.out_w = rule.out_weight.detach().reshape(-1).contiguous()
            self.out_b = float(rule.out_bias.detach())
            kernel.start(torch.stack(state.hidden), torch.stack(state.cell))
        self.moments, self.velocity = state.moments, state.velocity
        self.done = 0
        self.log_lrs: list[Tensor] = []  # the residual steps' log step sizes, as rule._residuals lists them
        self.directions: list[list[Tensor]] = []  # per step, their directions

    @property
    def meta_params(self) -> tuple[Tensor, ...]:
        """The LSTM's weights, biases, output layer and the residual steps' log step sizes."""
        rule = self.rule
        return (*rule.weights, *rule.biases, rule.out_weight, rule.out_bias, *self.log_lrs)

    @torch.no_grad()
    def step(self, grads: Params, params: Params, *, step: int, loss: Tensor | None = None) -> Params:
        """The updates of the next step (the rule's :meth:`~l2o.LSTMRule.update`, without a graph)."""
        if self.done == self.steps:
            raise RuntimeError(f"this tape holds {self.steps} steps; all have been taken")
        rule = self.rule
        flat = flatten(grads).to(torch.float32)
        if flat.shape[0] != self.n:
            raise ValueError(f"the tape runs {self.n} coordinates but the grads have {flat.shape[0]}")
        x, self.moments, self.velocity = rule._features(flat, self.moments, self.velocity, step)
        self.done += 1
        u = self.kernel.forward(self.done, x.contiguous(), self.weight, self.bias, self.out_w, self.out_b)
        u.mul_(rule.output_scale)
        residuals = rule._residuals(x, self.moments, self.velocity, flat, step)
        for log_lr, direction in residuals:
            u.sub_(direction, alpha=float(log_lr.exp()))
        self.log_lrs = [log_lr for log_lr, _ in residuals]
        self.directions.append([d for _, d in residuals])
        return split_like(u, params)

    def state(self) -> Any:
        """The rule state (an :class:`~l2o.rules.lstm.LSTMState`) after the steps taken so far (no graph)."""
        h, c = self.kernel.state(self.done)
        return self.state_type(tuple(h.unbind(0)), tuple(c.unbind(0)), self.moments, self.velocity)

    def backward(self, du: Tensor) -> Sequence[Tensor | None]:
        """The gradients of :attr:`meta_params` given ``du (steps, N)``, the gradient at every update."""
        if self.done != self.steps:
            raise RuntimeError(f"the tape's backward needs all {self.steps} steps; {self.done} were taken")
        rule, H = self.rule, self.rule.hidden_size
        du = du.to(torch.float32).contiguous()
        dw, db, dout_w, dout_b = self.kernel.backward(du * rule.output_scale, self.weight, self.out_w)
        _give_buffer(self.kernel.buffer)
        del self.kernel
        grads: list[Tensor | None] = [g.view(w.shape) for g, w in zip(dw.split([w.numel() for w in rule.weights]),
                                                                     rule.weights)]
        grads.extend(db.split(4 * H))
        grads += [dout_w.view(1, H), dout_b]
        for r, log_lr in enumerate(self.log_lrs):
            total = sum(torch.dot(du[s], d[r]) for s, d in enumerate(self.directions))
            grads.append(-log_lr.detach().exp() * total)
        return grads


def tape_supported(rule: nn.Module, state: Any, params: Params) -> bool:
    """Whether :class:`LSTMTape` can run ``rule`` from ``state``: fused float32 CPU weights and state,
    no state tensor carrying a graph, and the compiled kernels available."""
    tensors = [*state.hidden, *state.cell, *state.moments, *state.velocity]
    ref = rule.out_weight
    return (rule.fused and ref.dtype == torch.float32 and ref.device.type == "cpu"
            and all(t.dtype == torch.float32 and t.device.type == "cpu" and not t.requires_grad for t in tensors)
            and all(p.device.type == "cpu" for p in params.values())
            and kernels.is_available())
