"""Training states of :func:`l2o.meta.meta_train`: what the loop's state is, how a resumable run
writes it (plain data, see the format in :mod:`l2o.meta.trainer`) and how a run is restored.

The loop's mutable state is :class:`_Loop` (counters, history, best weights) with one
:class:`_Slot` per task in progress; :func:`_training_state` turns them (with the meta-params,
the meta-optimizer and the generators) into the dict :func:`l2o.checkpoints.save_training_state`
writes, and :func:`_restore` checks a loaded one against the run and puts it back.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..checkpoints import CheckpointError
from ..rules.base import Rule
from ..tasks import Task, TaskFamily
from ..tree import state_fill, state_leaves
from ..unroll import InnerState

if TYPE_CHECKING:
    from .trainer import MetaTrainConfig, _Dist

#: The ``trainer`` name recorded in (and required of) this trainer's training states.
TRAINER = "meta_train"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class _Loop:
    """Everything the meta-training loop changes: what a training state stores (besides the
    meta-params, the meta-optimizer and the generators)."""

    epoch: int = 0  # the epoch in progress (config.epochs once done)
    segment: int = 0  # the next truncation of the epoch's horizon
    meta_step: int = 0
    skipped: int = 0
    consecutive: int = 0
    seconds: float = 0.0  # spent in earlier runs of a resumed training
    history: dict[str, list[float]] = field(default_factory=lambda: {"epoch_loss": [], "val_epoch": [], "val_loss": []})
    best_val: float | None = None
    best_epoch: int | None = None
    best_state: dict[str, dict[str, Tensor]] | None = None
    # this process's tasks in progress (None between epochs): one, or its share of the meta-batch
    slots: list[_Slot] | None = None
    epoch_losses: list[Tensor] = field(default_factory=list)


@dataclass
class _Slot:
    """One task in progress and where its inner optimisation stands."""

    task: Task
    generator: torch.Generator  # draws its batches (the shared training generator when tasks_per_step == 1)
    inner: InnerState
    index: int | None = None  # its global task index in a meta-batch run (None: the single-task stream)
    gen_state: Tensor | None = None  # single-task stream: the generator's state just before the task was drawn
    fingerprint: str | None = None  # computed when first needed (a training state)


def task_generator(seed: int, index: int) -> torch.Generator:
    """The generator of global task ``index`` in a meta-batch run (``tasks_per_step > 1``): seeded by
    a hash of ``(seed, index)``, so any process can draw any task of the run by its index alone."""
    digest = hashlib.sha256(f"l2o.meta_train.task:{seed}:{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


# ---------------------------------------------------------------------------------------------
# Training states: what is written, and how a run is restored from one.


def _plain(value: Any) -> Any:
    """``value`` as JSON-like plain data (tuples become lists, unknown objects their ``repr``), so
    that what a training state records and what a new run describes compare equal exactly when
    they are the same."""
    return json.loads(json.dumps(value, default=repr, sort_keys=True))


def _describe(obj: Any) -> dict[str, Any]:
    config = getattr(obj, "config", None)
    return _plain({"class": type(obj).__name__, "name": getattr(obj, "name", None),
                   "config": config() if callable(config) else None})


def _setup(config: MetaTrainConfig, rule: Rule, family: TaskFamily, init: torch.nn.Module | None) -> dict[str, Any]:
    """What identifies a run: a resume must match all of it."""
    setup = {"config": _plain(config.to_dict()), "rule": _describe(rule), "task_family": _describe(family)}
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


def _inner_state(inner: InnerState) -> dict[str, Any]:
    return {"params": dict(inner.params), "rule_state": state_leaves(inner.rule_state), "step": inner.step,
            "grads": None if inner.grads is None else dict(inner.grads), "loss": inner.loss}


def _training_state(loop: _Loop, setup: dict[str, Any], modules: dict[str, torch.nn.Module],
                    optimizer: torch.optim.Optimizer, gen: torch.Generator, checkpoint_every: int | None,
                    seconds: float, dist: _Dist) -> dict[str, Any]:
    """This rank's training state (in a distributed run, ``current["tasks"]`` holds its own tasks only)."""
    from .. import __version__

    current = None
    if loop.slots is not None:
        for slot in loop.slots:
            if slot.fingerprint is None:
                slot.fingerprint = _task_fingerprint(slot.task)
        if loop.slots[0].index is None:  # the single-task stream
            slot = loop.slots[0]
            current = {"task_generator_state": slot.gen_state, "task_fingerprint": slot.fingerprint,
                       "inner": _inner_state(slot.inner), "epoch_losses": list(loop.epoch_losses)}
        else:
            current = {"tasks": [{"index": slot.index, "generator": slot.generator.get_state(),
                                  "task_fingerprint": slot.fingerprint, "inner": _inner_state(slot.inner)}
                                 for slot in loop.slots],
                       "epoch_losses": list(loop.epoch_losses)}
    best = None
    if loop.best_state is not None:
        best = {"meta_params": loop.best_state, "val_loss": loop.best_val, "epoch": loop.best_epoch}
    return {
        "trainer": TRAINER,
        **setup,
        "checkpoint_every": checkpoint_every,
        "meta_params": {name: m.state_dict() for name, m in modules.items()},
        "meta_optimizer": optimizer.state_dict(),
        "counters": {"epoch": loop.epoch, "segment": loop.segment, "meta_step": loop.meta_step,
                     "skipped": loop.skipped, "consecutive_skips": loop.consecutive, "seconds": seconds},
        "best": best,
        "history": loop.history,
        "current": current,
        "generators": {"train": gen.get_state(), "torch_global": torch.get_rng_state()},
        "world_size": dist.world,
        "provenance": {"l2o_version": __version__, "torch_version": str(torch.__version__)},
    }


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
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,))):
        names = " or ".join(k.__name__ for k in (kinds if isinstance(kinds, tuple) else (kinds,)))
        raise CheckpointError(f"{source} is malformed: {key!r} should be {names}, found {type(value).__name__}")
    return value


