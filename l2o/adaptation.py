r"""Adapting a task's params with a rule, step by step, without gradients.

What held-out evaluations of an initialisation read: from params :math:`\theta_0`, ``steps`` inner
steps of a rule on the task's training split,

.. math:: \theta_{t+1} = \theta_t + \text{rule.update}(\nabla f^{\text{train}}(\theta_t), s_t, \theta_t),

each one call of the unroll engine (first order, under ``no_grad``), and any metric of every
:math:`\theta_t` (:func:`adaptation_curve`: the loss on the task's ``META`` split). Model- and
task-agnostic: MAML's θ0, a network pretrained jointly, or any start a task family offers.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

from .rules.base import Rule
from .tasks import META, Task
from .tree import Params
from .unroll import init_inner, unroll
from .validation import check_positive_int

__all__ = ["adaptation_curve", "adaptation_params"]


def adaptation_curve(rule: Rule, task: Task, params: Params, *, steps: int,
                     generator: torch.Generator | None = None) -> Tensor:
    r"""Meta-split losses along an adaptation: ``(steps + 1, B)``, row ``t`` = :math:`f^{q}(\theta_t)`.

    Runs ``steps`` inner steps of ``rule`` from ``params`` on the task's training split (one engine
    call per step, first order, under ``no_grad``: nothing is kept for backpropagation) and
    evaluates the task's ``META`` split after each. This is the paper's "MSE vs number of
    gradient steps" curve (e.g. MAML's θ0 or a pretrained network fine-tuned with SGD).
    """
    if not isinstance(rule, Rule):
        raise TypeError(f"rule must be an l2o Rule (e.g. l2o.SGD(lr=0.01)), got {type(rule).__name__}")
    if not isinstance(task, Task):
        raise TypeError(f"task must be a task (with init, sample_batch and loss), got {type(task).__name__}")
    if not (isinstance(params, dict) and params and all(isinstance(v, Tensor) for v in params.values())):
        raise TypeError(f"params must be a non-empty dict of tensors, got {type(params).__name__}")
    check_positive_int("steps", steps)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    gen = torch.Generator().manual_seed(0) if generator is None else generator
    with torch.no_grad():
        rows = [task.loss(theta, task.sample_batch(META, gen)).reshape(-1)
                for theta in adaptation_params(rule, task, params, steps=steps, generator=gen)]
    return torch.stack(rows)


def adaptation_params(rule: Rule, task: Task, params: Params, *, steps: int,
                      generator: torch.Generator) -> Iterator[Params]:
    r"""The params :math:`\theta_0, \theta_1, \dots, \theta_{steps}` of an adaptation by ``rule``
    on the task's training split, one engine call per step, without gradients (what
    :func:`adaptation_curve` and held-out evaluations read any metric from)."""
    with torch.no_grad():
        inner = init_inner(rule, task, generator, params={k: v.detach() for k, v in params.items()})
        yield inner.params
        for _ in range(steps):
            inner = unroll(rule, task, inner, steps=1, generator=generator, weights=[0.0]).inner
            yield inner.params
