r"""Truncated backpropagation through time (the paper's estimator).

Each task's truncation is unrolled with the meta-params in the graph and its meta-loss
:math:`\mathcal L_s = \sum_t w_t \bar f(\theta_t)` backpropagated:
:math:`\hat g = \frac1T\sum_s \nabla_\Phi \mathcal L_s`. The inner state is then truncated, so no
gradient flows from one truncation into the previous ones: the estimate is biased towards
short-horizon behaviour (what ES/PES avoid), and has low variance.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from ...unroll import truncate, unroll
from ..slots import TaskSlot
from .base import SegmentContext, SegmentResult

__all__ = ["TruncatedBackprop"]


class TruncatedBackprop:
    """Truncated backpropagation (first or second order, see :func:`l2o.unroll.unroll`)."""

    name = "tbptt"

    def start(self, slot: TaskSlot, meta_params: Sequence[Tensor]) -> dict[str, Any]:
        return {}

    def segment(self, ctx: SegmentContext, slots: Sequence[TaskSlot], steps: int,
                weights: Sequence[float] | None) -> SegmentResult:
        states, loss_sum = [], 0.0
        for slot in slots:
            result = unroll(ctx.rule, slot.task, slot.inner, steps=steps, generator=slot.generator, weights=weights,
                            meta_split=ctx.meta_split, second_order=ctx.second_order, objective=ctx.objective,
                            tape=True, compile=ctx.compile or False)
            if not (result.finite and bool(torch.isfinite(result.meta_loss))):
                return SegmentResult(False, loss_sum, [])  # the meta-step is skipped: leave the other tasks
            (result.meta_loss / ctx.tasks_per_step).backward()
            loss_sum += float(result.losses.double().mean())
            states.append((truncate(result.inner), slot.extra))
        return SegmentResult(True, loss_sum, states)
