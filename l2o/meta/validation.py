r"""Validation of a rule during meta-training: the meta-objective on fixed held-out tasks, without
gradients (the paper's early stopping keeps the best validated weights)."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from ..rules.base import Rule
from ..tasks import Task
from ..tree import Params
from ..unroll import init_inner, unroll
from .distributed import Distributed

__all__ = ["validation_loss", "distributed_validation", "start_params"]


@torch.no_grad()
def validation_loss(rule: Rule, tasks: list[Task], horizon: int, seed: int, *, init: torch.nn.Module | None = None,
                    final_split: str | None = None, weights: Sequence[float] | None = None) -> float:
    r"""The meta-objective on validation tasks, without gradients.

    By default the mean over tasks and inner steps 1..horizon of the training loss (the paper's
    objective); with ``weights`` (one per inner step, e.g. the trainer's ``"linear"`` step
    weights) the weighted mean :math:`\sum_t w_t f_t / \sum_t w_t` instead. With ``final_split``
    (``"train"`` or ``"meta"``), the mean loss of the final params on that split instead (MAML:
    the query loss after adaptation). ``init`` starts every task from learned initial params (see
    :func:`start_params`). Task ``k`` draws its batches from ``seed + k``. Non-finite results count
    as ``inf`` so a diverging rule is never selected.
    """
    w = _check_weights(weights, horizon)
    total = 0.0
    for k, task in enumerate(tasks):
        value = _validation_value(rule, task, horizon, seed + k, init=init, final_split=final_split, weights=w)
        if not math.isfinite(value):
            return math.inf
        total += value
    return total / len(tasks)


def distributed_validation(dist: Distributed, rule: Rule, tasks: list[tuple[int, Task]], horizon: int, seed: int, *,
                           num_tasks: int, init: torch.nn.Module | None, final_split: str | None,
                           weights: Sequence[float] | None) -> float:
    """:func:`validation_loss` with the tasks split over the ranks: each evaluates its share (task
    ``k`` with batches from ``seed + k``, as in one process) and the sums are all-reduced."""
    w = _check_weights(weights, horizon)
    total = 0.0
    for k, task in tasks:
        value = _validation_value(rule, task, horizon, seed + k, init=init, final_split=final_split, weights=w)
        total += value if math.isfinite(value) else math.inf
    buffer = dist.all_reduce(torch.tensor([total], dtype=torch.float64, device=dist.device()), "the validation sum")
    value = float(buffer[0])
    return value / num_tasks if math.isfinite(value) else math.inf


def _check_weights(weights: Sequence[float] | None, horizon: int) -> Tensor | None:
    """Validation step weights as a float64 tensor (``None`` stays ``None``), checked once."""
    if weights is None:
        return None
    if len(weights) != horizon:
        raise ValueError(f"weights must have one entry per inner step ({horizon}), got {len(weights)}")
    w = torch.tensor([float(v) for v in weights], dtype=torch.float64)
    if not (torch.isfinite(w).all() and (w >= 0).all() and w.sum() > 0):
        raise ValueError("weights must be finite, >= 0 and not all zero")
    return w


@torch.no_grad()
def _validation_value(rule: Rule, task: Task, horizon: int, seed: int, *, init: torch.nn.Module | None,
                      final_split: str | None, weights: Tensor | None = None) -> float:
    """One validation task's value (see :func:`validation_loss`), its batches drawn from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    inner = init_inner(rule, task, gen, params=start_params(init, task, gen))
    result = unroll(rule, task, inner, steps=horizon, generator=gen, weights=[0.0] * horizon)
    if final_split is None:
        if weights is None:
            return float(result.losses.mean())
        return float((result.losses.double().mean(1) * weights.to(result.losses.device)).sum() / weights.sum())
    return float(task.loss(result.inner.params, task.sample_batch(final_split, gen)).mean())


def start_params(init: torch.nn.Module | None, task: Task, generator: torch.Generator) -> Params | None:
    r"""Initial params for ``task``: the task's own draw without ``init``; else ``init.params()``
    broadcast to the shapes of ``task.init`` (a differentiable view, so the meta-gradient of every
    batched instance flows into the one :math:`\theta_0`).

    ``task.init(generator)`` is drawn in both cases, so the generator advances the same way.
    """
    drawn = task.init(generator)
    if init is None:
        return drawn
    theta0 = init.params()
    if theta0.keys() != drawn.keys():
        raise ValueError(f"the learned initialisation has params {sorted(theta0)} but the task's are {sorted(drawn)}: "
                         "build the init from the task family's model")
    out = {}
    for k, v in drawn.items():
        p = theta0[k]
        if v.shape[v.dim() - p.dim():] != p.shape:
            raise ValueError(f"the learned initialisation's {k!r} has shape {tuple(p.shape)}, the task's is "
                             f"{tuple(v.shape)} (a leading batch dimension is allowed)")
        out[k] = p.expand(v.shape)
    return out