def _restore(data: dict[str, Any], source: str, loop: _Loop, *, setup: dict[str, Any],
             modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer, rule: Rule, family: TaskFamily,
             gen: torch.Generator, config: MetaTrainConfig, segments: int, keep_task_gen_state: bool, dist: _Dist,
             own: range) -> None:
    """Load a validated training state into the loop, modules, optimizer and generators.

    On any failure nothing is left half-restored: the modules' weights are put back and a
    :class:`CheckpointError` names the problem.
    """
    stored = {k: data.get(k) for k in setup}
    if isinstance(stored.get("config"), dict) and "tasks_per_step" not in stored["config"]:
        stored["config"] = {**stored["config"], "tasks_per_step": 1}  # written before meta-batches existed
    diffs = _differences(stored, setup)
    if diffs:
        raise CheckpointError(f"cannot resume from {source}: it was written by a different run; differing fields: "
                              f"{'; '.join(diffs)}. Resume with the arguments of that run, or start a new one")
    backup = {name: copy.deepcopy(m.state_dict()) for name, m in modules.items()}
    global_rng = torch.get_rng_state()
    try:
        _restore_unchecked(data, source, loop, modules=modules, optimizer=optimizer, rule=rule, family=family,
                           gen=gen, config=config, segments=segments, keep_task_gen_state=keep_task_gen_state,
                           dist=dist, own=own)
    except BaseException as exc:
        for name, state in backup.items():
            modules[name].load_state_dict(state)
        torch.set_rng_state(global_rng)
        if isinstance(exc, CheckpointError) or not isinstance(
                exc, (KeyError, TypeError, ValueError, RuntimeError, IndexError, StopIteration, AttributeError)):
            raise
        raise CheckpointError(f"{source} is malformed and cannot be resumed ({type(exc).__name__}: {exc})") from None


