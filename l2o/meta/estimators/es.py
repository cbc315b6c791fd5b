r"""Antithetic evolution strategies: truncated ES and persistent ES (PES, Vicol et al. 2021).

Both estimate the meta-gradient from meta-losses alone, with no backpropagation through the inner
steps, so they see through chaotic or very long unrolls where backpropagation explodes, and run
any rule (no differentiable update needed). For each task, a perturbation
:math:`\epsilon \sim \mathcal N(0, \sigma^2 I)` of the meta-params is drawn from the task's
generator and two *particles* run the truncation on the same batches, with :math:`\Phi + \epsilon`
and :math:`\Phi - \epsilon`, giving meta-losses :math:`\mathcal L^\pm` (the same weighted sum of
losses that truncated backpropagation differentiates).

**Truncated ES** (``"es"``): both particles start from the task's state, and

.. math:: \hat g = \frac{\mathcal L^+ - \mathcal L^-}{2\sigma^2}\,\epsilon ,

the gradient of the Gaussian-smoothed truncation loss; the task continues from the positive
particle's state. Like truncated backpropagation, it ignores how this truncation's meta-params
shaped the state it started from (biased towards short horizons).

**PES** (``"pes"``): each particle keeps its own inner state across the truncations of a task
(:math:`\Phi + \epsilon_j` in truncation :math:`j` for the positive one, :math:`\Phi - \epsilon_j`
for the negative one) and the task accumulates its perturbations :math:`\xi_k = \sum_{j \le k}
\epsilon_j`:

.. math:: \hat g_k = \frac{\mathcal L_k^+ - \mathcal L_k^-}{2\sigma^2}\,\xi_k .

Summed over the truncations of a horizon, :math:`\sum_k \hat g_k` is an unbiased estimate of the
gradient of the whole horizon's smoothed meta-loss
:math:`\mathbb E_\epsilon \sum_k \mathcal L_k(\Phi + \epsilon_1, \dots, \Phi + \epsilon_k)` (for a
fixed :math:`\Phi`), the truncations' effect on later ones included. ``tests/test_estimators.py``
checks this against the exact gradient of a full unroll.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from ...inner import InnerState, UnrollResult
from ...unroll import truncate, unroll
from ..slots import TaskSlot
from .base import SegmentContext, SegmentResult

__all__ = ["AntitheticES", "PersistentES"]


@contextmanager
def _perturbed(meta_params: Sequence[Tensor], noise: Sequence[Tensor], sign: float) -> Iterator[None]:
    """The meta-params moved by ``sign * noise`` in place, restored exactly afterwards."""
    saved = [p.detach().clone() for p in meta_params]
    with torch.no_grad():
        for p, e in zip(meta_params, noise):
            p.add_(e, alpha=sign)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(meta_params, saved):
                p.copy_(s)


class AntitheticES:
    """Truncated antithetic ES (see the module docstring)."""

    name = "es"
    #: Whether each particle keeps its own state and the perturbations accumulate (PES).
    persistent = False

    def start(self, slot: TaskSlot, meta_params: Sequence[Tensor]) -> dict[str, Any]:
        return {}

    def segment(self, ctx: SegmentContext, slots: Sequence[TaskSlot], steps: int,
                weights: Sequence[float] | None) -> SegmentResult:
        states, loss_sum = [], 0.0
        for slot in slots:
            noise = [torch.randn(p.shape, generator=slot.generator, dtype=p.dtype).to(p.device) * ctx.es_std
                     for p in ctx.meta_params]
            batches = slot.generator.get_state()  # both particles read the same batches
            pos = self._particle(ctx, slot, slot.inner, noise, +1.0, steps, weights)
            slot.generator.set_state(batches)
            neg = self._particle(ctx, slot, slot.extra.get("neg", slot.inner), noise, -1.0, steps, weights)
            if not (_finite(pos) and _finite(neg)):
                return SegmentResult(False, loss_sum, [])
            direction = [a + e for a, e in zip(slot.extra["noise"], noise)] if self.persistent else noise
            coef = (float(pos.meta_loss) - float(neg.meta_loss)) / (2.0 * ctx.es_std ** 2) / ctx.tasks_per_step
            for p, d in zip(ctx.meta_params, direction):
                # each task's term rounded on its own, then summed: the same float sums as the
                # all-reduce of a distributed run whose ranks each hold one task
                p.grad = d * coef if p.grad is None else p.grad + d * coef
            loss_sum += 0.5 * (float(pos.losses.double().mean()) + float(neg.losses.double().mean()))
            extra = {"neg": truncate(neg.inner), "noise": direction} if self.persistent else {}
            states.append((truncate(pos.inner), extra))
        return SegmentResult(True, loss_sum, states)

    @staticmethod
    def _particle(ctx: SegmentContext, slot: TaskSlot, inner: InnerState, noise: Sequence[Tensor], sign: float,
                  steps: int, weights: Sequence[float] | None) -> UnrollResult:
        with torch.no_grad(), _perturbed(ctx.meta_params, noise, sign):
            return unroll(ctx.rule, slot.task, inner, steps=steps, generator=slot.generator, weights=weights,
                          meta_split=ctx.meta_split, objective=ctx.objective, compile=ctx.compile or False)


class PersistentES(AntitheticES):
    """Persistent evolution strategies, PES (see the module docstring)."""

    name = "pes"
    persistent = True

    def start(self, slot: TaskSlot, meta_params: Sequence[Tensor]) -> dict[str, Any]:
        return {"neg": slot.inner, "noise": [torch.zeros_like(p.detach()) for p in meta_params]}


def _finite(result: UnrollResult) -> bool:
    return result.finite and bool(torch.isfinite(result.meta_loss))
