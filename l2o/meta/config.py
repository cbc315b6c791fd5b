"""The hyperparameters of a meta-training run (:class:`MetaTrainConfig`)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ..validation import check_positive_int, is_number
from ..tasks import META, TRAIN
from ..inner import OBJECTIVES

__all__ = ["MetaTrainConfig", "STEP_WEIGHTS", "HORIZON_SCHEDULES", "ESTIMATORS"]

#: How the meta-loss weighs the inner steps of a horizon (see :class:`MetaTrainConfig`).
STEP_WEIGHTS = ("uniform", "linear", "final")
#: How long each task's inner run is (see :class:`MetaTrainConfig`).
HORIZON_SCHEDULES = ("constant", "log_uniform")
#: How a meta-gradient is computed from the truncations (see :mod:`l2o.meta.estimators`).
ESTIMATORS = ("tbptt", "es", "pes")


@dataclass
class MetaTrainConfig:
    r"""Hyperparameters of meta-training (defaults: the paper's quadratic setup, with a
    cosine-decayed meta learning rate).

    Attributes:
        epochs: rounds of tasks to meta-train on (each round optimises ``tasks_per_step`` tasks
            for one horizon).
        horizon: inner steps per task before it is resampled (paper: 100); with
            ``horizon_schedule="log_uniform"``, the longest.
        truncation: inner steps per meta-step (one truncation; paper: 20). The optimizee and the
            rule state are carried across the truncations of a horizon.
        horizon_schedule: ``"constant"`` (every task runs ``horizon`` steps) or
            ``"log_uniform"`` (each round draws its horizon from
            :math:`\text{LogUniform}[\text{min\_horizon}, \text{horizon}]`, so the rule meets
            short and long runs; see :func:`l2o.meta.schedules.epoch_horizon`).
        min_horizon: the shortest horizon of ``"log_uniform"`` (default: ``truncation``).
        estimator: how the meta-gradient of a truncation is computed: ``"tbptt"`` (truncated
            backpropagation, the paper's), ``"es"`` (antithetic evolution strategies) or
            ``"pes"`` (persistent ES, unbiased across truncations); see
            :mod:`l2o.meta.estimators`.
        es_std: the standard deviation :math:`\sigma` of the ES/PES perturbations of the
            meta-params.
        meta_lr: Adam learning rate on the meta-params.
        meta_lr_final: the meta learning rate at the end of a cosine decay (``None``: constant).
        max_grad_norm: global-norm clipping of the meta-gradient (``None``: off).
        validate_every: epochs between validations (0: never; the last weights are returned).
        num_val_tasks: held-out tasks drawn once for validation.
        val_horizon: inner steps of a validation run (default ``horizon``); longer than the
            training horizons, it keeps the weights that hold up on longer runs.
        tell_total_steps: the probability :math:`p` that a round's inner runs are told their
            length: the rule's ``total_steps`` is set to the round's horizon for its truncations
            (else ``None``), so a rule with training-progress inputs (:class:`l2o.MLPRule`'s
            fraction done) learns to use the length when a user gives it and to work without it.
            0 (default) leaves the rule's ``total_steps`` alone; needs a rule with a
            ``total_steps`` attribute when above 0.
        seed: seeds task sampling, perturbations and the validation tasks.
        second_order: differentiate through the task gradients (the paper does not; ``tbptt``
            only).
        objective: the meta-loss terms, ``"loss"`` (the paper) or ``"log_loss"`` (see
            :data:`l2o.inner.OBJECTIVES`).
        step_weights: the meta-loss weight :math:`w_t` of inner step :math:`t` of the horizon:
            ``"uniform"`` (1, the paper) or ``"linear"`` (:math:`2t/\text{horizon}`, same total
            weight, more of it on late steps), or ``"final"`` (1 on the horizon's last step only:
            MAML). Validation weighs the steps the same way.
        meta_split: where the meta-loss reads the losses, ``"train"`` (the batches the rule
            trains on, the paper) or ``"meta"`` (the task's separate split: MAML's query set, or
            held-out data, so that the rule is rewarded for what generalises, not for
            memorising). Validation reads the same split: with ``"meta"`` it is the loss of the
            final params on the meta split.
        max_consecutive_skips: stop after this many non-finite meta-steps in a row.
        compile: run every truncation's unroll through :func:`torch.compile` (``True``, or a
            backend name such as ``"aot_eager"``; see :mod:`l2o.compiling`): the same numbers up to
            float rounding, each truncation one compiled graph of its steps (first meta-steps
            compile, seconds per graph; the compile time grows with ``truncation``). The
            validation runs stay eager. Not part of a run's identity: a run may be resumed with
            or without it.
        tasks_per_step: the meta-batch: tasks optimised in lockstep whose meta-gradients are
            averaged into each meta-step (default 1, the paper; the ES/PES particles, one
            antithetic pair per task). In a distributed run the world size must divide it.
    """

    epochs: int = 1000
    horizon: int = 100
    truncation: int = 20
    horizon_schedule: str = "constant"
    min_horizon: int | None = None
    estimator: str = "tbptt"
    es_std: float = 0.01
    meta_lr: float = 1e-2
    meta_lr_final: float | None = 1e-4
    max_grad_norm: float | None = 1.0
    validate_every: int = 50
    num_val_tasks: int = 2
    val_horizon: int | None = None
    tell_total_steps: float = 0.0
    seed: int = 0
    second_order: bool = False
    objective: str = "loss"
    step_weights: str = "uniform"
    meta_split: str = TRAIN
    max_consecutive_skips: int = 20
    tasks_per_step: int = 1
    compile: bool | str = False

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        for name in ("epochs", "horizon", "truncation", "num_val_tasks", "max_consecutive_skips", "tasks_per_step"):
            check_positive_int(name, getattr(self, name))
        if self.val_horizon is not None:
            check_positive_int("val_horizon", self.val_horizon)
        if not (is_number(self.tell_total_steps) and 0.0 <= self.tell_total_steps <= 1.0):
            raise ValueError(f"tell_total_steps must be a probability in [0, 1], got {self.tell_total_steps!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.step_weights not in STEP_WEIGHTS:
            raise ValueError(f"step_weights must be one of {', '.join(STEP_WEIGHTS)}, got {self.step_weights!r}")
        if self.meta_split not in (TRAIN, META):
            raise ValueError(f"meta_split must be {TRAIN!r} or {META!r}, got {self.meta_split!r}")
        if self.truncation > self.horizon:
            raise ValueError(f"truncation ({self.truncation}) must not be longer than the horizon ({self.horizon})")
        if self.horizon_schedule not in HORIZON_SCHEDULES:
            raise ValueError(f"horizon_schedule must be one of {', '.join(HORIZON_SCHEDULES)}, "
                             f"got {self.horizon_schedule!r}")
        if self.min_horizon is not None:
            check_positive_int("min_horizon", self.min_horizon)
            if self.horizon_schedule != "log_uniform":
                raise ValueError("min_horizon is the shortest horizon of horizon_schedule='log_uniform'; "
                                 f"got it with horizon_schedule={self.horizon_schedule!r}")
            if self.min_horizon > self.horizon:
                raise ValueError(f"min_horizon ({self.min_horizon}) must not be longer than the horizon "
                                 f"({self.horizon})")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {self.estimator!r}")
        if not (is_number(self.es_std) and math.isfinite(self.es_std) and self.es_std > 0):
            raise ValueError(f"es_std must be a positive number, got {self.es_std!r}")
        if not (is_number(self.meta_lr) and math.isfinite(self.meta_lr) and self.meta_lr > 0):
            raise ValueError(f"meta_lr must be a positive number, got {self.meta_lr!r}")
        for name in ("meta_lr_final", "max_grad_norm"):
            value = getattr(self, name)
            if value is not None and not (is_number(value) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number or None, got {value!r}")
        if self.meta_lr_final is not None and self.meta_lr_final > self.meta_lr:
            raise ValueError(f"meta_lr_final ({self.meta_lr_final:g}) is above meta_lr ({self.meta_lr:g}): the schedule "
                             "decays from meta_lr to meta_lr_final, so give a meta_lr_final at most meta_lr "
                             "(--meta-lr-final), or None for a constant meta learning rate")
        if isinstance(self.validate_every, bool) or not isinstance(self.validate_every, int) or self.validate_every < 0:
            raise ValueError(f"validate_every must be an integer >= 0, got {self.validate_every!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.second_order, bool):
            raise ValueError(f"second_order must be True or False, got {self.second_order!r}")
        if not (isinstance(self.compile, bool) or (isinstance(self.compile, str) and self.compile)):
            raise ValueError(f"compile must be True, False or a torch.compile backend name, got {self.compile!r}")
        if self.second_order and self.estimator != "tbptt":
            raise ValueError(f"second_order differentiates through the inner steps, which only estimator='tbptt' does; "
                             f"{self.estimator!r} estimates the meta-gradient from losses alone (drop second_order)")

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (what checkpoints and training states record)."""
        return asdict(self)
