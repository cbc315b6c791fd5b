r"""Meta-training in learned-optimizer mode (Andrychowicz et al. 2016).

The meta-params are the rule's weights :math:`\Phi`. Each *epoch* samples a task, optimises it for
``horizon`` inner steps with the rule, and cuts the horizon into truncations of ``truncation``
steps; after each truncation the meta-loss :math:`\sum_t w_t \bar f(\theta_t)` over that segment is
backpropagated (truncated BPTT) and Adam takes one meta-step on :math:`\Phi`, then
:func:`~l2o.unroll.truncate` starts the next segment from detached copies.

Safety: meta-gradients are clipped by global norm; a meta-step whose meta-loss or meta-gradient is
non-finite never reaches :math:`\Phi` (the step is skipped and counted, and the task is resampled);
too many consecutive skips stop the run with :class:`MetaTrainingError`. Every
``validate_every`` epochs the rule is evaluated on fixed held-out validation tasks and the best
weights are kept (the paper's early stopping).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from ..rules.base import Rule, check_positive_int
from ..tasks import Task, TaskFamily
from ..unroll import OBJECTIVES, init_inner, truncate, unroll

__all__ = ["MetaTrainConfig", "MetaTrainResult", "MetaTrainingError", "meta_train", "validation_loss"]


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
            weight, more of it on late steps).
        max_consecutive_skips: stop after this many non-finite meta-steps in a row.
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
    max_consecutive_skips: int = 20

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        for name in ("epochs", "horizon", "truncation", "num_val_tasks", "max_consecutive_skips"):
            check_positive_int(name, getattr(self, name))
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.step_weights not in ("uniform", "linear"):
            raise ValueError(f"step_weights must be 'uniform' or 'linear', got {self.step_weights!r}")
        if self.truncation > self.horizon:
            raise ValueError(f"truncation ({self.truncation}) must not be longer than the horizon ({self.horizon})")
        if not (isinstance(self.meta_lr, (int, float)) and math.isfinite(self.meta_lr) and self.meta_lr > 0):
            raise ValueError(f"meta_lr must be a positive number, got {self.meta_lr!r}")
        if self.meta_lr_final is not None and not (math.isfinite(self.meta_lr_final) and 0 < self.meta_lr_final):
            raise ValueError(f"meta_lr_final must be a positive number or None, got {self.meta_lr_final!r}")
        if self.max_grad_norm is not None and not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be a positive number or None, got {self.max_grad_norm!r}")
        if isinstance(self.validate_every, bool) or not isinstance(self.validate_every, int) or self.validate_every < 0:
            raise ValueError(f"validate_every must be an integer >= 0, got {self.validate_every!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MetaTrainResult:
    """What :func:`meta_train` returns. ``rule`` holds the best validated weights."""

    rule: Rule
    best_val_loss: float | None
    best_epoch: int | None
    skipped_steps: int
    meta_steps: int
    seconds: float
    history: dict[str, list[float]] = field(default_factory=dict)


@torch.no_grad()
def validation_loss(rule: Rule, tasks: list[Task], horizon: int, seed: int) -> float:
    """Mean over tasks and inner steps 1..horizon of the task loss (the meta-objective), no grad.

    Non-finite results count as ``inf`` so a diverging rule is never selected.
    """
    total = 0.0
    for k, task in enumerate(tasks):
        gen = torch.Generator().manual_seed(seed + k)
        result = unroll(rule, task, init_inner(rule, task, gen), steps=horizon, generator=gen, weights=[0.0] * horizon)
        value = float(result.losses.mean())
        if not math.isfinite(value):
            return math.inf
        total += value
    return total / len(tasks)


def _lr_at(config: MetaTrainConfig, progress: float) -> float:
    if config.meta_lr_final is None:
        return config.meta_lr
    lo, hi = math.log(config.meta_lr_final), math.log(config.meta_lr)
    return math.exp(lo + 0.5 * (hi - lo) * (1.0 + math.cos(math.pi * progress)))


def meta_train(rule: Rule, family: TaskFamily, config: MetaTrainConfig | None = None, *,
               progress: bool = True, callback: Callable[[dict[str, float]], None] | None = None) -> MetaTrainResult:
    """Meta-train ``rule`` (in place) on tasks from ``family``; return the best validated rule.

    Args:
        rule: a rule with trainable parameters (e.g. :class:`~l2o.rules.LSTMRule`).
        family: the task family to sample training and validation tasks from.
        config: hyperparameters (default :class:`MetaTrainConfig`).
        progress: show a tqdm progress bar with the meta-loss.
        callback: called after each epoch with a dict of that epoch's metrics.
    """
    config = config or MetaTrainConfig()
    config.validate()
    meta_params = [p for p in rule.parameters() if p.requires_grad]
    if not meta_params:
        raise ValueError(f"{type(rule).__name__} has no trainable parameters to meta-train")
    segments = math.ceil(config.horizon / config.truncation)
    total_steps = config.epochs * segments
    optimizer = torch.optim.Adam(meta_params, lr=config.meta_lr)
    gen = torch.Generator().manual_seed(config.seed)
    val_gen = torch.Generator().manual_seed(config.seed + 1_000_003)
    val_tasks = [family.sample(val_gen) for _ in range(config.num_val_tasks)] if config.validate_every else []
    history: dict[str, list[float]] = {"epoch_loss": [], "val_epoch": [], "val_loss": []}
    best_val, best_epoch, best_state = None, None, None
    skipped = consecutive = meta_step = 0
    start = time.perf_counter()

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.epochs, desc=f"meta-train {getattr(family, 'name', 'task')}", unit="epoch")
    try:
        for epoch in range(config.epochs):
            task = family.sample(gen)
            inner = init_inner(rule, task, gen)
            epoch_losses: list[Tensor] = []
            done = 0
            for _ in range(segments):
                steps = min(config.truncation, config.horizon - done)
                for group in optimizer.param_groups:
                    group["lr"] = _lr_at(config, meta_step / max(1, total_steps - 1))
                weights = None
                if config.step_weights == "linear":
                    weights = [2.0 * (done + k + 1) / config.horizon for k in range(steps)]
                result = unroll(rule, task, inner, steps=steps, generator=gen, weights=weights,
                                second_order=config.second_order, objective=config.objective)
                optimizer.zero_grad(set_to_none=True)
                ok = result.finite and bool(torch.isfinite(result.meta_loss))
                if ok:
                    result.meta_loss.backward()
                    norm = torch.nn.utils.clip_grad_norm_(meta_params, config.max_grad_norm or math.inf)
                    ok = bool(torch.isfinite(norm))
                meta_step += 1
                if not ok:
                    skipped += 1
                    consecutive += 1
                    optimizer.zero_grad(set_to_none=True)
                    if consecutive >= config.max_consecutive_skips:
                        raise MetaTrainingError(
                            f"{consecutive} consecutive meta-steps had a non-finite meta-loss or meta-gradient "
                            f"(epoch {epoch}); lower meta_lr or the rule's output_scale, or check the task"
                        )
                    break  # this task diverged: resample
                consecutive = 0
                optimizer.step()
                epoch_losses.append(result.losses.mean())
                inner = truncate(result.inner)
                done += steps
            metrics = {"epoch": float(epoch), "skipped": float(skipped)}
            if epoch_losses:
                metrics["loss"] = float(torch.stack(epoch_losses).mean())
                history["epoch_loss"].append(metrics["loss"])
            if config.validate_every and ((epoch + 1) % config.validate_every == 0 or epoch + 1 == config.epochs):
                val = validation_loss(rule, val_tasks, config.horizon, config.seed + 7)
                history["val_epoch"].append(float(epoch + 1))
                history["val_loss"].append(val)
                metrics["val_loss"] = val
                if best_val is None or val < best_val:
                    best_val, best_epoch = val, epoch + 1
                    best_state = copy.deepcopy(rule.state_dict())
            if callback is not None:
                callback(metrics)
            if bar is not None:
                post = {"loss": f"{metrics.get('loss', float('nan')):.3g}"}
                if best_val is not None:
                    post["best_val"] = f"{best_val:.3g}"
                if skipped:
                    post["skipped"] = skipped
                bar.set_postfix(post)
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if best_state is not None:
        rule.load_state_dict(best_state)
    return MetaTrainResult(rule, best_val, best_epoch, skipped, meta_step, time.perf_counter() - start, history)
