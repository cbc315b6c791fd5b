"""Checkpoints are data: a plain dict saved with ``torch.save`` and loaded with ``weights_only=True``.

Format (``format_version`` 1)::

    {
        "format": "l2o.rule",
        "format_version": 1,
        "rule": "lstm",                 # registry name of the rule class
        "config": {...},                # keyword arguments that rebuild it
        "state_dict": {...},            # its meta-params (tensors)
        "provenance": {...},            # task, seed, steps, library version, ... (plain data)
    }

Loading never unpickles arbitrary objects, so a checkpoint can never run code; anything that is
not this format is refused with a :class:`CheckpointError` saying what was found and what was
expected.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

from .rules import RULES
from .rules.base import Rule

__all__ = [
    "CheckpointError",
    "FORMAT",
    "FORMAT_VERSION",
    "save_rule",
    "load_rule",
    "load_checkpoint",
    "rule_from_checkpoint",
    "atomic_save",
    "plain_data",
]

FORMAT = "l2o.rule"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file is missing, unsafe, malformed or does not match what was expected."""


def save_rule(path: str | os.PathLike, rule: Rule, provenance: dict[str, Any] | None = None) -> Path:
    """Write ``rule`` as a checkpoint dict to ``path`` (atomically: temp file, fsync, rename)."""
    from . import __version__

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
    """``torch.save`` to a temporary file in the same directory, fsync, then rename over ``path``.

    A crash during the write never leaves a half-written file in place of the previous one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a checkpoint dict (never runs code from the file)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist (write one with `l2o meta-train --out {path}`)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refusing to load {str(path)!r}: it is not a plain-data l2o checkpoint and loading it would "
            f"require unpickling arbitrary Python objects, which can run code ({exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"could not read checkpoint {str(path)!r}: the file is truncated or not a torch.save file ({exc})") from None
    return validate_checkpoint(data, source=str(path))


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
    return data


def rule_from_checkpoint(data: dict[str, Any], source: str = "checkpoint") -> Rule:
    """Rebuild the rule a validated checkpoint dict describes, with its weights."""
    cls = RULES[data["rule"]]
    try:
        rule = cls(**data["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source} has a config that {cls.__name__} does not accept: {exc}") from None
    expected = rule.state_dict()
    got = data["state_dict"]
    if expected.keys() != got.keys():
        raise CheckpointError(
            f"{source}: the weights do not match the config: expected keys {sorted(expected)}, found {sorted(got)}"
        )
    for k, v in expected.items():
        if not isinstance(got[k], torch.Tensor) or got[k].shape != v.shape:
            shape = tuple(got[k].shape) if isinstance(got[k], torch.Tensor) else type(got[k]).__name__
            raise CheckpointError(f"{source}: weight {k!r} has shape {shape}, the config implies {tuple(v.shape)}")
    rule.load_state_dict(got)
    return rule


def load_rule(path: str | os.PathLike) -> Rule:
    """Load a rule saved by :func:`save_rule` (or ``l2o meta-train``)."""
    return rule_from_checkpoint(load_checkpoint(path), source=str(path))
