r"""Meta-training: learned-optimizer mode (Andrychowicz et al. 2016) and MAML mode (Finn et al. 2017).

The meta-params are the rule's weights :math:`\Phi` and, when ``init`` is given, the initial
params :math:`\theta_0` (MAML: an :class:`~l2o.maml.MAMLInit`; with a learnable rule too, a
learned initialisation and a learned optimizer are meta-trained together). Each *epoch* samples a task, optimises it for
``horizon`` inner steps with the rule, and cuts the horizon into truncations of ``truncation``
steps; after each truncation the meta-loss :math:`\sum_t w_t \bar f(\theta_t)` over that segment is
backpropagated (truncated BPTT) and Adam takes one meta-step on :math:`\Phi`, then
:func:`~l2o.unroll.truncate` starts the next segment from detached copies.

Safety: meta-gradients are clipped by global norm; a meta-step whose meta-loss or meta-gradient is
non-finite never reaches :math:`\Phi` (the step is skipped and counted, and the task is resampled);
too many consecutive skips stop the run with :class:`MetaTrainingError`. Every
``validate_every`` epochs the rule is evaluated on fixed held-out validation tasks and the best
weights are kept (the paper's early stopping).

**MAML mode** is the same loop with ``init``: every task starts from :math:`\theta_0` (broadcast
over the task's batched instances, so the meta-gradient sums over the meta-batch), the horizon is
the ``K`` adaptation steps (one truncation), ``step_weights="final"`` reads only
:math:`\theta_K`, and ``meta_split="meta"`` reads it on the query set; ``second_order=True`` is
MAML, ``False`` first-order MAML. One epoch is one meta-iteration.

**Resumable runs.** With ``checkpoint_path`` and ``checkpoint_every``, a *training state* is written
atomically (:func:`l2o.checkpoints.atomic_save`) every ``checkpoint_every`` meta-steps and at the
end; ``resume=path`` continues from one, and the continued run is bitwise identical (on CPU) to one
that was never interrupted. A training state is a plain-data dict read with
``torch.load(weights_only=True)``::

    {
      "format": "l2o.training_state", "format_version": 1, "trainer": "meta_train",
      "config": {...},                  # MetaTrainConfig.to_dict()        } a resume must match
      "rule": {"class", "name", "config"},                                  } all three exactly
      "task_family": {"class", "name", "config"},  # config() when the family has one
      "checkpoint_every": N,
      "meta_params": {"rule": state_dict},   # one state_dict per meta-trained module, by name
      "meta_optimizer": Adam state_dict,
      "counters": {"epoch", "segment", "meta_step", "skipped", "consecutive_skips", "seconds"},
      "best": None | {"meta_params": {name: state_dict}, "val_loss": float, "epoch": int},
      "history": {"epoch_loss": [...], "val_epoch": [...], "val_loss": [...]},
      "current": None | {               # None at an epoch boundary; else the task mid-horizon:
          "task_generator_state": ByteTensor,  # the training generator just before family.sample
          "task_fingerprint": str,             # sha256 of the task's class, tensors and scalars
          "inner": {"params", "rule_state", "step", "grads", "loss"},  # rule_state as its leaves
          "epoch_losses": [Tensor, ...]},      # the epoch's segment losses so far
      "generators": {"train": ByteTensor, "torch_global": ByteTensor},
      "world_size": W,                  # processes of the run that wrote it (1 without torch.distributed)
      "provenance": {"l2o_version", "torch_version"},
    }

``epoch`` is the epoch in progress and ``segment`` the next truncation of its horizon. Tasks are
arbitrary objects, so they are not stored: the task in progress is redrawn from the generator
state recorded just before it was drawn and checked against its fingerprint. Resuming is therefore
exact for every task family whose ``sample`` depends on the generator alone (all of
``optimizees``); a family with hidden state of its own is refused when the redrawn task differs.
Validation tasks are redrawn from the seed, as at the start of a run.

**Meta-batches** (``tasks_per_step = T > 1``). Each epoch draws ``T`` tasks and optimises them in
lockstep through the same truncation schedule: every meta-step runs the next truncation of each
task from its own inner state, accumulates the gradients of ``meta_loss / T`` (the mean of the
tasks' meta-losses), clips once and takes one Adam step. One epoch is still one horizon (``T``
tasks), so ``epochs * ceil(horizon / truncation)`` meta-steps in all. If any task's meta-loss or
meta-gradient is non-finite, the whole meta-step is skipped and all ``T`` tasks are resampled (the
epoch ends, as with one task). Task ``s`` of epoch ``e`` has the *global task index*
``i = e * T + s`` and draws everything (the task, its initial params, its batches) from its own
generator seeded by ``(seed, i)`` (:func:`task_generator`), so which tasks a meta-step sees does
not depend on how the meta-batch is split over processes. ``T = 1`` keeps the single training
generator of earlier versions (bitwise the same runs).

**Distributed** (``distributed=True``, with :mod:`torch.distributed` initialised, e.g. by
``torchrun`` and ``l2o meta-train --distributed``): with world size ``W`` (which must divide
``T``), rank ``r`` runs the tasks ``s = r*T/W .. (r+1)*T/W - 1`` of every meta-batch; the
meta-gradients (and a not-finite flag and the segment's loss sum, in the same flat float64
buffer) are summed with one ``all_reduce`` per meta-step, and every rank then takes the same
meta-step (or skips it, when any rank's meta-loss or the summed meta-gradient is non-finite), so
the meta-params stay identical on all ranks. The result equals a single process with the same
``T`` to float rounding (gloo sums the ranks' float64 buffers; with two ranks the sum is even
bitwise that of one process). Validation tasks are split round-robin over the ranks and their
sum is all-reduced. Rank 0 alone shows the progress bar and writes training states (the other
ranks send it their tasks in progress and RNG states); ``callback`` runs on every rank with the
same metrics. A collective that fails, because another rank died or did not answer within the
process group's timeout, raises :class:`MetaTrainingError` naming the meta-step; the last
training state is left intact.

In a meta-batch run the training state's ``"current"`` is ``{"tasks": [per task s = 0..T-1:
{"index", "generator", "task_fingerprint", "inner"}], "epoch_losses": [...]}`` (the task is redrawn
from ``(seed, index)``, then its generator set to the stored state) and ``"generators"`` also
holds ``"torch_global_by_rank"`` (a list, one state per rank, from distributed runs); the
top-level ``"world_size"`` records ``W``. Resuming on another number of ranks (any ``W'`` that
divides ``T``, including a single process) therefore continues every task exactly; only the
global torch RNG states cannot map one to one (rank ``r`` takes the stored state of rank
``r mod W``), which matters only to code that draws from the global RNG during training (l2o's
trainer, rules and optimizees do not). Float sums over ranks make runs on different ``W`` agree to
rounding, not bitwise.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

import torch
from torch import Tensor

from ..checkpoints import load_training_state, save_training_state
from ..rules.base import Rule, check_positive_int
from ..tasks import META, TRAIN, Task, TaskFamily
from ..tree import Params
from ..unroll import OBJECTIVES, init_inner, truncate, unroll
from .training_state import (TRAINER, _is_number, _Loop, _restore, _setup, _Slot, _training_state,
                             task_generator)

__all__ = ["MetaTrainConfig", "MetaTrainResult", "MetaTrainingError", "meta_train", "validation_loss", "TRAINER",
           "STEP_WEIGHTS", "start_params", "task_generator", "end_distributed_process"]

#: How the meta-loss weighs the inner steps of a horizon (see :class:`MetaTrainConfig`).
STEP_WEIGHTS = ("uniform", "linear", "final")




class MetaTrainingError(RuntimeError):
    """Meta-training cannot continue (e.g. too many consecutive non-finite meta-steps)."""


@dataclass
class MetaTrainConfig:
    """Hyperparameters of learned-optimizer meta-training (defaults: the paper's quadratic setup,
    with a cosine-decayed meta learning rate).

    Attributes:
        epochs: tasks to meta-train on (each optimised for ``horizon`` inner steps).
        horizon: inner steps per task before it is resampled (paper: 100).
        truncation: inner steps per meta-step (TBPTT segment; paper: 20).
        meta_lr: Adam learning rate on the meta-params.
        meta_lr_final: the meta learning rate at the end of a cosine decay (``None``: constant).
        max_grad_norm: global-norm clipping of the meta-gradient (``None``: off).
        validate_every: epochs between validations (0: never; the last weights are returned).
        num_val_tasks: held-out tasks drawn once for validation.
        seed: seeds task sampling and the rule's initialisation order.
        second_order: differentiate through the task gradients (the paper does not).
        objective: the meta-loss terms, ``"loss"`` (the paper) or ``"log_loss"`` (see
            :data:`l2o.unroll.OBJECTIVES`).
        step_weights: the meta-loss weight :math:`w_t` of inner step :math:`t` of the horizon:
            ``"uniform"`` (1, the paper) or ``"linear"`` (:math:`2t/\text{horizon}`, same total
            weight, more of it on late steps), or ``"final"`` (1 on the horizon's last step only:
            MAML). Validation weighs the steps the same way.
        meta_split: where the meta-loss reads the losses, ``"train"`` (the batches the rule
            trains on, the paper) or ``"meta"`` (the task's separate split, MAML's query set).
            Validation reads the same split.
        max_consecutive_skips: stop after this many non-finite meta-steps in a row.
        tasks_per_step: the meta-batch: tasks optimised in lockstep whose meta-gradients are
            averaged into each meta-step (default 1, the paper; see the module docstring). In a
            distributed run the world size must divide it.
    """

    epochs: int = 1000
    horizon: int = 100
    truncation: int = 20
    meta_lr: float = 1e-2
    meta_lr_final: float | None = 1e-4
    max_grad_norm: float | None = 1.0
    validate_every: int = 50
    num_val_tasks: int = 2
    seed: int = 0
    second_order: bool = False
    objective: str = "loss"
    step_weights: str = "uniform"
    meta_split: str = TRAIN
    max_consecutive_skips: int = 20
    tasks_per_step: int = 1

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        for name in ("epochs", "horizon", "truncation", "num_val_tasks", "max_consecutive_skips", "tasks_per_step"):
            check_positive_int(name, getattr(self, name))
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.step_weights not in STEP_WEIGHTS:
            raise ValueError(f"step_weights must be one of {', '.join(STEP_WEIGHTS)}, got {self.step_weights!r}")
        if self.meta_split not in (TRAIN, META):
            raise ValueError(f"meta_split must be {TRAIN!r} or {META!r}, got {self.meta_split!r}")
        if self.truncation > self.horizon:
            raise ValueError(f"truncation ({self.truncation}) must not be longer than the horizon ({self.horizon})")
        if not (_is_number(self.meta_lr) and math.isfinite(self.meta_lr) and self.meta_lr > 0):
            raise ValueError(f"meta_lr must be a positive number, got {self.meta_lr!r}")
        for name in ("meta_lr_final", "max_grad_norm"):
            value = getattr(self, name)
            if value is not None and not (_is_number(value) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number or None, got {value!r}")
        if isinstance(self.validate_every, bool) or not isinstance(self.validate_every, int) or self.validate_every < 0:
            raise ValueError(f"validate_every must be an integer >= 0, got {self.validate_every!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.second_order, bool):
            raise ValueError(f"second_order must be True or False, got {self.second_order!r}")

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (what checkpoints and training states record)."""
        return asdict(self)


