r"""Training states of :func:`l2o.meta.meta_train`: where a run stands (:class:`TrainingState`),
the file a resumable run writes, and how a run is restored from one.

A training state file is a plain-data dict read with ``torch.load(weights_only=True)``
(:func:`l2o.checkpoints.load_training_state`), written atomically::

    {
      "format": "l2o.training_state", "format_version": 2, "trainer": "meta_train",
      "config": {...},                  # MetaTrainConfig.to_dict()        } a resume must match
      "rule": {"class", "name", "config"},                                  } all of these exactly
      "task_family": {"class", "name", "config"},  # config() when the family has one
      "init": {"class", "params"},      # MAML mode only: the learned initialisation's shapes
      "checkpoint_every": N,
      "meta_params": {"rule": state_dict},   # one state_dict per meta-trained module, by name
      "meta_optimizer": Adam state_dict,
      "counters": {"epoch", "segment", "meta_step", "skipped", "consecutive_skips", "seconds"},
      "best": None | {"meta_params": {name: state_dict}, "val_loss": float, "epoch": int},
      "history": {"epoch_loss": [...], "val_epoch": [...], "val_loss": [...]},
      "current": None | {               # None between rounds; else the round's tasks in progress:
          "tasks": [{"index": i,                    # the global task index (redrawn from it)
                     "generator": ByteTensor,       # the task's generator now
                     "task_fingerprint": str,       # sha256 of the task's class, tensors and scalars
                     "inner": {"params", "rule_state", "step", "grads", "loss"},  # rule_state as leaves
                     "extra": {name: inner dict | [Tensor, ...]}},   # the estimator's (PES: "neg", "noise")
                    ...],                           # one per task of the meta-batch, s = 0..T-1
          "epoch_losses": [Tensor, ...]},           # the round's segment losses so far
      "generators": {"torch_global": ByteTensor, "torch_global_by_rank": [ByteTensor, ...] (distributed)},
      "world_size": W,                  # processes of the run that wrote it (1 without torch.distributed)
      "provenance": {"l2o_version", "torch_version"},
    }

``epoch`` is the round in progress and ``segment`` the next truncation of its horizon. Tasks are
arbitrary objects, so they are not stored: a task in progress is redrawn from its global index
(:func:`~l2o.meta.schedules.task_generator`) and checked against its fingerprint. Resuming is
therefore exact for every task family whose ``sample`` depends on the generator alone (all of
``optimizees``); a family with hidden state of its own is refused when the redrawn task differs.
Because every task is drawn by its index, a run resumes on any number of ranks that divides the
meta-batch; only the global torch RNG states cannot map one to one (rank ``r`` takes the stored
state of rank ``r mod W``), which matters only to code that draws from the global RNG during
training (l2o's trainer, rules and optimizees do not).
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ..checkpoints import CheckpointError
from ..rules.base import Rule
from ..tasks import Task, TaskFamily
from ..tree import state_fill, state_leaves
from ..inner import InnerState
from ..validation import is_number
from .config import MetaTrainConfig
from .schedules import task_generator
from .slots import TaskSlot

__all__ = ["TrainingState", "TRAINER", "run_setup"]

#: The ``trainer`` name recorded in (and required of) this trainer's training states.
TRAINER = "meta_train"


def _empty_history() -> dict[str, list[float]]:
    return {"epoch_loss": [], "val_epoch": [], "val_loss": []}


@dataclass
class TrainingState:
    """Where a meta-training run stands: everything :func:`~l2o.meta.meta_train` changes as it goes,
    besides the meta-params and the meta-optimizer.

    Attributes:
        epoch: the round in progress (``config.epochs`` once done).
        segment: the next truncation of the round's horizon.
        meta_step: meta-steps taken or skipped so far.
        skipped / consecutive_skips: non-finite meta-steps, in all and in a row.
        seconds: time spent in earlier runs of a resumed training.
        history: per round ``"epoch_loss"``; per validation ``"val_epoch"`` and ``"val_loss"``.
        best_val / best_epoch / best_meta_params: the best validation so far and its weights
            (one ``state_dict`` per meta-trained module, by name).
        tasks: this process's tasks in progress (``None`` between rounds).
        epoch_losses: the round's segment losses so far.
    """

    epoch: int = 0
    segment: int = 0
    meta_step: int = 0
    skipped: int = 0
    consecutive_skips: int = 0
    seconds: float = 0.0
    history: dict[str, list[float]] = field(default_factory=_empty_history)
    best_val: float | None = None
    best_epoch: int | None = None
    best_meta_params: dict[str, dict[str, Tensor]] | None = None
    tasks: list[TaskSlot] | None = None
    epoch_losses: list[Tensor] = field(default_factory=list)

    def to_data(self, *, setup: dict[str, Any], modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
                checkpoint_every: int | None, seconds: float, world: int) -> dict[str, Any]:
        """This process's training-state file (in a distributed run, ``current["tasks"]`` holds its
        own tasks only: rank 0 gathers the others' before writing)."""
        from .. import __version__

        current = None
        if self.tasks is not None:
            for slot in self.tasks:
                if slot.fingerprint is None:
                    slot.fingerprint = _task_fingerprint(slot.task)
            current = {"tasks": [{"index": slot.index, "generator": slot.generator.get_state(),
                                  "task_fingerprint": slot.fingerprint, "inner": _inner_data(slot.inner),
                                  "extra": {k: _extra_data(v) for k, v in slot.extra.items()}}
                                 for slot in self.tasks],
                       "epoch_losses": list(self.epoch_losses)}
        best = None
        if self.best_meta_params is not None:
            best = {"meta_params": self.best_meta_params, "val_loss": self.best_val, "epoch": self.best_epoch}
        return {
            "trainer": TRAINER,
            **setup,
            "checkpoint_every": checkpoint_every,
            "meta_params": {name: m.state_dict() for name, m in modules.items()},
            "meta_optimizer": optimizer.state_dict(),
            "counters": {"epoch": self.epoch, "segment": self.segment, "meta_step": self.meta_step,
                         "skipped": self.skipped, "consecutive_skips": self.consecutive_skips, "seconds": seconds},
            "best": best,
            "history": self.history,
            "current": current,
            "generators": {"torch_global": torch.get_rng_state()},
            "world_size": world,
            "provenance": {"l2o_version": __version__, "torch_version": str(torch.__version__)},
        }

    @classmethod
    def restore(cls, data: dict[str, Any], source: str, *, setup: dict[str, Any], modules: dict[str, torch.nn.Module],
                optimizer: torch.optim.Optimizer, rule: Rule, family: TaskFamily, config: MetaTrainConfig,
                segments: Callable[[int], int], start_extra: Callable[[TaskSlot], dict[str, Any]],
                own: Sequence[int], rank: int, distributed: bool) -> TrainingState:
        """Check a loaded training state against this run and put it back: the modules' weights,
        the meta-optimizer, the global RNG, and the returned :class:`TrainingState`.

        ``segments(epoch)`` gives the truncations of a round; ``start_extra(slot)`` the estimator's
        state of a task just drawn (the template its stored state must fit); ``own`` this process's
        tasks of the meta-batch. On any failure nothing is left half-restored: the modules' weights
        and the global RNG are put back and a :class:`~l2o.checkpoints.CheckpointError` names the
        problem.
        """
        diffs = _differences({k: data.get(k) for k in setup}, setup)
        if diffs:
            raise CheckpointError(f"cannot resume from {source}: it was written by a different run; differing fields: "
                                  f"{'; '.join(diffs)}. Resume with the arguments of that run, or start a new one")
        backup = {name: copy.deepcopy(m.state_dict()) for name, m in modules.items()}
        global_rng = torch.get_rng_state()
        try:
            return _restore(data, source, modules=modules, optimizer=optimizer, rule=rule, family=family,
                            config=config, segments=segments, start_extra=start_extra, own=own, rank=rank,
                            distributed=distributed)
        except BaseException as exc:
            for name, state in backup.items():
                modules[name].load_state_dict(state)
            torch.set_rng_state(global_rng)
            if isinstance(exc, CheckpointError) or not isinstance(
                    exc, (KeyError, TypeError, ValueError, RuntimeError, IndexError, StopIteration, AttributeError)):
                raise
            raise CheckpointError(f"{source} is malformed and cannot be resumed ({type(exc).__name__}: {exc})") from None


