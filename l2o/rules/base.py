"""The rule contract shared by hand-designed and learned update rules.

A *rule* maps gradients to updates. It is an ``nn.Module`` whose own parameters are its
meta-params (hand-designed rules have none), with an optax-like pure pair::

    state = rule.init(params)
    updates, state = rule.update(grads, state, params, step=t, loss=f_t)
    params = l2o.tree.apply_updates(params, updates)

``update`` never mutates its inputs and is differentiable end to end, so the unroll engine can
backpropagate through any number of inner steps. ``step`` is the number of updates already applied
(0 for the first), which is what bias corrections need.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from torch import Tensor, nn

from ..tree import Params

__all__ = ["Rule", "check_hyperparameter", "check_positive_int"]


class Rule(nn.Module):
    """Base class of all update rules (see the module docstring for the contract).

    Subclasses define :meth:`init`, :meth:`update` and :meth:`config`; ``config()`` returns the
    keyword arguments that rebuild the rule (``type(rule)(**rule.config())``), which is what
    checkpoints store next to the weights.
    """

    #: Registry name used by checkpoints and the CLI (``"adam"``, ``"lstm"``, ...).
    name: str = "rule"

    def init(self, params: Params) -> NamedTuple:  # pragma: no cover - abstract
        """Return the rule's initial state for ``params``."""
        raise NotImplementedError

    def update(
        self,
        grads: Params,
        state: Any,
        params: Params,
        *,
        step: int,
        loss: Tensor | None = None,
    ) -> tuple[Params, Any]:  # pragma: no cover - abstract
        """Return ``(updates, new_state)`` for one inner step."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:  # pragma: no cover - abstract
        """Keyword arguments that rebuild this rule."""
        raise NotImplementedError

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"call {type(self).__name__}.update(grads, state, params, step=...), not the module itself")

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config().items())


def check_hyperparameter(name: str, value: Any, *, low: float = 0.0, high: float = math.inf,
                         low_inclusive: bool = True, high_inclusive: bool = True) -> float:
    """Validate a numeric hyperparameter and return it as ``float``.

    Raises ``TypeError`` for non-numbers and ``ValueError`` (naming the parameter, the value and
    the allowed range) for values outside ``[low, high]`` (bounds inclusive unless told otherwise).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} ({value!r})")
    v = float(value)
    ok_low = v >= low if low_inclusive else v > low
    ok_high = v <= high if high_inclusive else v < high
    if not (math.isfinite(v) and ok_low and ok_high):
        lo = "[" if low_inclusive else "("
        hi = "]" if high_inclusive else ")"
        raise ValueError(f"{name} must be in {lo}{low}, {high}{hi}, got {value!r}")
    return v


def check_positive_int(name: str, value: Any) -> int:
    """Return ``value`` if it is an ``int`` >= 1 (not a bool); else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value
