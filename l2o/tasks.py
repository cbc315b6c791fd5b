"""The task protocols the engine and trainers program against (optimizees implement them).

A **task** is one optimizee problem instance; a **task family** samples tasks. Tasks may batch
many independent instances (128 quadratics, 25 sine waves): their ``loss`` then returns one loss
per instance, the engine differentiates the *sum* (so every instance gets its own exact gradient,
exactly as if optimised alone) and reports and meta-trains on the *mean*.

A task may also define ``loss_and_grads(params, batch) -> (loss, grads)``: the per-instance loss
and the gradient of its sum, computed without autograd (e.g. in closed form). The engine then uses
it for first-order gradients (:func:`l2o.unroll.loss_and_grads`), where it saves the autograd
graph and backward of every inner step; it must return what autograd would, up to rounding. (A
subclass that redefines ``loss`` without ``loss_and_grads`` gets autograd, not its parent's
closed form.)

A batched task may define ``instance_loss(params, batch) -> scalar``: the loss of one instance
(params and batch without the leading instance dimension), of which ``loss`` is the ``vmap``. The
engine then takes the first gradient of instances that all start from the same params at those
params, unbatched (:mod:`l2o.instances`), instead of at ``B`` copies of them.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from .tree import Params

__all__ = ["Task", "TaskFamily", "TRAIN", "META", "support_or_query", "closed_form", "instance_form"]

#: The split a rule's gradients are computed on.
TRAIN = "train"
#: The split a meta-loss may read instead, when the task has one (e.g. MAML's query set).
META = "meta"


def support_or_query(split: str, support: Any, query: Any) -> Any:
    """A few-shot task's ``sample_batch``: its fixed support data for :data:`TRAIN` (what the inner
    steps read) and its query data for :data:`META` (what the meta-loss reads)."""
    if split == TRAIN:
        return support
    if split == META:
        if query is None:
            raise ValueError("this task has no query data (split 'meta'); pass query=(x, y)")
        return query
    raise ValueError(f"split must be {TRAIN!r} (the support data) or {META!r} (the query data), got {split!r}")


@runtime_checkable
class Task(Protocol):
    """One optimizee problem (possibly a batch of independent instances)."""

    def init(self, generator: torch.Generator) -> Params:
        """Initial params θ0, drawn from ``generator``."""
        ...

    def sample_batch(self, split: str, generator: torch.Generator) -> Any:
        """A batch of data for ``split`` (:data:`TRAIN` or :data:`META`); ``None`` for data-free tasks."""
        ...

    def loss(self, params: Params, batch: Any) -> Tensor:
        """A scalar, or a vector with one loss per batched instance."""
        ...


@runtime_checkable
class TaskFamily(Protocol):
    """A sampler of tasks."""

    name: str

    def sample(self, generator: torch.Generator) -> Task:
        """Draw a task."""
        ...


def closed_form(task: Task) -> Any:
    """The task's ``loss_and_grads``, unless its class redefines ``loss`` below the class that
    defines ``loss_and_grads`` (a subclass changing the loss must not inherit its parent's gradient)."""
    return _own(task, "loss_and_grads")


def instance_form(task: Task) -> Any:
    """The task's ``instance_loss``, unless its class redefines ``loss`` below the class that
    defines ``instance_loss`` (the batched loss must still be the ``vmap`` of it)."""
    return _own(task, "instance_loss")


def _own(task: Task, name: str) -> Any:
    for klass in type(task).__mro__:
        if name in vars(klass):
            return getattr(task, name)
        if "loss" in vars(klass):
            return None
    return None