@dataclass
class MetaTrainResult:
    """What :func:`meta_train` returns. ``rule`` holds the best validated weights.

    ``skipped_steps`` counts the meta-steps skipped because their meta-loss or meta-gradient was
    non-finite; ``meta_steps`` counts all of them (skipped or not); ``seconds`` is the time spent
    meta-training, over every run of a resumed training; ``resumed_at`` is the meta-step a
    resumed run continued from (``None`` for a run started from scratch).
    """

    rule: Rule
    best_val_loss: float | None
    best_epoch: int | None
    skipped_steps: int
    meta_steps: int
    seconds: float
    history: dict[str, list[float]] = field(default_factory=dict)
    resumed_at: int | None = None
    init: torch.nn.Module | None = None


@torch.no_grad()
def validation_loss(rule: Rule, tasks: list[Task], horizon: int, seed: int, *, init: torch.nn.Module | None = None,
                    final_split: str | None = None, weights: Sequence[float] | None = None) -> float:
    r"""The meta-objective on validation tasks, without gradients.

    By default the mean over tasks and inner steps 1..horizon of the training loss (the paper's
    objective); with ``weights`` (one per inner step, e.g. the trainer's ``"linear"`` step
    weights) the weighted mean :math:`\sum_t w_t f_t / \sum_t w_t` instead. With ``final_split``
    (``"train"`` or ``"meta"``), the mean loss of the final params on that split instead (MAML:
    the query loss after adaptation). ``init`` starts every task from learned initial params (see
    :func:`start_params`). Non-finite results count as ``inf`` so a diverging rule is never
    selected.
    """
    w = _check_weights(weights, horizon)
    total = 0.0
    for k, task in enumerate(tasks):
        value = _validation_value(rule, task, horizon, seed + k, init=init, final_split=final_split, weights=w)
        if not math.isfinite(value):
            return math.inf
        total += value
    return total / len(tasks)


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
    """Initial params for ``task``: ``None`` (the task draws its own) without ``init``; else
    ``init.params()`` broadcast to the shapes of ``task.init`` (a differentiable view, so the
    meta-gradient of every batched instance flows into the one :math:`\theta_0`).

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


def _lr_at(config: MetaTrainConfig, progress: float) -> float:
    if config.meta_lr_final is None:
        return config.meta_lr
    lo, hi = math.log(config.meta_lr_final), math.log(config.meta_lr)
    return math.exp(lo + 0.5 * (hi - lo) * (1.0 + math.cos(math.pi * progress)))


class _Dist:
    """This process's place in a distributed run (``active`` False: a single process)."""

    #: Set once a collective of this process has failed: its process group is broken, and
    #: destroying it can abort the process (the l2o commands then leave it to the OS at exit).
    failed = False

    def __init__(self, requested: bool | None) -> None:
        import torch.distributed as dist

        initialised = dist.is_available() and dist.is_initialized()
        if requested not in (None, True, False):
            raise TypeError(f"distributed must be True, False or None, got {requested!r}")
        if requested and not initialised:
            raise ValueError("distributed=True needs torch.distributed to be initialised first: launch with torchrun "
                             "and call torch.distributed.init_process_group() (the l2o commands do it with "
                             "--distributed)")
        self.active = bool(initialised if requested is None else requested)
        if not self.active and initialised and dist.get_world_size() > 1:
            warnings.warn(f"torch.distributed is initialised with {dist.get_world_size()} ranks but meta_train runs "
                          "with distributed=False: every rank trains on its own (pass distributed=True to share the "
                          "meta-batch)", RuntimeWarning, stacklevel=3)
        self.rank = dist.get_rank() if self.active else 0
        self.world = dist.get_world_size() if self.active else 1
        self.backend = str(dist.get_backend()) if self.active else None
        self.step = 0  # the meta-step in progress, for error messages
        self.state_path: str | None = None

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run a collective; turn its failure (a dead or hung rank) into a MetaTrainingError."""
        try:
            return fn()
        except Exception as exc:  # gloo/nccl errors: DistBackendError, RuntimeError, ConnectionError
            _Dist.failed = True
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            if self.state_path is None:
                kept = "no training state was being written"
            elif os.path.isfile(self.state_path):
                kept = f"the last training state in {self.state_path} is intact; resume from it with the same arguments"
            else:
                kept = f"no training state had been written to {self.state_path} (on this host) yet"
            raise MetaTrainingError(
                f"distributed meta-training failed on rank {self.rank} of {self.world} at meta-step {self.step}: "
                f"{what} with the other ranks did not complete ({type(exc).__name__}: {first}). Another rank has "
                f"probably died or stopped answering within the process group's timeout; {kept}") from exc

    def device(self) -> torch.device:
        """Where collective buffers live: the CUDA device for nccl, else the CPU."""
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def all_reduce(self, buffer: Tensor, what: str) -> Tensor:
        import torch.distributed as dist

        self._call(what, lambda: dist.all_reduce(buffer))
        return buffer

    def gather(self, obj: Any, what: str) -> list[Any] | None:
        """``obj`` of every rank, in rank order, on rank 0 (``None`` elsewhere)."""
        import torch.distributed as dist

        out = [None] * self.world if self.rank == 0 else None
        self._call(what, lambda: dist.gather_object(obj, out, dst=0))
        return out


def meta_train(rule: Rule, family: TaskFamily, config: MetaTrainConfig | None = None, *,
               progress: bool = True, callback: Callable[[dict[str, float]], None] | None = None,
               checkpoint_path: str | os.PathLike | None = None, checkpoint_every: int | None = None,
               resume: str | os.PathLike | None = None, init: torch.nn.Module | None = None,
               val_family: TaskFamily | None = None, distributed: bool | None = False) -> MetaTrainResult:
    """Meta-train ``rule`` (and ``init``) in place on tasks from ``family``; return the best validated ones.

    Args:
        rule: a rule with trainable parameters (e.g. :class:`~l2o.rules.LSTMRule`).
        family: the task family to sample training and validation tasks from.
        config: hyperparameters (default :class:`MetaTrainConfig`).
        progress: show a tqdm progress bar with the meta-loss (and skipped meta-steps, if any).
        callback: called after each epoch with a dict of that epoch's metrics.
        checkpoint_path: where to write the training state (atomically, replacing the previous
            one) every ``checkpoint_every`` meta-steps and at the end; give both or neither.
        checkpoint_every: meta-steps between training states.
        resume: a training-state file to continue from; ``rule``, ``family`` and ``config`` must
            be those of the run that wrote it (a mismatch is refused naming the differing fields).
            The result is bitwise identical on CPU to a run that was never interrupted. ``rule``'s
            weights are replaced by the stored ones, and the global torch RNG is set to its state
            at the save (as in the uninterrupted run).
        init: MAML mode: a module with ``params()`` (e.g. :class:`~l2o.maml.MAMLInit`) holding
            the initial params :math:`\theta_0` every task starts from, meta-trained with the
            rule's weights (the rule may have none, e.g. :class:`~l2o.rules.SGD`).
        val_family: draws the validation tasks (default ``family``), e.g. Omniglot's validation
            characters.
        distributed: share each meta-batch (``config.tasks_per_step`` tasks) over the ranks of the
            initialised default :mod:`torch.distributed` process group, all-reducing the
            meta-gradients (see the module docstring); every rank must call ``meta_train`` with
            the same arguments. ``None``: whenever a process group is initialised. Rank 0 alone
            writes ``checkpoint_path`` and shows progress; ``resume`` is read by every rank (give a
            path every host can read).

    Raises:
        TypeError / ValueError: bad arguments or config (naming the argument or field).
        CheckpointError: ``resume`` is missing, unsafe, malformed, or from a different run.
        MetaTrainingError: ``config.max_consecutive_skips`` meta-steps in a row were non-finite,
            or (distributed) a collective failed because another rank died or timed out; the last
            training state written (if any) is left intact.
    """
    config = MetaTrainConfig() if config is None else config
    if not isinstance(config, MetaTrainConfig):
        raise TypeError(f"config must be a MetaTrainConfig, got {type(config).__name__}")
    config.validate()
    if not (isinstance(rule, torch.nn.Module) and callable(getattr(rule, "init", None))
            and callable(getattr(rule, "update", None))):
        raise TypeError(f"rule must be an l2o rule (an nn.Module with init and update, e.g. LSTMRule), "
                        f"got {type(rule).__name__}")
    if not callable(getattr(family, "sample", None)):
        raise TypeError(f"family must be a task family (with a sample(generator) method), got {type(family).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
    if checkpoint_path is not None and not isinstance(checkpoint_path, (str, os.PathLike)):
        raise TypeError(f"checkpoint_path must be a str or os.PathLike, got {type(checkpoint_path).__name__}")
    if (checkpoint_path is None) != (checkpoint_every is None):
        raise ValueError("checkpoint_path and checkpoint_every go together: give both (to write training states) "
                         f"or neither; got checkpoint_path={checkpoint_path!r}, checkpoint_every={checkpoint_every!r}")
    if checkpoint_every is not None:
        check_positive_int("checkpoint_every", checkpoint_every)
        if Path(checkpoint_path).is_dir():
            raise ValueError(f"checkpoint_path {str(checkpoint_path)!r} is a directory; give a file path")
    if resume is not None and not isinstance(resume, (str, os.PathLike)):
        raise TypeError(f"resume must be the path of a training state (str or os.PathLike), got {type(resume).__name__}")

    # The meta-trained modules, by name: the keys of "meta_params" in a training state. (A further
    # module, e.g. a learned initialisation, is one more entry here.)
    modules: dict[str, torch.nn.Module] = {"rule": rule}
    if init is not None:
        if not (isinstance(init, torch.nn.Module) and callable(getattr(init, "params", None))):
            raise TypeError(f"init must be an nn.Module with a params() method (e.g. l2o.MAMLInit), got {type(init).__name__}")
        modules["init"] = init
    meta_params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    if not meta_params:
        raise ValueError(f"{type(rule).__name__} has no trainable parameters to meta-train (and no init was given)")
    dist = _Dist(distributed)
    tasks_per_step = config.tasks_per_step
    if tasks_per_step % dist.world:
        raise ValueError(f"tasks_per_step ({tasks_per_step}) must be a multiple of the number of ranks ({dist.world}): "
                         f"each rank runs tasks_per_step / world_size tasks of every meta-batch")
    batched = tasks_per_step > 1  # a meta-batch: every task from its own generator (else the one training stream)
    share = tasks_per_step // dist.world
    own = range(dist.rank * share, (dist.rank + 1) * share)  # this rank's tasks within each meta-batch
    segments = math.ceil(config.horizon / config.truncation)
    total_steps = config.epochs * segments
    optimizer = torch.optim.Adam(meta_params, lr=config.meta_lr)
    gen = torch.Generator().manual_seed(config.seed)
    val_gen = torch.Generator().manual_seed(config.seed + 1_000_003)
    if val_family is not None and not callable(getattr(val_family, "sample", None)):
        raise TypeError(f"val_family must be a task family (with a sample(generator) method), got {type(val_family).__name__}")
    val_source = family if val_family is None else val_family
    # every rank draws all validation tasks (the same stream) and keeps its round-robin share
    val_tasks = [(k, t) for k, t in ((k, val_source.sample(val_gen)) for k in range(config.num_val_tasks))
                 if k % dist.world == dist.rank] if config.validate_every else []
    setup = _setup(config, rule, family, init)
    loop = _Loop()
    resumed_at = None
    if resume is not None:
        data, source = load_training_state(resume, trainer=TRAINER), repr(str(resume))
        _restore(data, source, loop, setup=setup, modules=modules, optimizer=optimizer, rule=rule, family=family,
                 gen=gen, config=config, segments=segments, keep_task_gen_state=checkpoint_path is not None,
                 dist=dist, own=own)
        resumed_at = loop.meta_step
    saving = checkpoint_path is not None
    if saving:
        dist.state_path = str(checkpoint_path)
    start = time.perf_counter()

    def save() -> None:
        elapsed = loop.seconds + (time.perf_counter() - start)
        state = _training_state(loop, setup, modules, optimizer, gen, checkpoint_every, elapsed, dist)
        if dist.active:  # rank 0 writes every rank's tasks in progress and RNG state
            mine = {"tasks": state["current"]["tasks"] if batched and state["current"] is not None else None,
                    "torch_global": state["generators"]["torch_global"]}
            everyone = dist.gather(_to_cpu(mine), "gathering the training state")
            if dist.rank != 0:
                return
            state["generators"]["torch_global_by_rank"] = [r["torch_global"] for r in everyone]
            if batched and state["current"] is not None:
                state["current"]["tasks"] = [t for r in everyone for t in r["tasks"]]
        save_training_state(checkpoint_path, state)

    def draw(epoch: int) -> list[_Slot]:
        """This rank's tasks of ``epoch``."""
        if not batched:
            gen_state = gen.get_state() if saving else None
            task = family.sample(gen)
            return [_Slot(task, gen, init_inner(rule, task, gen, params=start_params(init, task, gen)),
                          gen_state=gen_state)]
        slots = []
        for s in own:
            index = epoch * tasks_per_step + s
            g = task_generator(config.seed, index)
            task = family.sample(g)
            slots.append(_Slot(task, g, init_inner(rule, task, g, params=start_params(init, task, g)), index=index))
        return slots

    bar = None
    if progress and dist.rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.epochs, initial=loop.epoch, desc=f"meta-train {getattr(family, 'name', 'task')}",
                   unit="epoch")
    try:
        while loop.epoch < config.epochs:
            epoch = loop.epoch
            if loop.slots is None:  # a new epoch: draw its tasks (a resumed run may start mid-horizon)
                loop.slots = draw(epoch)
                loop.epoch_losses = []
                loop.segment = 0
            save_after_epoch = False
            while loop.segment < segments:
                done = loop.segment * config.truncation
                steps = min(config.truncation, config.horizon - done)
                for group in optimizer.param_groups:
                    group["lr"] = _lr_at(config, loop.meta_step / max(1, total_steps - 1))
                weights = _step_weights(config, done, steps)
                dist.step = loop.meta_step + 1
                optimizer.zero_grad(set_to_none=True)
                if not (batched or dist.active):  # one task, one process: the original loop
                    slot = loop.slots[0]
                    result = unroll(rule, slot.task, slot.inner, steps=steps, generator=slot.generator,
                                    weights=weights, meta_split=config.meta_split, second_order=config.second_order,
                                    objective=config.objective, tape=True)
                    ok = result.finite and bool(torch.isfinite(result.meta_loss))
                    if ok:
                        result.meta_loss.backward()
                        norm = torch.nn.utils.clip_grad_norm_(meta_params, config.max_grad_norm or math.inf)
                        ok = bool(torch.isfinite(norm))
                    results, segment_loss = [result], result.losses.mean()
                else:  # this rank's share of the meta-batch, then (distributed) the sum over ranks
                    results, bad, loss_sum = [], False, 0.0
                    for slot in loop.slots:
                        result = unroll(rule, slot.task, slot.inner, steps=steps, generator=slot.generator,
                                        weights=weights, meta_split=config.meta_split,
                                        second_order=config.second_order, objective=config.objective, tape=True)
                        if not (result.finite and bool(torch.isfinite(result.meta_loss))):
                            bad = True  # the meta-step is skipped: no need to run this rank's other tasks
                            break
                        (result.meta_loss / tasks_per_step).backward()
                        loss_sum += float(result.losses.double().mean())
                        results.append(result)
                    if dist.active:
                        bad, loss_sum = _all_reduce_meta_gradients(dist, meta_params, bad, loss_sum)
                    ok = not bad
                    if ok:
                        norm = torch.nn.utils.clip_grad_norm_(meta_params, config.max_grad_norm or math.inf)
                        ok = bool(torch.isfinite(norm))
                    segment_loss = torch.tensor(loss_sum / tasks_per_step, dtype=torch.float64)
                loop.meta_step += 1
                due = saving and loop.meta_step % checkpoint_every == 0
                if not ok:
                    loop.skipped += 1
                    loop.consecutive += 1
                    optimizer.zero_grad(set_to_none=True)
                    if loop.consecutive >= config.max_consecutive_skips:
                        raise MetaTrainingError(
                            f"{loop.consecutive} consecutive meta-steps had a non-finite meta-loss or meta-gradient "
                            f"(epoch {epoch}); lower meta_lr or the rule's output_scale, or check the task"
                        )
                    save_after_epoch = save_after_epoch or due
                    break  # a task diverged: resample
                loop.consecutive = 0
                optimizer.step()
                loop.epoch_losses.append(segment_loss)
                for slot, result in zip(loop.slots, results):
                    slot.inner = truncate(result.inner)
                loop.segment += 1
                if due:
                    if loop.segment < segments:
                        save()  # mid-horizon
                    else:
                        save_after_epoch = True  # once the epoch's bookkeeping is done
            # The epoch is over (horizon reached, or a task diverged).
            epoch_losses = loop.epoch_losses
            loop.slots = None
            loop.epoch_losses = []
            loop.segment = 0
            loop.epoch = epoch + 1
            metrics = {"epoch": float(epoch), "skipped": float(loop.skipped)}
            if epoch_losses:
                metrics["loss"] = float(torch.stack(epoch_losses).mean())
                loop.history["epoch_loss"].append(metrics["loss"])
            if config.validate_every and ((epoch + 1) % config.validate_every == 0 or epoch + 1 == config.epochs):
                final_split = config.meta_split if config.step_weights == "final" else None
                if dist.active:
                    val = _distributed_validation(dist, rule, val_tasks, config, init=init, final_split=final_split)
                else:
                    val = validation_loss(rule, [t for _, t in val_tasks], config.horizon, config.seed + 7, init=init,
                                          final_split=final_split, weights=_step_weights(config, 0, config.horizon))
                loop.history["val_epoch"].append(float(epoch + 1))
                loop.history["val_loss"].append(val)
                metrics["val_loss"] = val
                if loop.best_val is None or val < loop.best_val:
                    loop.best_val, loop.best_epoch = val, epoch + 1
                    loop.best_state = {name: copy.deepcopy(m.state_dict()) for name, m in modules.items()}
            if save_after_epoch and loop.epoch < config.epochs:  # (the end of the run is saved below)
                save()
            if callback is not None:
                callback(metrics)
            if bar is not None:
                post = {"loss": f"{metrics.get('loss', float('nan')):.3g}"}
                if loop.best_val is not None:
                    post["best_val"] = f"{loop.best_val:.3g}"
                if loop.skipped:
                    post["skipped"] = loop.skipped
                bar.set_postfix(post)
                bar.update(1)
        if saving:
            save()
    finally:
        if bar is not None:
            bar.close()
    if loop.best_state is not None:
        for name, state in loop.best_state.items():
            modules[name].load_state_dict(state)
    seconds = loop.seconds + (time.perf_counter() - start)
    return MetaTrainResult(rule, loop.best_val, loop.best_epoch, loop.skipped, loop.meta_step, seconds, loop.history,
                           resumed_at, init)