def _plain(value: Any) -> Any:
    """``value`` as JSON-like plain data (tuples become lists, unknown objects their ``repr``), so
    that what a training state records and what a new run describes compare equal exactly when
    they are the same."""
    return json.loads(json.dumps(value, default=repr, sort_keys=True))


def _describe(obj: Any) -> dict[str, Any]:
    config = getattr(obj, "config", None)
    return _plain({"class": type(obj).__name__, "name": getattr(obj, "name", None),
                   "config": config() if callable(config) else None})


def run_setup(config: MetaTrainConfig, rule: Rule, family: TaskFamily, init: torch.nn.Module | None) -> dict[str, Any]:
    """What identifies a run: a resume must match all of it."""
    described = {k: v for k, v in config.to_dict().items() if k != "compile"}  # the same run, compiled or not
    setup = {"config": _plain(described), "rule": _describe(rule), "task_family": _describe(family)}
    if init is not None:
        setup["init"] = _plain({"class": type(init).__name__,
                                "params": {k: list(v.shape) for k, v in init.params().items()}})
    return setup


#: Tensors with more elements than this (typically a data set a task shares with its family) are
#: fingerprinted by dtype, shape and this many evenly spaced elements instead of all of them.
_FINGERPRINT_FULL_LIMIT = 1 << 20
_FINGERPRINT_SAMPLES = 4096


