"""Update rules: the :class:`Rule` contract and its implementations (see ``l2o.rules.base``)."""

from ..validation import check_hyperparameter
from .base import Rule
from .hand import HAND_RULES, NAG, SGD, Adam, AdamState, RMSprop, RMSpropState, SGDState
from .lstm import LSTMRule, LSTMState
from .metasgd import MetaSGD, MetaSGDState
from .mlp import MLPRule, MLPState
from .preprocess import PREPROCESSORS

#: Every rule a checkpoint may name, by :attr:`Rule.name`.
RULES: dict[str, type[Rule]] = {**HAND_RULES, LSTMRule.name: LSTMRule, MetaSGD.name: MetaSGD, MLPRule.name: MLPRule}

__all__ = [
    "Rule",
    "check_hyperparameter",
    "SGD",
    "NAG",
    "RMSprop",
    "Adam",
    "SGDState",
    "RMSpropState",
    "AdamState",
    "HAND_RULES",
    "LSTMRule",
    "LSTMState",
    "MetaSGD",
    "MetaSGDState",
    "MLPRule",
    "MLPState",
    "PREPROCESSORS",
    "RULES",
]
