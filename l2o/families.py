r"""Task families a user builds without writing a task class: from any ``nn.Module`` factory and a
batch sampler (:class:`ModuleFamily`), and a mixture of families (:class:`TaskMixture`).

Meta-training an optimizer for your own model::

    def model(g):                        # may draw an architecture from g
        return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 1))

    def batches(split, g):               # "train": a minibatch; "meta": held-out data
        x = torch.randn(128, 20, generator=g)
        return x, x.sum(1, keepdim=True)

    family = l2o.ModuleFamily(model, batches, F.mse_loss, name="my-regression")
    result = l2o.meta_train(l2o.LSTMRule(), family, l2o.MetaTrainConfig(epochs=100))

A task of a :class:`ModuleFamily` runs the module through ``torch.func.functional_call`` with the
task's params (its buffers, e.g. batch-norm statistics, are the module's own), and its initial
params are the module's own initialisation drawn under a seed from the task's generator, times an
optional ``init_scale``, so every task is reproducible from the generator alone (what resumable
runs need).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .validation import check_hyperparameter
from .tasks import Task, TaskFamily
from .tree import Params

__all__ = ["ModuleTask", "ModuleFamily", "TaskMixture"]

#: ``model_fn(generator) -> nn.Module``: builds a model (it may draw its architecture from the generator).
ModelFn = Callable[[torch.Generator], nn.Module]
#: ``batch_fn(split, generator) -> (inputs, targets)`` for ``split`` ``"train"`` or ``"meta"``.
BatchFn = Callable[[str, torch.Generator], Any]
#: ``loss_fn(prediction, target) -> scalar tensor``.
LossFn = Callable[[Any, Any], Tensor]


def _seed_from(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2 ** 62, (), generator=generator))


class ModuleTask:
    r"""One task: a model, its loss and its batches (the :class:`~l2o.tasks.Task` protocol).

    ``loss(params, (x, y)) = loss_fn(model_params(x), y)`` with the model run through
    ``torch.func.functional_call``; ``init`` returns the params the task was built with.
    """

    def __init__(self, model: nn.Module, batch_fn: BatchFn, loss_fn: LossFn, params: Params) -> None:
        self.model, self.batch_fn, self.loss_fn, self._params = model, batch_fn, loss_fn, params

    def init(self, generator: torch.Generator) -> Params:
        """The task's initial params (drawn when the task was sampled; ``generator`` is not used)."""
        return dict(self._params)

    def sample_batch(self, split: str, generator: torch.Generator) -> Any:
        return self.batch_fn(split, generator)

    def loss(self, params: Params, batch: Any) -> Tensor:
        x, y = batch
        out = self.loss_fn(functional_call(self.model, params, (x,)), y)
        if not isinstance(out, Tensor) or out.dim() != 0:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"loss_fn must return a scalar tensor, got {shape}")
        return out


