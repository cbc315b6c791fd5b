"""What a meta-training run returns, and how it fails."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..rules.base import Rule

__all__ = ["MetaTrainResult", "MetaTrainingError"]


class MetaTrainingError(RuntimeError):
    """Meta-training cannot continue (e.g. too many consecutive non-finite meta-steps)."""


@dataclass
class MetaTrainResult:
    """What :func:`~l2o.meta.meta_train` returns. ``rule`` holds the best validated weights.

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
