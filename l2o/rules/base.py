"""The rule contract shared by hand-designed and learned update rules.

A *rule* maps gradients to updates. It is an ``nn.Module`` whose own parameters are its
meta-params (hand-designed rules have none), with an optax-like pure pair::

    state = rule.init(params)
    updates, state = rule.update(grads, state, params, step=t, loss=f_t)
    params = l2o.tree.apply_updates(params, updates)

``update`` never mutates its inputs and is differentiable end to end, so the unroll engine can
backpropagate through any number of inner steps. ``step`` is the number of updates already applied
(0 for the first), which is what bias corrections need.

``update_`` has the same signature and result but may overwrite ``state``'s tensors instead of
allocating new ones; callers that own the state and need no meta-gradient (the drop-in
:class:`l2o.LearnedOptimizer`) use it. The default just calls ``update``; rules whose state is large
(the LSTM keeps ``2 L H`` numbers per coordinate) override it with an in-place, blocked version.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple

import torch
from torch import Tensor, nn

from ..tree import Params

__all__ = ["Rule", "check_hyperparameter", "check_positive_int", "check_bool", "check_float_dtype", "check_update_args",
           "check_params"]


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

    def update_(
        self,
        grads: Params,
        state: Any,
        params: Params,
        *,
        step: int,
        loss: Tensor | None = None,
    ) -> tuple[Params, Any]:
        """Like :meth:`update`, but ``state`` may be overwritten (do not use it afterwards; use the
        returned state). Not differentiable with respect to the meta-params."""
        return self.update(grads, state, params, step=step, loss=loss)

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
        lo = "[" if low_inclusive and math.isfinite(low) else "("
        hi = "]" if high_inclusive and math.isfinite(high) else ")"
        raise ValueError(f"{name} must be a finite number in {lo}{low}, {high}{hi}, got {value!r}")
    return v


def check_positive_int(name: str, value: Any) -> int:
    """Return ``value`` if it is an ``int`` >= 1 (not a bool); else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """Return ``value`` if it is a ``bool``; else ``TypeError`` naming ``name`` (no truthiness of strings)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} ({value!r})")
    return value


def check_float_dtype(name: str, value: Any) -> torch.dtype:
    """Return ``value`` if it is a floating-point ``torch.dtype``; else ``TypeError`` naming ``name``."""
    if not (isinstance(value, torch.dtype) and value.is_floating_point):
        raise TypeError(f"{name} must be a floating torch.dtype such as torch.float32, got {value!r}")
    return value


def check_update_args(grads: Any, params: Any, step: Any, *, rule: str) -> None:
    """Check what every :meth:`Rule.update` receives: ``grads`` and ``params`` dicts of tensors with
    the same keys and shapes, and ``step`` an ``int >= 0``. Raises ``TypeError``/``ValueError``
    naming the argument."""
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"{rule}.update: step must be an int (updates already applied), got "
                        f"{type(step).__name__} ({step!r})")
    if step < 0:
        raise ValueError(f"{rule}.update: step must be >= 0 (updates already applied), got {step}")
    for what, tree in (("grads", grads), ("params", params)):
        if not isinstance(tree, Mapping):
            raise TypeError(f"{rule}.update: {what} must be a dict of tensors keyed like the params, got "
                            f"{type(tree).__name__}")
    if grads.keys() != params.keys():
        raise ValueError(f"{rule}.update: grads and params must have the same keys: params "
                         f"{sorted(map(str, params))}, grads {sorted(map(str, grads))}")
    for k, p in params.items():
        g = grads[k]
        if not isinstance(p, Tensor) or not isinstance(g, Tensor):
            bad, value = ("params", p) if not isinstance(p, Tensor) else ("grads", g)
            raise TypeError(f"{rule}.update: {bad}[{k!r}] must be a Tensor, got {type(value).__name__}")
        if g.shape != p.shape:
            raise ValueError(f"{rule}.update: grads[{k!r}] has shape {tuple(g.shape)} but params[{k!r}] has "
                             f"shape {tuple(p.shape)}; they must match")


def check_params(params: Any, *, rule: str) -> None:
    """``params`` (as given to :meth:`Rule.init`) must be a dict of tensors; else ``TypeError``."""
    if not isinstance(params, Mapping):
        raise TypeError(f"{rule}.init: params must be a dict of tensors keyed like named_parameters(), got "
                        f"{type(params).__name__}")
    for k, p in params.items():
        if not isinstance(p, Tensor):
            raise TypeError(f"{rule}.init: params[{k!r}] must be a Tensor, got {type(p).__name__}")
