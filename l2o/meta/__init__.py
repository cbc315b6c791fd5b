"""Meta-trainers and evaluation built on the unroll engine."""

from .evaluate import BASELINES, compare, loss_curves, lr_grid, sample_tasks, tune_lr
from .trainer import MetaTrainConfig, MetaTrainingError, MetaTrainResult, meta_train, validation_loss

__all__ = [
    "MetaTrainConfig",
    "MetaTrainResult",
    "MetaTrainingError",
    "meta_train",
    "validation_loss",
    "BASELINES",
    "compare",
    "loss_curves",
    "lr_grid",
    "sample_tasks",
    "tune_lr",
]
