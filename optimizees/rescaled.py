r"""Random per-coordinate rescaling of any task (Lv et al. 2017, "RNNprop", §4.2).

A learned rule meta-trained on one family sees one distribution of gradient scales and fails
where the scales differ (another activation, a later phase of training). Rescaling makes the
training distribution wider: each task draws a fixed scale per coordinate

.. math:: c_i = \exp(\epsilon_i),\quad \epsilon_i \sim \mathcal U[-k, k]

and the rule optimises :math:`\phi` with :math:`\tilde f(\phi) = f(c \odot \phi)`, started at
:math:`\phi_0 = \theta_0 / c`. The minimum is the same point in :math:`\theta = c\odot\phi`, but the
gradient :math:`\nabla_\phi \tilde f = c \odot \nabla_\theta f` and the curvature change by
factors up to :math:`e^{k}` and :math:`e^{2k}` per coordinate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from l2o.tasks import Task, TaskFamily
from l2o.tree import Params
from l2o.validation import is_number

__all__ = ["RescaledTask", "RescaledFamily", "MAX_LOG_SCALE"]

#: Largest accepted ``max_log_scale``: :math:`e^{2k}` (the curvature factor) stays below float32's maximum.
MAX_LOG_SCALE = 40.0


class RescaledTask:
    """``task`` seen through per-coordinate scales ``scales`` (same keys and shapes as its params)."""

    def __init__(self, task: Task, scales: Params) -> None:
        if not isinstance(task, Task):
            raise TypeError(f"task must be a task (with init, sample_batch and loss), got {type(task).__name__}")
        if not isinstance(scales, Mapping) or not scales or not all(isinstance(v, Tensor) for v in scales.values()):
            raise TypeError(f"scales must be a non-empty dict of tensors keyed like the task's params, got {scales!r}")
        self.task = task
        self.scales = scales

    def init(self, generator: torch.Generator) -> Params:
        params = self.task.init(generator)
        if params.keys() != self.scales.keys():
            raise ValueError(f"scales must have the keys of the task's params {sorted(params)}, got {sorted(self.scales)}")
        return {k: v / self.scales[k] for k, v in params.items()}

    def sample_batch(self, split: str, generator: torch.Generator) -> Any:
        return self.task.sample_batch(split, generator)

    def loss(self, params: Params, batch: Any) -> Tensor:
        return self.task.loss({k: v * self.scales[k] for k, v in params.items()}, batch)

    def original_params(self, params: Params) -> Params:
        """The wrapped task's params :math:`\\theta = c \\odot \\phi`."""
        return {k: v * self.scales[k] for k, v in params.items()}


class RescaledFamily:
    """Tasks of ``family``, each with fresh scales :math:`\\exp(\\mathcal U[-k, k])` per coordinate.

    Args:
        family: the family to wrap.
        max_log_scale: :math:`k`; scales range over :math:`[e^{-k}, e^{k}]` (e.g. ``k = 2``).
    """

    def __init__(self, family: TaskFamily, max_log_scale: float) -> None:
        if not callable(getattr(family, "sample", None)):
            raise TypeError(f"family must be a task family (with a sample(generator) method), got {type(family).__name__}")
        if not (is_number(max_log_scale) and math.isfinite(max_log_scale) and 0 < max_log_scale <= MAX_LOG_SCALE):
            raise ValueError(f"max_log_scale must be a number in (0, {MAX_LOG_SCALE}] (scales e^k and curvatures "
                             f"e^2k must stay finite in float32), got {max_log_scale!r}")
        self.family = family
        self.max_log_scale = float(max_log_scale)
        self.name = f"{getattr(family, 'name', 'task')}-rescaled"

    def sample(self, generator: torch.Generator, **kwargs: Any) -> RescaledTask:
        task = self.family.sample(generator, **kwargs)
        # the shapes come from an init drawn with a throw-away generator, so `generator` only
        # advances by the scales themselves
        template = task.init(torch.Generator().manual_seed(0))
        k = self.max_log_scale
        scales = {name: torch.exp((torch.rand(v.shape, generator=generator, dtype=v.dtype) * 2 - 1) * k).to(v.device)
                  for name, v in template.items()}
        return RescaledTask(task, scales)

    def config(self) -> dict[str, Any]:
        inner = self.family.config() if hasattr(self.family, "config") else {}
        return {**inner, "random_scaling": self.max_log_scale}
