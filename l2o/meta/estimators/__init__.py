"""Gradient estimators of the meta-trainer: one choice of :func:`l2o.meta.meta_train`
(``MetaTrainConfig(estimator=...)``, ``l2o meta-train --estimator``), all on the same engine."""

from .base import Estimator, SegmentContext, SegmentResult
from .es import AntitheticES, PersistentES
from .tbptt import TruncatedBackprop

#: The estimators by name (:data:`l2o.meta.config.ESTIMATORS`).
ESTIMATOR_CLASSES: dict[str, type] = {cls.name: cls for cls in (TruncatedBackprop, AntitheticES, PersistentES)}

__all__ = ["Estimator", "SegmentContext", "SegmentResult", "TruncatedBackprop", "AntitheticES", "PersistentES",
           "ESTIMATOR_CLASSES"]
