"""l2o: learned optimizers and MAML on one unroll engine, in PyTorch.

The pieces (see ``DESIGN.md``): :mod:`l2o.rules` (hand-designed and learned update rules),
:mod:`l2o.unroll` (the engine), :mod:`l2o.meta` (meta-trainers and evaluation),
:mod:`l2o.checkpoints` (safe save/load).
"""

__version__ = "0.1.0"

from . import tree  # noqa: E402
from .checkpoints import CheckpointError, load_rule, save_rule  # noqa: E402
from .rules import NAG, RULES, SGD, Adam, LSTMRule, MetaSGD, MLPRule, RMSprop, Rule  # noqa: E402
from .unroll import InnerState, UnrollResult, init_inner, truncate, unroll  # noqa: E402

__all__ = [
    "__version__",
    "tree",
    "Rule",
    "SGD",
    "NAG",
    "RMSprop",
    "Adam",
    "LSTMRule",
    "MetaSGD",
    "MLPRule",
    "RULES",
    "unroll",
    "truncate",
    "init_inner",
    "InnerState",
    "UnrollResult",
    "save_rule",
    "load_rule",
    "CheckpointError",
]

from .optim import LearnedOptimizer  # noqa: E402
from .pretrained import list_pretrained, load_pretrained  # noqa: E402

__all__ += ["LearnedOptimizer", "list_pretrained", "load_pretrained"]

from .maml import MAML, MAMLInit, SupervisedTask, adaptation_curve, adaptation_params  # noqa: E402

__all__ += ["MAML", "MAMLInit", "SupervisedTask", "adaptation_curve", "adaptation_params"]
