"""Checkpoints are data: a plain dict saved with ``torch.save`` and loaded with ``weights_only=True``.

Format (``format_version`` 1)::

    {
        "format": "l2o.rule",
        "format_version": 1,
        "rule": "lstm",                 # registry name of the rule class
        "config": {...},                # keyword arguments that rebuild it
        "state_dict": {...},            # its meta-params (tensors)
        "provenance": {...},            # task, seed, steps, library version, ... (plain data)
        "init": {...},                  # MAML only: the learned initial params θ0 (tensors)
    }

Loading never unpickles arbitrary objects, so a checkpoint can never run code; anything that is
not this format is refused with a :class:`CheckpointError` saying what was found and what was
expected.

**Training states** (what ``meta_train(checkpoint_path=...)`` and ``l2o meta-train
--checkpoint-every N`` write, to resume a run exactly) are plain-data dicts of the same kind::

    {
        "format": "l2o.training_state",
        "format_version": 2,
        "trainer": "meta_train",        # the trainer that wrote it (and alone may resume it)
        ...                             # the trainer's own keys (see l2o.meta.training_state)
    }

read by :func:`load_training_state` with ``weights_only=True`` as well. Every file is written by
:func:`atomic_save`: a temporary file in the same directory, flushed and fsynced, renamed over the
target with ``os.replace`` and the directory fsynced, so a crash at any moment leaves either the
previous file or the new one, never a half-written one.
"""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from .fileio import atomic_write
from .rules import RULES
from .rules.base import Rule

__all__ = [
    "CheckpointError",
    "FORMAT",
    "FORMAT_VERSION",
    "save_rule",
    "load_init",
    "load_rule",
    "load_checkpoint",
    "rule_from_checkpoint",
    "atomic_save",
    "plain_data",
    "TRAINING_STATE_FORMAT",
    "TRAINING_STATE_VERSION",
    "save_training_state",
    "load_training_state",
    "validate_training_state",
]

FORMAT = "l2o.rule"
FORMAT_VERSION = 1
#: ``format`` / ``format_version`` of a training-state file (see the module docstring).
TRAINING_STATE_FORMAT = "l2o.training_state"
TRAINING_STATE_VERSION = 2


class CheckpointError(ValueError):
    """A checkpoint file is missing, unsafe, malformed or does not match what was expected."""