class ModuleFamily:
    r"""Tasks from a model factory and a batch sampler (see the module docstring).

    Args:
        model_fn: ``model_fn(generator) -> nn.Module``; called once per task. It may draw an
            architecture from the generator (widths, depth, activation); the module's own
            initialisers then run under a seed drawn from the generator.
        batch_fn: ``batch_fn(split, generator) -> (x, y)``: a training minibatch for ``"train"``
            and held-out data for ``"meta"`` (read by meta-losses and evaluations that ask for it).
        loss_fn: ``loss_fn(model(x), y) -> scalar`` (default cross-entropy).
        name: the family's name (progress bars, checkpoints' provenance).
        init_scale: multiplies the initial params: a number, or a pair ``(low, high)`` from which
            every task draws its scale log-uniformly (optimizers meet inits of several scales).
    """

    def __init__(self, model_fn: ModelFn, batch_fn: BatchFn, loss_fn: LossFn = F.cross_entropy, *,
                 name: str = "module", init_scale: float | tuple[float, float] = 1.0) -> None:
        for what, fn in (("model_fn", model_fn), ("batch_fn", batch_fn), ("loss_fn", loss_fn)):
            if not callable(fn):
                raise TypeError(f"{what} must be callable, got {type(fn).__name__}")
        if not isinstance(name, str) or not name:
            raise TypeError(f"name must be a non-empty str, got {name!r}")
        if isinstance(init_scale, (tuple, list)):
            if len(init_scale) != 2:
                raise ValueError(f"init_scale must be a number or a pair (low, high), got {init_scale!r}")
            low = check_hyperparameter("init_scale low", init_scale[0], low=0.0, low_inclusive=False)
            high = check_hyperparameter("init_scale high", init_scale[1], low=low)
            self.init_scale: float | tuple[float, float] = (low, high)
        else:
            self.init_scale = check_hyperparameter("init_scale", init_scale, low=0.0, low_inclusive=False)
        self.model_fn, self.batch_fn, self.loss_fn, self.name = model_fn, batch_fn, loss_fn, name

    def task_batches(self, generator: torch.Generator) -> BatchFn:
        """The batch sampler of a new task: ``batch_fn`` (a subclass may draw per-task data here,
        e.g. a task's own synthetic language, before the model is drawn)."""
        return self.batch_fn

    def sample(self, generator: torch.Generator) -> ModuleTask:
        """A task: its batch sampler, then a model built (and initialised) from ``generator``, its
        params scaled."""
        batch_fn = self.task_batches(generator)
        seed = _seed_from(generator)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.model_fn(generator)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model_fn must return an nn.Module, got {type(model).__name__}")
        params = {k: v.detach().clone() for k, v in model.named_parameters()}
        if not params:
            raise ValueError(f"the model of family {self.name!r} has no parameters to optimise")
        scale = self.init_scale
        if isinstance(scale, tuple):
            u = float(torch.rand((), generator=generator, dtype=torch.float64))
            scale = math.exp(math.log(scale[0]) + u * (math.log(scale[1]) - math.log(scale[0])))
        if scale != 1.0:
            params = {k: v * scale for k, v in params.items()}
        model.requires_grad_(False)
        return ModuleTask(model, batch_fn, self.loss_fn, params)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "init_scale": self.init_scale}


class TaskMixture:
    r"""A family that draws each task from one of several families, picked at random per task
    (with probabilities proportional to ``weights``), so every meta-step can mix models.

    Args:
        families: the component families, a sequence or a ``{name: family}`` mapping.
        weights: sampling weights, one per family (default equal).
        name: the mixture's name.
    """

    def __init__(self, families: Sequence[TaskFamily] | Mapping[str, TaskFamily],
                 weights: Sequence[float] | None = None, *, name: str = "mixture") -> None:
        items = list(families.values()) if isinstance(families, Mapping) else list(families)
        if not items:
            raise ValueError("a TaskMixture needs at least one family")
        for i, fam in enumerate(items):
            if not callable(getattr(fam, "sample", None)):
                raise TypeError(f"families[{i}] must be a task family (with sample(generator)), got "
                                f"{type(fam).__name__}")
        w = [1.0] * len(items) if weights is None else [check_hyperparameter("weight", v) for v in weights]
        if len(w) != len(items) or sum(w) <= 0:
            raise ValueError(f"weights must be {len(items)} numbers >= 0, not all zero, got {weights!r}")
        self.families, self.weights, self.name = items, w, name
        self._probs = torch.tensor(w, dtype=torch.float64) / sum(w)

    def sample(self, generator: torch.Generator) -> Task:
        """A task of a family drawn from ``generator`` (then the family draws the task from it too)."""
        i = int(torch.multinomial(self._probs, 1, generator=generator))
        return self.families[i].sample(generator)

    def config(self) -> dict[str, Any]:
        def describe(fam: Any) -> dict[str, Any]:
            config = getattr(fam, "config", None)
            return {"class": type(fam).__name__, "name": getattr(fam, "name", None),
                    "config": config() if callable(config) else None}

        return {"families": [describe(f) for f in self.families], "weights": self.weights}
