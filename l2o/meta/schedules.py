r"""Schedules of a meta-training run: each round's horizon, the truncations it is cut into, the
meta-loss weights of its inner steps, and the meta learning rate.

A run of :class:`~l2o.meta.MetaTrainConfig` ``epochs`` rounds; round ``e`` optimises its tasks for
a horizon :math:`H_e` (:func:`epoch_horizon`) cut into :math:`\lceil H_e / \text{truncation}\rceil`
truncations, one meta-step each.
"""

from __future__ import annotations

import hashlib
import math

import torch

from .config import MetaTrainConfig

__all__ = ["epoch_horizon", "num_segments", "segment_steps", "step_weights", "meta_lr_at", "task_generator"]


def _seeded(kind: str, seed: int, index: int) -> torch.Generator:
    digest = hashlib.sha256(f"l2o.meta_train.{kind}:{seed}:{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def task_generator(seed: int, index: int) -> torch.Generator:
    """The generator of global task ``index`` of a run: task ``s`` of round ``e`` has index
    ``e * tasks_per_step + s`` and draws everything (the task, its initial params, its batches,
    its perturbations) from this generator, seeded by a hash of ``(seed, index)``, so any process
    can draw any task of the run by its index alone."""
    return _seeded("task", seed, index)


def epoch_horizon(config: MetaTrainConfig, epoch: int) -> int:
    r"""The horizon of round ``epoch``: ``config.horizon``, or with ``horizon_schedule="log_uniform"``
    a draw of :math:`\lfloor \exp U(\log H_{\min}, \log(H_{\max} + 1)) \rfloor` (clipped to
    :math:`H_{\max}`), with :math:`H_{\min}` = ``min_horizon`` (default ``truncation``), from a
    generator seeded by ``(seed, epoch)``."""
    if config.horizon_schedule == "constant":
        return config.horizon
    low = config.truncation if config.min_horizon is None else config.min_horizon
    u = float(torch.rand((), generator=_seeded("horizon", config.seed, epoch), dtype=torch.float64))
    value = math.exp(math.log(low) + u * (math.log(config.horizon + 1) - math.log(low)))
    return max(low, min(config.horizon, int(value)))


def told_total_steps(config: MetaTrainConfig, epoch: int) -> bool:
    """Whether round ``epoch``'s inner runs are told their length (probability
    ``config.tell_total_steps``, from a generator seeded by ``(seed, epoch)``)."""
    if config.tell_total_steps <= 0:
        return False
    u = float(torch.rand((), generator=_seeded("told", config.seed, epoch), dtype=torch.float64))
    return u < config.tell_total_steps


def num_segments(config: MetaTrainConfig, horizon: int) -> int:
    """Truncations (meta-steps) in a horizon."""
    return math.ceil(horizon / config.truncation)


def segment_steps(config: MetaTrainConfig, horizon: int, segment: int) -> tuple[int, int]:
    """``(done, steps)``: inner steps before truncation ``segment`` of the horizon, and in it."""
    done = segment * config.truncation
    return done, min(config.truncation, horizon - done)


def step_weights(config: MetaTrainConfig, horizon: int, done: int, steps: int) -> list[float] | None:
    """Meta-loss weights of inner steps ``done + 1 .. done + steps`` of the horizon (``None``: all 1)."""
    if config.step_weights == "linear":
        return [2.0 * (done + k + 1) / horizon for k in range(steps)]
    if config.step_weights == "final":
        return [1.0 if done + k + 1 == horizon else 0.0 for k in range(steps)]
    return None


def meta_lr_at(config: MetaTrainConfig, progress: float) -> float:
    """The meta learning rate at ``progress`` in [0, 1]: constant, or a cosine decay in log space
    from ``meta_lr`` to ``meta_lr_final``."""
    if config.meta_lr_final is None:
        return config.meta_lr
    lo, hi = math.log(config.meta_lr_final), math.log(config.meta_lr)
    return math.exp(lo + 0.5 * (hi - lo) * (1.0 + math.cos(math.pi * progress)))
