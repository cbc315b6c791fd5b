"""l2o: learned optimizers and MAML on one unroll engine, in PyTorch.

The main jobs, by name: :class:`LearnedOptimizer` (a shipped or meta-trained rule as a
``torch.optim`` optimizer), :func:`meta_train` with a :class:`MetaTrainConfig` (meta-train a rule,
or a MAML initialisation) and :func:`compare` (against learning-rate-tuned baselines), :class:`MAML`.
The pieces (see ``docs/design.md``): :mod:`l2o.rules` (hand-designed and learned update rules),
:mod:`l2o.unroll` (the engine), :mod:`l2o.meta` (meta-trainers, estimators and evaluation),
:mod:`l2o.checkpoints` (safe save/load), :mod:`l2o.tree` (params as dicts of tensors).
"""

from __future__ import annotations

import warnings
from typing import Any

__version__ = "0.2.0.dev0"

from . import tree  # noqa: E402
from .checkpoints import CheckpointError, load_rule, save_rule  # noqa: E402
from .rules import NAG, SGD, Adam, LSTMRule, MetaSGD, MLPRule, RMSprop, Rule  # noqa: E402
from .unroll import InnerState, UnrollResult, init_inner, truncate, unroll  # noqa: E402
from .optim import LearnedOptimizer  # noqa: E402
from .pretrained import list_pretrained, load_pretrained  # noqa: E402
from .adaptation import adaptation_curve, adaptation_params  # noqa: E402
from .maml import MAML, MAMLInit, SupervisedTask  # noqa: E402
from .families import ModuleFamily, TaskMixture  # noqa: E402
from .meta import MetaTrainConfig, MetaTrainingError, MetaTrainResult, compare, meta_train  # noqa: E402

__all__ = [
    "__version__",
    # the drop-in optimizer and the shipped rules
    "LearnedOptimizer",
    "list_pretrained",
    "load_pretrained",
    # meta-training and evaluation
    "meta_train",
    "MetaTrainConfig",
    "MetaTrainResult",
    "MetaTrainingError",
    "compare",
    # task families from your own model
    "ModuleFamily",
    "TaskMixture",
    # MAML
    "MAML",
    "MAMLInit",
    "SupervisedTask",
    "adaptation_curve",
    "adaptation_params",
    # rules
    "Rule",
    "SGD",
    "NAG",
    "RMSprop",
    "Adam",
    "LSTMRule",
    "MetaSGD",
    "MLPRule",
    # the engine
    "unroll",
    "truncate",
    "init_inner",
    "InnerState",
    "UnrollResult",
    # files
    "save_rule",
    "load_rule",
    "CheckpointError",
    "tree",
]

_MOVED = {"RULES": ("l2o.rules", "RULES")}


def __getattr__(name: str) -> Any:
    """Names that moved off the package's face, kept for one version with a DeprecationWarning."""
    if name in _MOVED:
        module, attr = _MOVED[name]
        warnings.warn(f"l2o.{name} is deprecated and will be removed in the next version; use {module}.{attr}",
                      DeprecationWarning, stacklevel=2)
        import importlib

        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'l2o' has no attribute {name!r}")