def _task_fingerprint(task: Task) -> str:
    """sha256 of a task: its class, and the tensors and plain scalars among its attributes
    (recursively through attributes that are objects, e.g. a wrapped task; 4 levels deep)."""
    digest = hashlib.sha256()
    _digest_object(digest, task, depth=0, seen=set())
    return digest.hexdigest()


def _digest_object(digest: Any, obj: Any, depth: int, seen: set[int]) -> None:
    digest.update(f"<{type(obj).__module__}.{type(obj).__qualname__}>".encode())
    if depth > 4 or id(obj) in seen or not hasattr(obj, "__dict__"):
        return
    seen.add(id(obj))
    attrs = vars(obj)
    for name in sorted(attrs):
        digest.update(b"\0" + str(name).encode())
        for leaf in state_leaves(attrs[name]):
            if isinstance(leaf, Tensor):
                _digest_tensor(digest, leaf)
            elif leaf is None or isinstance(leaf, (bool, int, float, complex, str, bytes, torch.dtype, torch.device)):
                digest.update(repr(leaf).encode())
            else:
                _digest_object(digest, leaf, depth + 1, seen)


def _digest_tensor(digest: Any, tensor: Tensor) -> None:
    t = tensor.detach()
    digest.update(f"{t.dtype}{tuple(t.shape)}{t.layout}".encode())
    if t.layout != torch.strided:
        return
    flat = t.reshape(-1)
    if flat.numel() > _FINGERPRINT_FULL_LIMIT:
        index = torch.arange(_FINGERPRINT_SAMPLES, device=flat.device) * (flat.numel() - 1) // (_FINGERPRINT_SAMPLES - 1)
        flat = flat[index]
    digest.update(flat.cpu().contiguous().view(torch.uint8).numpy())


def _inner_data(inner: InnerState) -> dict[str, Any]:
    return {"params": dict(inner.params), "rule_state": state_leaves(inner.rule_state), "step": inner.step,
            "grads": None if inner.grads is None else dict(inner.grads), "loss": inner.loss}


def _extra_data(value: Any) -> Any:
    """An estimator's per-task value as plain data: an inner state's dict, or a list of tensors."""
    return _inner_data(value) if isinstance(value, InnerState) else list(value)


def _differences(stored: Any, current: Any, where: str = "") -> list[str]:
    """Dotted names of the fields where two plain-data descriptions differ, with both values."""
    if isinstance(stored, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(stored) | set(current), key=str):
            name = f"{where}.{key}" if where else str(key)
            if key not in stored:
                out.append(f"{name} (not in the file, now {current[key]!r})")
            elif key not in current:
                out.append(f"{name} (in the file {stored[key]!r}, not now)")
            else:
                out.extend(_differences(stored[key], current[key], name))
        return out
    return [] if stored == current else [f"{where} (in the file {stored!r}, now {current!r})"]


def _tensors_like(got: Any, expected: dict[str, Tensor], where: str) -> dict[str, Tensor]:
    """``got`` if it is a dict of tensors with the keys, shapes and dtypes of ``expected``."""
    if not isinstance(got, dict) or set(got) != set(expected):
        found = sorted(got) if isinstance(got, dict) else type(got).__name__
        raise CheckpointError(f"{where}: expected tensors {sorted(expected)}, found {found}")
    for k, v in expected.items():
        t = got[k]
        if not isinstance(t, Tensor) or t.shape != v.shape or t.dtype != v.dtype:
            found = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
            raise CheckpointError(f"{where}: {k!r} is {found}, expected {tuple(v.shape)} {v.dtype}")
    return got