def end_distributed_process(code: int = 0) -> NoReturn:
    """End a process that ran gloo collectives: flush stdout/stderr and leave with ``os._exit(code)``.

    With torch 2.13, interpreter finalisation after a gloo process group was used aborts the
    process now and then ("terminate called without an active exception", SIGABRT, exit -6: gloo's
    worker threads release Python objects while the interpreter is torn down; see pytorch PR
    179291). Destroy the process group first (when it is healthy), then call this instead of
    returning, so a finished run reports its real exit code. ``atexit`` handlers do not run.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or redirected away
            pass
    os._exit(code)


def _all_reduce_meta_gradients(dist: _Dist, meta_params: list[torch.nn.Parameter], bad: bool,
                               loss_sum: float) -> tuple[bool, float]:
    """Sum the meta-gradients, the not-finite flags and the loss sums of all ranks with one
    ``all_reduce`` of a flat float64 buffer; the summed gradients replace every rank's own."""
    device = dist.device()
    parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).to(device, torch.float64)
             for p in meta_params]
    parts.append(torch.tensor([1.0 if bad else 0.0, loss_sum], dtype=torch.float64, device=device))
    buffer = dist.all_reduce(torch.cat(parts), "the all-reduce of the meta-gradients")
    offset = 0
    for p in meta_params:
        n = p.numel()
        chunk = buffer[offset:offset + n].view(p.shape)
        offset += n
        if p.grad is not None:
            p.grad.copy_(chunk)
        elif bool(chunk.ne(0).any()):  # only another rank's tasks reached this meta-param
            p.grad = chunk.to(p.device, p.dtype).clone()
    flags = buffer[offset:].tolist()
    return flags[0] > 0, flags[1]


