"""A task in progress in a meta-training run (:class:`TaskSlot`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..tasks import Task
from ..inner import InnerState

__all__ = ["TaskSlot"]


@dataclass
class TaskSlot:
    """One task of the meta-batch and where its inner optimisation stands.

    ``index`` is its global task index (task ``s`` of round ``e``: ``e * tasks_per_step + s``), from
    which :func:`l2o.meta.schedules.task_generator` redraws the task and its ``generator``;
    ``generator`` draws its batches (and its ES/PES perturbations); ``inner`` is its inner state
    (for ES/PES, the positive particle's); ``extra`` is the estimator's own state of this task
    (PES: the negative particle's inner state and the accumulated perturbation), a dict of
    :class:`~l2o.inner.InnerState` and lists of tensors; ``fingerprint`` identifies the task in a
    training state (computed when first needed).
    """

    index: int
    task: Task
    generator: torch.Generator
    inner: InnerState
    extra: dict[str, Any] = field(default_factory=dict)
    fingerprint: str | None = None
