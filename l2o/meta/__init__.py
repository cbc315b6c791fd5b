"""Meta-trainers and evaluation built on the unroll engine.

:func:`meta_train` with a :class:`MetaTrainConfig` (the estimator, the horizon and truncation
schedules, the meta-batch) meta-trains a rule, and a learned initialisation in MAML mode;
:func:`compare` evaluates rules against learning-rate-tuned baselines on held-out tasks.
"""

from .config import ESTIMATORS, HORIZON_SCHEDULES, STEP_WEIGHTS, MetaTrainConfig
from .evaluate import BASELINES, compare, loss_curves, lr_grid, sample_tasks, tune_lr
from .result import MetaTrainingError, MetaTrainResult
from .trainer import meta_train
from .training_state import TrainingState
from .validation import validation_loss

__all__ = [
    "MetaTrainConfig",
    "MetaTrainResult",
    "MetaTrainingError",
    "TrainingState",
    "meta_train",
    "validation_loss",
    "ESTIMATORS",
    "HORIZON_SCHEDULES",
    "STEP_WEIGHTS",
    "BASELINES",
    "compare",
    "loss_curves",
    "lr_grid",
    "sample_tasks",
    "tune_lr",
]