def _restore_unchecked(data: dict[str, Any], source: str, loop: _Loop, *, modules: dict[str, torch.nn.Module],
                       optimizer: torch.optim.Optimizer, rule: Rule, family: TaskFamily, gen: torch.Generator,
                       config: MetaTrainConfig, segments: int, keep_task_gen_state: bool, dist: _Dist,
                       own: range) -> None:
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
    loop.epoch, loop.segment, loop.meta_step = counters["epoch"], counters["segment"], counters["meta_step"]
    loop.skipped, loop.consecutive = counters["skipped"], counters["consecutive_skips"]
    loop.seconds = float(_field(counters, "seconds", (int, float), f"{source} counters"))
    if loop.epoch > config.epochs or loop.segment >= segments or loop.meta_step > config.epochs * segments:
        raise CheckpointError(f"{source} is malformed: epoch {loop.epoch}, segment {loop.segment}, meta-step "
                              f"{loop.meta_step} do not fit {config.epochs} epochs of {segments} truncations")

    history = _field(data, "history", dict, source)
    for key in ("epoch_loss", "val_epoch", "val_loss"):
        values = _field(history, key, list, f"{source} history")
        if not all(_is_number(v) for v in values):
            raise CheckpointError(f"{source} is malformed: history {key!r} should hold numbers")
    loop.history = {key: [float(v) for v in history[key]] for key in ("epoch_loss", "val_epoch", "val_loss")}

    best = data.get("best")
    if best is not None:
        best_params = _field(best, "meta_params", dict, f"{source} best")
        if set(best_params) != set(modules):
            raise CheckpointError(f"{source} holds best meta-params of {sorted(best_params)}; this run meta-trains "
                                  f"{sorted(modules)}")
        loop.best_state = {name: _tensors_like(best_params[name], m.state_dict(), f"{source}: best meta-params {name!r}")
                           for name, m in modules.items()}
        loop.best_val = float(_field(best, "val_loss", (int, float), f"{source} best"))
        loop.best_epoch = _field(best, "epoch", int, f"{source} best")

    generators = _field(data, "generators", dict, source)
    train_state = _field(generators, "train", Tensor, f"{source} generators")
    global_state = _field(generators, "torch_global", Tensor, f"{source} generators")
    by_rank = generators.get("torch_global_by_rank")
    if by_rank is not None:
        if not (isinstance(by_rank, list) and by_rank and all(isinstance(t, Tensor) for t in by_rank)):
            raise CheckpointError(f"{source} is malformed: 'torch_global_by_rank' should be a list of tensors")
        if dist.active:  # the same rank's state; on another number of ranks, that of rank r mod W
            global_state = by_rank[dist.rank % len(by_rank)]
    current = data.get("current")
    if current is None:
        if loop.segment != 0:
            raise CheckpointError(f"{source} is malformed: it is at segment {loop.segment} but holds no task in progress")
    elif config.tasks_per_step == 1:
        _field(current, "task_generator_state", Tensor, f"{source} current")
        gen.set_state(current["task_generator_state"])
        task = family.sample(gen)
        fingerprint = _field(current, "task_fingerprint", str, f"{source} current")
        _check_fingerprint(task, fingerprint, source)
        inner = _restore_inner(_field(current, "inner", dict, f"{source} current"), task, rule, source)
        gen_state = current["task_generator_state"] if keep_task_gen_state else None
        loop.slots = [_Slot(task, gen, inner, gen_state=gen_state, fingerprint=fingerprint)]
    else:
        tasks = _field(current, "tasks", list, f"{source} current")
        if len(tasks) != config.tasks_per_step:
            raise CheckpointError(f"{source} is malformed: it holds {len(tasks)} tasks in progress, the meta-batch "
                                  f"has {config.tasks_per_step}")
        loop.slots = []
        for s in own:
            entry = tasks[s]
            if not isinstance(entry, dict):
                raise CheckpointError(f"{source} is malformed: task {s} in progress is a {type(entry).__name__}")
            where = f"{source} current task {s}"
            index = _field(entry, "index", int, where)
            if index != loop.epoch * config.tasks_per_step + s:
                raise CheckpointError(f"{where} is malformed: its index is {index}, expected "
                                      f"{loop.epoch * config.tasks_per_step + s} (epoch {loop.epoch})")
            g = task_generator(config.seed, index)
            task = family.sample(g)
            fingerprint = _field(entry, "task_fingerprint", str, where)
            _check_fingerprint(task, fingerprint, source)
            inner = _restore_inner(_field(entry, "inner", dict, where), task, rule, where)
            g.set_state(_field(entry, "generator", Tensor, where))
            loop.slots.append(_Slot(task, g, inner, index=index, fingerprint=fingerprint))
    if current is not None:
        epoch_losses = _field(current, "epoch_losses", list, f"{source} current")
        if len(epoch_losses) != loop.segment or not all(isinstance(v, Tensor) for v in epoch_losses):
            raise CheckpointError(f"{source} is malformed: expected {loop.segment} segment losses")
        loop.epoch_losses = list(epoch_losses)
    gen.set_state(train_state)
    torch.set_rng_state(global_state)


def _check_fingerprint(task: Task, fingerprint: str, source: str) -> None:
    if _task_fingerprint(task) != fingerprint:
        raise CheckpointError(
            f"cannot resume from {source}: the task family drew a different task from the recorded generator "
            f"state than the run did, so the run cannot continue exactly (resuming needs a family whose "
            f"sample() depends on the generator alone)")


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
