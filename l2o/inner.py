r"""What an unroll carries and returns: the inner optimisation's state (:class:`InnerState`) and
an unroll's result (:class:`UnrollResult`), shared by the eager engine (:mod:`l2o.unroll`) and the
compiled one (:mod:`l2o.compiling`)."""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import Tensor

from .tree import Params

__all__ = ["InnerState", "UnrollResult", "OBJECTIVES", "LOG_EPS"]

#: Meta-objectives: ``"loss"`` reads :math:`\bar f(\theta_t)` (the paper); ``"log_loss"`` reads the
#: mean over instances of :math:`\log(f(\theta_t) + \epsilon)`, which weighs every factor of
#: improvement equally, so late, small losses still shape the rule.
OBJECTIVES = ("loss", "log_loss")
LOG_EPS = 1e-12


class InnerState(NamedTuple):
    """Where an inner optimisation stands.

    ``grads``/``loss`` cache the training gradient and per-instance loss at ``params`` when known
    (first-order mode reuses them for the next step instead of recomputing; second order leaves
    ``grads`` empty, since it recomputes them with a graph anyway).
    """

    params: Params
    rule_state: Any
    step: int
    grads: Params | None = None
    loss: Tensor | None = None


class UnrollResult(NamedTuple):
    """What :func:`unroll` returns.

    ``meta_loss`` is a differentiable scalar (see the module docstring); ``losses`` holds the
    detached per-instance training losses :math:`f(\\theta_t)` for ``t = 1..K``, shape ``(K, B)``;
    ``finite`` is False when any loss or gradient was NaN/Inf.
    """

    meta_loss: Tensor
    losses: Tensor
    inner: InnerState
    finite: bool
