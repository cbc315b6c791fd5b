"""Pretrained rules shipped with l2o: small checkpoint files plus a JSON index with checksums.

``index.json`` (next to this file) is plain JSON, never a pickle::

    {
      "format_version": 1,
      "rules": [
        {
          "name": "quadratic",                  # a readable word, never a run id
          "file": "quadratic.pt",               # a checkpoint in this directory (l2o.save_rule format)
          "sha256": "<hex digest of the file>",
          "description": "what it is and where it is expected to work",
          "task": "the task family it was meta-trained on",
          "config": {...},                      # the rule's config(), checked against the checkpoint
          "command": "l2o meta-train ..."       # the command that produced the file
        }
      ]
    }

:func:`load_pretrained` verifies the file's SHA-256 against the index before reading it, then
loads it with :func:`l2o.checkpoints.load_rule` (``torch.load(weights_only=True)``). To add a rule,
save it with :func:`l2o.save_rule` into this directory and append ``make_index_entry(...)`` to the
index's ``"rules"``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from ..checkpoints import CheckpointError, load_checkpoint, load_rule, plain_data
from ..rules.base import Rule

__all__ = ["INDEX_PATH", "INDEX_FORMAT_VERSION", "list_pretrained", "load_pretrained", "make_index_entry",
           "sha256_file"]

#: Where the index is read from (a module-level variable so tests can point it elsewhere).
INDEX_PATH: Path = Path(__file__).resolve().parent / "index.json"
INDEX_FORMAT_VERSION = 1

_REQUIRED = {"name": str, "file": str, "sha256": str, "description": str, "task": str, "config": dict,
             "command": str}
_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_index() -> tuple[Path, list[dict[str, Any]]]:
    path = Path(INDEX_PATH)
    if not path.is_file():
        raise CheckpointError(f"the pretrained index {str(path)!r} is missing (a broken l2o installation?)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"the pretrained index {str(path)!r} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format_version") != INDEX_FORMAT_VERSION:
        found = data.get("format_version") if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"the pretrained index {str(path)!r} has format_version {found!r}; this l2o reads "
                              f"format_version {INDEX_FORMAT_VERSION}")
    rules = data.get("rules")
    if not isinstance(rules, list):
        raise CheckpointError(f"the pretrained index {str(path)!r} is malformed: 'rules' should be a list")
    seen: set[str] = set()
    for i, entry in enumerate(rules):
        where = f"entry {i} of the pretrained index {str(path)!r}"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where} is a {type(entry).__name__}, expected an object")
        for key, kind in _REQUIRED.items():
            if not isinstance(entry.get(key), kind):
                raise CheckpointError(f"{where} is malformed: {key!r} should be a {kind.__name__}, "
                                      f"found {type(entry.get(key)).__name__}")
        name = entry["name"]
        if not _NAME.match(name):
            raise CheckpointError(f"{where} has name {name!r}; names are lower-case words ([a-z][a-z0-9_-]*)")
        if name in seen:
            raise CheckpointError(f"{where} repeats the name {name!r}")
        seen.add(name)
        file = entry["file"]
        if Path(file).name != file or file in ("", ".", ".."):
            raise CheckpointError(f"{where} has file {file!r}; it must be a bare file name in the index's directory")
        if not re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]):
            raise CheckpointError(f"{where} has sha256 {entry['sha256']!r}; expected 64 lower-case hex digits")
    return path.parent, rules


def list_pretrained() -> list[dict[str, Any]]:
    """The shipped pretrained rules: one dict per rule (name, file, sha256, description, task,
    config, command, and any further keys the index records), in index order."""
    _, rules = _read_index()
    return [json.loads(json.dumps(entry)) for entry in rules]  # deep copies: callers cannot edit the index


def load_pretrained(name: str) -> Rule:
    """Load the shipped rule ``name`` after checking its file's SHA-256 against the index.

    Raises ``ValueError`` for an unknown name (listing the known ones) and
    :class:`~l2o.checkpoints.CheckpointError` for a missing or altered file.
    """
    if not isinstance(name, str):
        raise TypeError(f"pretrained must be the name of a shipped rule (a str), got {type(name).__name__}")
    directory, rules = _read_index()
    by_name = {entry["name"]: entry for entry in rules}
    if name not in by_name:
        known = ", ".join(repr(n) for n in by_name) or "none are shipped in this installation"
        raise ValueError(f"unknown pretrained rule {name!r}; known pretrained rules: {known} "
                         "(see l2o.list_pretrained(); or load your own with checkpoint=PATH)")
    entry = by_name[name]
    path = directory / entry["file"]
    if not path.is_file():
        raise CheckpointError(f"pretrained rule {name!r}: its file {str(path)!r} is missing (a broken installation?)")
    found = sha256_file(path)
    if found != entry["sha256"]:
        raise CheckpointError(
            f"pretrained rule {name!r}: checksum mismatch for {str(path)!r}: the index expects sha256 "
            f"{entry['sha256']}, the file has {found}; the file is corrupt or was replaced, so it is not loaded"
        )
    rule = load_rule(path)
    config = plain_data(rule.config(), "config")
    if config != entry["config"]:
        raise CheckpointError(
            f"pretrained rule {name!r}: {str(path)!r} holds a {rule.name} rule with config {config}, but the index "
            f"records config {entry['config']}"
        )
    return rule


def make_index_entry(name: str, file: str | os.PathLike, *, description: str, task: str, command: str,
                     **extra: Any) -> dict[str, Any]:
    """An index entry for the checkpoint ``file`` (its sha256 and the rule's config are read from it).

    ``extra`` keys (plain data, e.g. ``"trained_on"``) are recorded as well.
    """
    path = Path(file)
    data = load_checkpoint(path)
    if not _NAME.match(name):
        raise ValueError(f"name {name!r} should be a lower-case word ([a-z][a-z0-9_-]*), not a run id")
    entry = {
        "name": name,
        "file": path.name,
        "sha256": sha256_file(path),
        "description": description,
        "task": task,
        "config": plain_data(data["config"], "config"),
        "command": command,
    }
    entry.update(plain_data(extra, "extra"))
    return entry