def _field(data: dict[str, Any], key: str, kinds: type | tuple[type, ...], source: str) -> Any:
    value = data.get(key) if isinstance(data, dict) else None
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise CheckpointError(f"{source} is malformed: {key!r} should be {names}, found {type(value).__name__}")
    return value


def _restore(data: dict[str, Any], source: str, *, modules: dict[str, torch.nn.Module],
             optimizer: torch.optim.Optimizer, rule: Rule, family: TaskFamily, config: MetaTrainConfig,
             segments: Callable[[int], int], start_extra: Callable[[TaskSlot], dict[str, Any]], own: Sequence[int],
             rank: int, distributed: bool) -> TrainingState:
    state = TrainingState()
    meta_params = _field(data, "meta_params", dict, source)
    if set(meta_params) != set(modules):
        raise CheckpointError(f"{source} holds meta-params of {sorted(meta_params)}; this run meta-trains {sorted(modules)}")
    for name, module in modules.items():
        module.load_state_dict(_tensors_like(meta_params[name], module.state_dict(), f"{source}: meta-params {name!r}"))
    optimizer.load_state_dict(_field(data, "meta_optimizer", dict, source))

    counters = _field(data, "counters", dict, source)
    for key in ("epoch", "segment", "meta_step", "skipped", "consecutive_skips"):
        value = _field(counters, key, int, f"{source} counters")
        if value < 0:
            raise CheckpointError(f"{source} is malformed: counter {key!r} is {value}")
    state.epoch, state.segment, state.meta_step = counters["epoch"], counters["segment"], counters["meta_step"]
    state.skipped, state.consecutive_skips = counters["skipped"], counters["consecutive_skips"]
    state.seconds = float(_field(counters, "seconds", (int, float), f"{source} counters"))
    if state.epoch > config.epochs or (state.epoch < config.epochs and state.segment >= segments(state.epoch)):
        raise CheckpointError(f"{source} is malformed: epoch {state.epoch}, segment {state.segment} do not fit "
                              f"{config.epochs} epochs of this run's truncations")

    history = _field(data, "history", dict, source)
    for key in ("epoch_loss", "val_epoch", "val_loss"):
        values = _field(history, key, list, f"{source} history")
        if not all(is_number(v) for v in values):
            raise CheckpointError(f"{source} is malformed: history {key!r} should hold numbers")
    state.history = {key: [float(v) for v in history[key]] for key in ("epoch_loss", "val_epoch", "val_loss")}

    best = data.get("best")
    if best is not None:
        best_params = _field(best, "meta_params", dict, f"{source} best")
        if set(best_params) != set(modules):
            raise CheckpointError(f"{source} holds best meta-params of {sorted(best_params)}; this run meta-trains "
                                  f"{sorted(modules)}")
        state.best_meta_params = {name: _tensors_like(best_params[name], m.state_dict(),
                                                      f"{source}: best meta-params {name!r}")
                                  for name, m in modules.items()}
        state.best_val = float(_field(best, "val_loss", (int, float), f"{source} best"))
        state.best_epoch = _field(best, "epoch", int, f"{source} best")

    generators = _field(data, "generators", dict, source)
    global_state = _field(generators, "torch_global", Tensor, f"{source} generators")
    by_rank = generators.get("torch_global_by_rank")
    if by_rank is not None:
        if not (isinstance(by_rank, list) and by_rank and all(isinstance(t, Tensor) for t in by_rank)):
            raise CheckpointError(f"{source} is malformed: 'torch_global_by_rank' should be a list of tensors")
        if distributed:  # the same rank's state; on another number of ranks, that of rank r mod W
            global_state = by_rank[rank % len(by_rank)]

    current = data.get("current")
    if current is None:
        if state.segment != 0:
            raise CheckpointError(f"{source} is malformed: it is at segment {state.segment} but holds no task in progress")
    else:
        tasks = _field(current, "tasks", list, f"{source} current")
        if len(tasks) != config.tasks_per_step:
            raise CheckpointError(f"{source} is malformed: it holds {len(tasks)} tasks in progress, the meta-batch "
                                  f"has {config.tasks_per_step}")
        state.tasks = [_restore_task(tasks[s], s, source, state.epoch, rule=rule, family=family, config=config,
                                     start_extra=start_extra) for s in own]
        epoch_losses = _field(current, "epoch_losses", list, f"{source} current")
        if len(epoch_losses) != state.segment or not all(isinstance(v, Tensor) for v in epoch_losses):
            raise CheckpointError(f"{source} is malformed: expected {state.segment} segment losses")
        state.epoch_losses = list(epoch_losses)
    torch.set_rng_state(global_state)
    return state