def save_rule(path: str | os.PathLike, rule: Rule, provenance: dict[str, Any] | None = None, *,
              init: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``rule`` as a checkpoint dict to ``path`` (atomically: temp file, fsync, rename).

    ``init`` (MAML) adds the learned initial params θ0, keyed like the model's ``named_parameters()``;
    read them back with :func:`load_init`.
    """
    from . import __version__

    if not isinstance(rule, Rule):
        order = " (the arguments are save_rule(path, rule))" if isinstance(rule, (str, os.PathLike)) else ""
        raise TypeError(f"save_rule: rule must be an l2o Rule, got {type(rule).__name__}{order}")
    if rule.name not in RULES:
        raise CheckpointError(f"rule {type(rule).__name__} (name {rule.name!r}) is not registered in l2o.rules.RULES")
    data = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "rule": rule.name,
        "config": plain_data(rule.config(), "config"),
        "state_dict": {k: v.detach().cpu().clone() for k, v in rule.state_dict().items()},
        "provenance": plain_data(
            {"l2o_version": __version__, "torch_version": str(torch.__version__), **(provenance or {})}, "provenance"
        ),
    }
    if init is not None:
        if not isinstance(init, dict) or not all(isinstance(v, torch.Tensor) for v in init.values()):
            raise TypeError("init must be a dict of tensors (e.g. l2o.MAMLInit(model).params())")
        data["init"] = {str(k): v.detach().cpu().clone() for k, v in init.items()}
    return atomic_save(data, path)


def plain_data(obj: Any, where: str = "value") -> Any:
    """``obj`` as plain data (dict/list/str/int/float/bool/None), which ``weights_only`` loads.

    ``str``/``int``/``float`` subclasses become the base type, tuples become lists, paths become
    strings; anything else raises ``TypeError`` naming where it was found.
    """
    if obj is None or type(obj) in (bool, int, float, str):
        return obj
    if isinstance(obj, bool):
        return bool(obj)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, (str, os.PathLike)):
        return str(obj)
    if isinstance(obj, (list, tuple)):
        return [plain_data(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"{where} has a non-string key {k!r}")
            out[str(k)] = plain_data(v, f"{where}[{k!r}]")
        return out
    raise TypeError(f"{where} holds a {type(obj).__name__}, which a checkpoint cannot store as plain data")


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically; return ``path`` as a :class:`~pathlib.Path`.

    Written by :func:`l2o.fileio.atomic_write`: a new temporary file in the same directory, flushed
    and fsynced, renamed over ``path`` with ``os.replace`` and the directory fsynced. A crash at any
    moment leaves either the previous file or the new one in place, never a half-written one; a
    crash before the rename can at worst leave a stray ``.<name>.<pid>.<random>.tmp`` file next to
    it. On an error the temporary file is removed and the previous file is untouched.
    """
    return atomic_write(path, lambda fh: torch.save(obj, fh))


def _safe_load(path: Path, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` with every failure turned into a :class:`CheckpointError`."""
    try:
        with warnings.catch_warnings():  # a garbage file makes torch warn about its "pickle protocol" first
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refusing to load {str(path)!r}: it is not a plain-data l2o {what} and loading it would "
            f"require unpickling arbitrary Python objects, which can run code ({exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    except Exception as exc:  # noqa: BLE001 - a damaged file can fail anywhere in torch.load (IndexError, KeyError, ...)
        raise CheckpointError(
            f"could not read {what} {str(path)!r}: the file is truncated or not a torch.save file "
            f"({type(exc).__name__}: {exc})"
        ) from None


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a checkpoint dict (never runs code from the file)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist (write one with `l2o meta-train --out {path}`)")
    return validate_checkpoint(_safe_load(path, "checkpoint"), source=str(path))


def validate_checkpoint(data: Any, source: str = "checkpoint") -> dict[str, Any]:
    """Check the structure of a loaded checkpoint dict and return it."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = f"a dict with format {data.get('format')!r}" if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"{source} is not an l2o rule checkpoint: expected a dict with format {FORMAT!r}, found {found}")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{source} has format_version {version!r}; this l2o reads format_version {FORMAT_VERSION}")
    for key, kind in (("rule", str), ("config", dict), ("state_dict", dict), ("provenance", dict)):
        if not isinstance(data.get(key), kind):
            raise CheckpointError(f"{source} is malformed: {key!r} should be a {kind.__name__}, found {type(data.get(key)).__name__}")
    if data["rule"] not in RULES:
        raise CheckpointError(f"{source} holds an unknown rule {data['rule']!r}; known rules: {', '.join(sorted(RULES))}")
    init = data.get("init")
    if init is not None and not (isinstance(init, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                                for k, v in init.items())):
        raise CheckpointError(f"{source} is malformed: 'init' should map parameter names to tensors")
    return data


def load_init(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The learned initial params θ0 of a MAML checkpoint (written by ``l2o maml``).

    Load them into the model with ``model.load_state_dict(load_init(path), strict=False)`` or use
    them functionally. Raises :class:`CheckpointError` when the checkpoint holds no ``init``.
    """
    data = load_checkpoint(path)
    if data.get("init") is None:
        raise CheckpointError(f"{str(path)!r} holds a rule but no learned initialisation (it was not written by "
                              "`l2o maml`); load the rule with load_rule")
    return data["init"]


def rule_from_checkpoint(data: dict[str, Any], source: str = "checkpoint") -> Rule:
    """Rebuild the rule a validated checkpoint dict describes, with its weights."""
    cls = RULES[data["rule"]]
    try:  # first on the meta device: a config asking for huge weights allocates nothing before the check
        with torch.device("meta"):
            probe = cls(**data["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source} has a config that {cls.__name__} does not accept: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - e.g. sizes whose storage size overflows
        raise CheckpointError(f"{source} has a config that {cls.__name__} cannot be built from: "
                              f"{type(exc).__name__}: {exc}") from None
    expected = probe.state_dict()
    got = data["state_dict"]
    if expected.keys() != got.keys():
        raise CheckpointError(
            f"{source}: the weights do not match the config: expected keys {sorted(expected)}, "
            f"found {sorted(map(str, got))}"
        )
    for k, v in expected.items():
        if not isinstance(got[k], torch.Tensor) or got[k].shape != v.shape:
            shape = tuple(got[k].shape) if isinstance(got[k], torch.Tensor) else type(got[k]).__name__
            raise CheckpointError(f"{source}: weight {k!r} has shape {shape}, the config implies {tuple(v.shape)}")
        if not got[k].is_floating_point() or got[k].layout != torch.strided:
            raise CheckpointError(f"{source}: weight {k!r} is a {got[k].dtype} tensor ({got[k].layout}); "
                                  "expected dense floating-point weights")
    rule = cls(**data["config"])
    rule.load_state_dict(got)
    return rule


def load_rule(path: str | os.PathLike) -> Rule:
    """Load a rule saved by :func:`save_rule` (or ``l2o meta-train``)."""
    return rule_from_checkpoint(load_checkpoint(path), source=str(path))


def save_training_state(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write a training-state dict (see :func:`validate_training_state`) atomically to ``path``.

    ``format`` and ``format_version`` are filled in; the rest is the trainer's plain data
    (tensors, numbers, strings, lists, tuples, dicts). It is checked before anything is written.
    """
    data = {"format": TRAINING_STATE_FORMAT, "format_version": TRAINING_STATE_VERSION, **state}
    validate_training_state(data, source="the training state to save")
    return atomic_save(data, path)


def load_training_state(path: str | os.PathLike, trainer: str | None = None) -> dict[str, Any]:
    """Read and validate a training-state file (never runs code from the file).

    Args:
        path: a file written by :func:`save_training_state` (e.g. ``l2o meta-train --checkpoint-every``).
        trainer: when given, the file must have been written by this trainer (e.g. ``"meta_train"``).

    Raises:
        CheckpointError: the file is missing, unsafe (needs arbitrary unpickling), truncated, of
            another format or format version, or from another trainer.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"a training-state path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"training state {str(path)!r} does not exist (write one with "
                              "`l2o meta-train ... --checkpoint-every N` or meta_train(checkpoint_path=..., "
                              "checkpoint_every=N))")
    return validate_training_state(_safe_load(path, "training state"), source=str(path), trainer=trainer)


def validate_training_state(data: Any, source: str = "training state", trainer: str | None = None) -> dict[str, Any]:
    """Check the envelope of a loaded training state (format, version, trainer) and return it."""
    if not isinstance(data, dict) or data.get("format") != TRAINING_STATE_FORMAT:
        if isinstance(data, dict):
            found = f"a dict with format {data.get('format')!r}"
            if data.get("format") == FORMAT:
                found += " (a rule checkpoint: pass it to load_rule, or resume from the training-state file)"
        else:
            found = type(data).__name__
        raise CheckpointError(f"{source} is not an l2o training state: expected a dict with format "
                              f"{TRAINING_STATE_FORMAT!r}, found {found}")
    version = data.get("format_version")
    if version != TRAINING_STATE_VERSION:
        older = (" (written by l2o 0.1.0, whose runs drew a single task from one shared stream: resume it with "
                 "that version, or start the run again)" if version == 1 else "")
        raise CheckpointError(f"{source} has training-state format_version {version!r}; this l2o reads "
                              f"format_version {TRAINING_STATE_VERSION}{older}")
    if not isinstance(data.get("trainer"), str):
        raise CheckpointError(f"{source} is malformed: 'trainer' should be a str, found {type(data.get('trainer')).__name__}")
    if trainer is not None and data["trainer"] != trainer:
        raise CheckpointError(f"{source} was written by the {data['trainer']!r} trainer; it cannot resume {trainer!r}")
    return data
