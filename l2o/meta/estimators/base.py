r"""The gradient-estimator contract: how one meta-step's meta-gradient is computed from the next
truncation of every task in progress.

An estimator runs the same engine (:func:`l2o.unroll.unroll`) and the same rule as every other;
it differs only in what it differentiates. For the truncation of ``steps`` inner steps of each of
this process's tasks, :meth:`Estimator.segment` adds :math:`\frac1T \hat g_s` to the ``.grad`` of
every meta-param (``T`` = ``tasks_per_step``, so the sum over all tasks of the meta-batch, over
all ranks, is the mean estimate) and returns the inner states that continue each task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch
from torch import Tensor

from ...rules.base import Rule
from ...inner import InnerState
from ..slots import TaskSlot

__all__ = ["Estimator", "SegmentContext", "SegmentResult"]


@dataclass(frozen=True)
class SegmentContext:
    """What every estimator reads: the rule, the meta-params (in a fixed order) and the run's
    settings of the meta-loss."""

    rule: Rule
    meta_params: Sequence[torch.nn.Parameter]
    tasks_per_step: int
    meta_split: str
    second_order: bool
    objective: str
    es_std: float
    compile: Any = None  # CompileOptions, or None for eager (MetaTrainConfig.compile)


@dataclass
class SegmentResult:
    """The truncation of this process's tasks: ``finite`` is False when any loss, gradient or
    meta-loss was NaN/Inf (the meta-step is then skipped); ``loss_sum`` sums each task's mean
    training loss over the truncation; ``states`` holds, per task, the ``(inner, extra)`` that
    continue it once the meta-step is taken."""

    finite: bool
    loss_sum: float
    states: list[tuple[InnerState, dict[str, Any]]]


class Estimator(Protocol):
    """A gradient estimator (see the module docstring)."""

    #: Its name in :data:`l2o.meta.config.ESTIMATORS`.
    name: str

    def start(self, slot: TaskSlot, meta_params: Sequence[Tensor]) -> dict[str, Any]:
        """The estimator's state of a task just drawn (``slot.inner`` at its first step)."""
        ...

    def segment(self, ctx: SegmentContext, slots: Sequence[TaskSlot], steps: int,
                weights: Sequence[float] | None) -> SegmentResult:
        """Run the next ``steps`` inner steps of every task, accumulating the meta-gradient."""
        ...