def _restore_task(entry: Any, s: int, source: str, epoch: int, *, rule: Rule, family: TaskFamily,
                  config: MetaTrainConfig, start_extra: Callable[[TaskSlot], dict[str, Any]]) -> TaskSlot:
    """Task ``s`` of the round in progress: redrawn from its index, checked, its state put back."""
    if not isinstance(entry, dict):
        raise CheckpointError(f"{source} is malformed: task {s} in progress is a {type(entry).__name__}")
    where = f"{source} current task {s}"
    index = _field(entry, "index", int, where)
    if index != epoch * config.tasks_per_step + s:
        raise CheckpointError(f"{where} is malformed: its index is {index}, expected "
                              f"{epoch * config.tasks_per_step + s} (epoch {epoch})")
    generator = task_generator(config.seed, index)
    task = family.sample(generator)
    fingerprint = _field(entry, "task_fingerprint", str, where)
    if _task_fingerprint(task) != fingerprint:
        raise CheckpointError(
            f"cannot resume from {source}: the task family drew a different task from the recorded generator "
            f"state than the run did, so the run cannot continue exactly (resuming needs a family whose "
            f"sample() depends on the generator alone)")
    inner = _restore_inner(_field(entry, "inner", dict, where), task, rule, where)
    slot = TaskSlot(index, task, generator, inner, fingerprint=fingerprint)
    template = start_extra(slot)
    stored = _field(entry, "extra", dict, where)
    if set(stored) != set(template):
        raise CheckpointError(f"{where}: the estimator's state holds {sorted(stored)}, expected {sorted(template)}")
    for key, want in template.items():
        if isinstance(want, InnerState):
            slot.extra[key] = _restore_inner(_field(stored, key, dict, where), task, rule, f"{where} {key}")
        else:
            got = _field(stored, key, list, where)
            if len(got) != len(want) or not all(isinstance(g, Tensor) and g.shape == w.shape and g.dtype == w.dtype
                                                for g, w in zip(got, want)):
                raise CheckpointError(f"{where}: the estimator's {key!r} does not match the meta-params")
            slot.extra[key] = [g.to(w.device) for g, w in zip(got, want)]
    generator.set_state(_field(entry, "generator", Tensor, where))
    return slot


def _restore_inner(inner: dict[str, Any], task: Task, rule: Rule, source: str) -> InnerState:
    """The :class:`InnerState` of a task in progress, checked against the task's and the rule's shapes."""
    template = task.init(torch.Generator().manual_seed(0))
    params = _tensors_like(inner.get("params"), template, f"{source}: params in progress")
    leaves = _field(inner, "rule_state", list, f"{source} current inner")
    expected = state_leaves(rule.init(params))
    if len(leaves) != len(expected):
        raise CheckpointError(f"{source}: the rule state in progress has {len(leaves)} leaves, the rule's has "
                              f"{len(expected)}")
    for i, (got, want) in enumerate(zip(leaves, expected)):
        if isinstance(want, Tensor) and not (isinstance(got, Tensor) and got.shape == want.shape
                                             and got.dtype == want.dtype):
            raise CheckpointError(f"{source}: leaf {i} of the rule state in progress does not match the rule's state")
    rule_state = state_fill(rule.init(params), iter(leaves))
    step = _field(inner, "step", int, f"{source} current inner")
    grads = inner.get("grads")
    if grads is not None:
        grads = _tensors_like(grads, template, f"{source}: grads in progress")
    loss = inner.get("loss")
    if loss is not None and not isinstance(loss, Tensor):
        raise CheckpointError(f"{source} is malformed: the loss in progress is a {type(loss).__name__}")
    return InnerState(params, rule_state, step, grads, loss)