def _distributed_validation(dist: _Dist, rule: Rule, tasks: list[tuple[int, Task]], config: MetaTrainConfig, *,
                            init: torch.nn.Module | None, final_split: str | None) -> float:
    """:func:`validation_loss` with the tasks split over the ranks: each evaluates its share (task
    ``k`` with batches from ``seed + 7 + k``, as in one process) and the sums are all-reduced."""
    weights = _check_weights(_step_weights(config, 0, config.horizon), config.horizon)
    total = 0.0
    for k, task in tasks:
        value = _validation_value(rule, task, config.horizon, config.seed + 7 + k, init=init, final_split=final_split,
                                  weights=weights)
        total += value if math.isfinite(value) else math.inf
    buffer = dist.all_reduce(torch.tensor([total], dtype=torch.float64, device=dist.device()), "the validation sum")
    value = float(buffer[0])
    return value / config.num_val_tasks if math.isfinite(value) else math.inf


def _to_cpu(value: Any) -> Any:
    """``value`` with every tensor (in dicts, lists and tuples) copied to the CPU (for gathering)."""
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a NamedTuple
        return type(value)(*(_to_cpu(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def _step_weights(config: MetaTrainConfig, done: int, steps: int) -> list[float] | None:
    """Meta-loss weights of inner steps ``done + 1 .. done + steps`` of the horizon."""
    if config.step_weights == "linear":
        return [2.0 * (done + k + 1) / config.horizon for k in range(steps)]
    if config.step_weights == "final":
        return [1.0 if done + k + 1 == config.horizon else 0.0 for k in range(steps)]
    return None
