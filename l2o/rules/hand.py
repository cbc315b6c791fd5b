r"""Hand-designed update rules: SGD, NAG, RMSprop and Adam as differentiable, pure rules.

Each rule reproduces the arithmetic of its ``torch.optim`` namesake (float64 trajectories agree to
round-off), but out of place: ``update`` builds new tensors and never detaches, so the unroll
engine can differentiate through any number of steps with respect to the gradients, the params
(through weight decay) and anything upstream of them, including second order.

Differences from ``torch.optim`` (all deliberate):

* ``update`` receives a gradient for every parameter (``grads.keys() == params.keys()``); there is
  no "``.grad is None``, skip this parameter". Leave a parameter out of ``params`` to freeze it.
* ``step`` is one counter for the whole params dict (torch keeps one per parameter), and momentum
  buffers are seeded from the gradient when ``step == 0`` (torch: when the buffer does not exist
  yet).
* ``eps_root`` (from optax) is added under the square root of RMSprop/Adam so that
  differentiating through the rule never meets :math:`\sqrt{\cdot}'(0)`; the default 0 gives
  torch's numbers.
* No ``maximize``, ``amsgrad``, ``foreach``/``fused`` options or complex-parameter support.
  ``update_`` (what :class:`l2o.LearnedOptimizer` calls, once per param group) computes the same
  numbers as ``update`` with ``torch._foreach`` ops, overwriting the state's buffers in place as
  torch's foreach implementations do: a constant number of ops per step whatever the number of
  tensors, and no new state allocated per step.
* Hyperparameter ranges are slightly stricter: ``lr > 0``, ``momentum``/``alpha``/betas in
  ``[0, 1)``.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import torch
from torch import Tensor

from ..tree import Params
from ..validation import check_bool, check_hyperparameter
from .base import Rule, check_params, check_update_args

__all__ = [
    "SGD",
    "NAG",
    "RMSprop",
    "Adam",
    "SGDState",
    "RMSpropState",
    "AdamState",
    "HAND_RULES",
]


def _check_update(rule: Rule, grads: Params, state: Any, params: Params, step: Any, state_type: type,
                  fields: tuple[str, ...], *, read_at_step0: bool = True) -> None:
    """Check ``update``'s arguments (see :func:`check_update_args`) and that ``state`` is a
    ``state_type`` whose ``fields`` (not read at step 0 unless ``read_at_step0``) hold a tensor
    shaped like every param."""
    name = type(rule).__name__
    check_update_args(grads, params, step, rule=name)
    if not isinstance(state, state_type):
        raise TypeError(f"{name}.update: state must be the {state_type.__name__} that {name}.init(params) "
                        f"returned, got {type(state).__name__}")
    if step == 0 and not read_at_step0:
        return
    for field in fields:
        buffers = getattr(state, field)
        for k, p in params.items():
            b = buffers.get(k) if isinstance(buffers, Mapping) else None
            if not isinstance(b, Tensor) or b.shape != p.shape:
                found = f"shape {tuple(b.shape)}" if isinstance(b, Tensor) else type(b).__name__
                raise ValueError(f"{name}.update: state.{field}[{k!r}] is {found}, but params[{k!r}] has shape "
                                 f"{tuple(p.shape)}: call {name}.init(params) for these params")
            if b.dtype != grads[k].dtype:
                raise ValueError(f"{name}.update: state.{field}[{k!r}] is {b.dtype} but grads[{k!r}] is "
                                 f"{grads[k].dtype}: call {name}.init(params) with params of the grads' dtype")


#: weight decay is torch.add's ``alpha``, which must fit the params' dtype (float32 at least)
_MAX_WEIGHT_DECAY = float(torch.finfo(torch.float32).max)


def _with_weight_decay(grad: Tensor, param: Tensor, weight_decay: float) -> Tensor:
    # torch.optim: grad.add(param, alpha=weight_decay) (L2 penalty, coupled)
    return grad if weight_decay == 0.0 else torch.add(grad, param, alpha=weight_decay)


def _lists(grads: Params, params: Params, weight_decay: float) -> tuple[list[str], list[Tensor]]:
    """``update_``'s inputs as lists: the keys and the gradients with the (coupled) weight decay
    added (new tensors when it is nonzero: the caller's gradients are never written)."""
    keys = list(params)
    g = [grads[k] for k in keys]
    if weight_decay != 0.0:
        g = list(torch._foreach_add(g, [params[k] for k in keys], alpha=weight_decay))
    return keys, g


# --------------------------------------------------------------------------------------- SGD / NAG


class SGDState(NamedTuple):
    """State of :class:`SGD`/:class:`NAG`: the momentum buffers (``{}`` when ``momentum == 0``)."""

    momentum: dict[str, Tensor]


class SGD(Rule):
    r"""Stochastic gradient descent with optional (Nesterov) momentum, as ``torch.optim.SGD``.

    With learning rate :math:`\gamma`, momentum :math:`\mu`, dampening :math:`\tau` and weight
    decay :math:`\lambda`, at step :math:`t` (``step``, 0 for the first update):

    .. math::
        \begin{aligned}
            g_t &\leftarrow \nabla_\theta f_t(\theta_t) + \lambda \theta_t \\
            b_t &\leftarrow \begin{cases} g_t & t = 0 \\
                                          \mu b_{t-1} + (1 - \tau) g_t & t > 0 \end{cases}
                \qquad \text{(only if } \mu \neq 0\text{)} \\
            d_t &\leftarrow \begin{cases} g_t + \mu b_t & \text{nesterov} \\
                                          b_t & \mu \neq 0 \\
                                          g_t & \mu = 0 \end{cases} \\
            u_t &= -\gamma d_t \qquad (\theta_{t+1} = \theta_t + u_t)
        \end{aligned}

    Args:
        lr: learning rate :math:`\gamma > 0`.
        momentum: momentum factor :math:`\mu \in [0, 1)`.
        dampening: dampening of the momentum :math:`\tau \in [0, 1]`.
        nesterov: use Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``).
        weight_decay: L2 penalty :math:`\lambda \ge 0` added to the gradient.
    """

    name = "sgd"
    per_tensor_state = True

    def __init__(
        self,
        lr: float = 1e-2,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        self.lr = check_hyperparameter("lr", lr, low=0.0, low_inclusive=False)
        self.momentum = check_hyperparameter("momentum", momentum, low=0.0, high=1.0, high_inclusive=False)
        self.dampening = check_hyperparameter("dampening", dampening, low=0.0, high=1.0)
        self.nesterov = check_bool("nesterov", nesterov)
        self.weight_decay = check_hyperparameter("weight_decay", weight_decay, high=_MAX_WEIGHT_DECAY)
        if self.nesterov and (self.momentum <= 0.0 or self.dampening != 0.0):
            raise ValueError(
                "nesterov=True requires momentum > 0 and dampening == 0 (as torch.optim.SGD), "
                f"got momentum={momentum!r}, dampening={dampening!r}"
            )

    def init(self, params: Params) -> SGDState:
        """Zero momentum buffers shaped like ``params`` (none when ``momentum == 0``)."""
        check_params(params, rule=type(self).__name__)
        if self.momentum == 0.0:
            return SGDState(momentum={})
        return SGDState(momentum={k: torch.zeros_like(p) for k, p in params.items()})

    def check_update(self, grads: Params, state: SGDState, params: Params, *, step: int) -> None:
        """What :meth:`update` checks (see :meth:`l2o.Rule.check_update`)."""
        _check_update(self, grads, state, params, step, SGDState, ("momentum",) if self.momentum != 0.0 else (),
                      read_at_step0=False)

    def update_unchecked(
        self,
        grads: Params,
        state: SGDState,
        params: Params,
        *,
        step: int,
        loss: Tensor | None = None,
    ) -> tuple[Params, SGDState]:
        """:meth:`update` without the argument checks."""
        lr, mu, tau, wd = self.lr, self.momentum, self.dampening, self.weight_decay
        updates: Params = {}
        buffers: Params = {}
        for k, p in params.items():
            d = _with_weight_decay(grads[k], p, wd)
            if mu != 0.0:
                if step == 0:
                    buf = d.clone()  # never alias the caller's gradient tensor
                else:
                    buf = torch.add(state.momentum[k] * mu, d, alpha=1.0 - tau)
                buffers[k] = buf
                d = torch.add(d, buf, alpha=mu) if self.nesterov else buf
            updates[k] = d * -lr
        return updates, SGDState(momentum=buffers)

    def apply_unchecked(self, grads: Params, state: SGDState, params: Params, *, step: int,
                        loss: Tensor | None = None) -> tuple[Params, SGDState]:
        r"""Without momentum and weight decay, :math:`\theta - \gamma g` as one
        ``torch.add(θ, g, alpha=-lr)`` per tensor (``torch.optim.SGD``'s arithmetic); otherwise
        :meth:`update_unchecked` and ``apply_updates`` (also for a subclass with its own
        ``update_unchecked``)."""
        if self.momentum == 0.0 and self.weight_decay == 0.0 and type(self).update_unchecked is SGD.update_unchecked:
            if torch.compiler.is_compiling():  # the compiler fuses the two ops (and torch 2.13's inductor
                # miscomputes add(..., alpha=) of a torch.func.grad output: tests/test_compile.py)
                return {k: p + grads[k].to(p.dtype) * -self.lr for k, p in params.items()}, SGDState({})
            return {k: torch.add(p, grads[k].to(p.dtype), alpha=-self.lr) if self.lr <= torch.finfo(p.dtype).max
                    else p + grads[k].to(p.dtype) * -self.lr  # alpha must fit the dtype
                    for k, p in params.items()}, SGDState({})
        return super().apply_unchecked(grads, state, params, step=step, loss=loss)

    @torch.no_grad()
    def update_(
        self,
        grads: Params,
        state: SGDState,
        params: Params,
        *,
        step: int,
        loss: Tensor | None = None,
    ) -> tuple[Params, SGDState]:
        """:meth:`update`'s numbers with ``torch._foreach`` ops, the momentum buffers overwritten in place."""
        _check_update(self, grads, state, params, step, SGDState, ("momentum",) if self.momentum != 0.0 else ())
        if not params:
            return {}, state
        lr, mu, tau = self.lr, self.momentum, self.dampening
        keys, d = _lists(grads, params, self.weight_decay)
        buffers: list[Tensor] = []
        if mu != 0.0:
            buffers = [state.momentum[k] for k in keys]
            if step == 0:
                torch._foreach_copy_(buffers, d)
            else:
                torch._foreach_mul_(buffers, mu)
                torch._foreach_add_(buffers, d, alpha=1.0 - tau)
            d = list(torch._foreach_add(d, buffers, alpha=mu)) if self.nesterov else buffers
        updates = torch._foreach_mul(d, -lr)
        return dict(zip(keys, updates)), SGDState(momentum=dict(zip(keys, buffers)))

    def config(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "momentum": self.momentum,
            "dampening": self.dampening,
            "nesterov": self.nesterov,
            "weight_decay": self.weight_decay,
        }


class NAG(SGD):
    r"""Nesterov accelerated gradient, exactly ``torch.optim.SGD(nesterov=True, dampening=0)``.

    With learning rate :math:`\gamma`, momentum :math:`\mu` and weight decay :math:`\lambda`:

    .. math::
        \begin{aligned}
            g_t &\leftarrow \nabla_\theta f_t(\theta_t) + \lambda \theta_t \\
            b_t &\leftarrow \begin{cases} g_t & t = 0 \\ \mu b_{t-1} + g_t & t > 0 \end{cases} \\
            u_t &= -\gamma \, (g_t + \mu b_t)
        \end{aligned}

    Args:
        lr: learning rate :math:`\gamma > 0`.
        momentum: momentum factor :math:`\mu \in (0, 1)`.
        weight_decay: L2 penalty :math:`\lambda \ge 0` added to the gradient.
    """

    name = "nag"

    def __init__(self, lr: float = 1e-2, momentum: float = 0.9, weight_decay: float = 0.0) -> None:
        check_hyperparameter("momentum", momentum, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
        super().__init__(lr=lr, momentum=momentum, dampening=0.0, nesterov=True, weight_decay=weight_decay)

    def config(self) -> dict[str, Any]:
        return {"lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay}


# ------------------------------------------------------------------------------------------ RMSprop


class RMSpropState(NamedTuple):
    """State of :class:`RMSprop`: the moving averages and the momentum buffers.

    ``grad_avg`` is ``{}`` unless ``centered``; ``momentum`` is ``{}`` when ``momentum == 0``.
    """

    square_avg: dict[str, Tensor]
    grad_avg: dict[str, Tensor]
    momentum: dict[str, Tensor]


class RMSprop(Rule):
    r"""RMSprop (Hinton), as ``torch.optim.RMSprop``, plus optax's ``eps_root``.

    With learning rate :math:`\gamma`, smoothing :math:`\alpha`, weight decay :math:`\lambda` and
    momentum :math:`\mu`, starting from :math:`v_{-1} = \bar g_{-1} = b_{-1} = 0`:

    .. math::
        \begin{aligned}
            g_t &\leftarrow \nabla_\theta f_t(\theta_t) + \lambda \theta_t \\
            v_t &\leftarrow \alpha v_{t-1} + (1 - \alpha) g_t^2 \\
            \tilde v_t &\leftarrow \begin{cases}
                v_t - \bar g_t^2, \quad \bar g_t \leftarrow \alpha \bar g_{t-1} + (1 - \alpha) g_t
                    & \text{centered} \\
                v_t & \text{otherwise} \end{cases} \\
            s_t &\leftarrow g_t / \left(\sqrt{\tilde v_t + \epsilon_{root}} + \epsilon\right) \\
            u_t &= \begin{cases} -\gamma b_t, \quad b_t \leftarrow \mu b_{t-1} + s_t & \mu > 0 \\
                                 -\gamma s_t & \mu = 0 \end{cases}
        \end{aligned}

    Args:
        lr: learning rate :math:`\gamma > 0`.
        alpha: smoothing constant :math:`\alpha \in [0, 1)`.
        eps: :math:`\epsilon \ge 0` added to the denominator (outside the square root).
        weight_decay: L2 penalty :math:`\lambda \ge 0` added to the gradient.
        momentum: momentum factor :math:`\mu \in [0, 1)`.
        centered: normalise by an estimate of the gradient's variance instead of its second moment.
        eps_root: :math:`\epsilon_{root} \ge 0` added inside the square root; use a small positive
            value when differentiating through the rule (0 reproduces torch).
    """

    name = "rmsprop"
    per_tensor_state = True

    def __init__(
        self,
        lr: float = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
        eps_root: float = 0.0,
    ) -> None:
        super().__init__()
        self.lr = check_hyperparameter("lr", lr, low=0.0, low_inclusive=False)
        self.alpha = check_hyperparameter("alpha", alpha, low=0.0, high=1.0, high_inclusive=False)
        self.eps = check_hyperparameter("eps", eps)
        self.weight_decay = check_hyperparameter("weight_decay", weight_decay, high=_MAX_WEIGHT_DECAY)
        self.momentum = check_hyperparameter("momentum", momentum, low=0.0, high=1.0, high_inclusive=False)
        self.centered = check_bool("centered", centered)
        self.eps_root = check_hyperparameter("eps_root", eps_root)

    def init(self, params: Params) -> RMSpropState:
        """Zero averages (and buffers) shaped like ``params``."""
        check_params(params, rule="RMSprop")
        return RMSpropState(
            square_avg={k: torch.zeros_like(p) for k, p in params.items()},
            grad_avg={k: torch.zeros_like(p) for k, p in params.items()} if self.centered else {},
            momentum={k: torch.zeros_like(p) for k, p in params.items()} if self.momentum > 0.0 else {},
        )

    def check_update(self, grads: Params, state: RMSpropState, params: Params, *, step: int) -> None:
        """What :meth:`update` checks (see :meth:`l2o.Rule.check_update`)."""
        _check_update(self, grads, state, params, step, RMSpropState,
                      ("square_avg",) + (("grad_avg",) if self.centered else ())
                      + (("momentum",) if self.momentum > 0.0 else ()))

    def update_unchecked(
        self,
        grads: Params,
        state: RMSpropState,
        params: Params,
        *,
        step: int,
        loss: Tensor | None = None,
    ) -> tuple[Params, RMSpropState]:
        """:meth:`update` without the argument checks."""
        lr, alpha, mu = self.lr, self.alpha, self.momentum
        updates: Params = {}
        square_avg: Params = {}
        grad_avg: Params = {}
        buffers: Params = {}
        for k, p in params.items():
            g = _with_weight_decay(grads[k], p, self.weight_decay)
            v = torch.addcmul(state.square_avg[k] * alpha, g, g, value=1.0 - alpha)
            square_avg[k] = v
            if self.centered:
                m = torch.lerp(state.grad_avg[k], g, 1.0 - alpha)
                grad_avg[k] = m
                v = torch.addcmul(v, m, m, value=-1.0)
            if self.eps_root != 0.0:
                v = v + self.eps_root
            denom = v.sqrt() + self.eps
            if mu > 0.0:
                buf = torch.addcdiv(state.momentum[k] * mu, g, denom)
                buffers[k] = buf
                updates[k] = buf * -lr
            else:
                updates[k] = (g / denom) * -lr
        return updates, RMSpropState(square_avg=square_avg, grad_avg=grad_avg, momentum=buffers)

    @torch.no_grad()
    def update_(
        self,
        grads: Params,
        state: RMSpropState,
        params: Params,
        *,
        step: int,
        loss: Tensor | None = None,
    ) -> tuple[Params, RMSpropState]:
        """:meth:`update`'s numbers with ``torch._foreach`` ops, the averages and buffers overwritten in place."""
        _check_update(self, grads, state, params, step, RMSpropState,
                      ("square_avg",) + (("grad_avg",) if self.centered else ())
                      + (("momentum",) if self.momentum > 0.0 else ()))
        if not params:
            return {}, state
        lr, alpha, mu = self.lr, self.alpha, self.momentum
        keys, g = _lists(grads, params, self.weight_decay)
        square_avg = [state.square_avg[k] for k in keys]
        torch._foreach_mul_(square_avg, alpha)
        torch._foreach_addcmul_(square_avg, g, g, value=1.0 - alpha)
        v, grad_avg = square_avg, []
        if self.centered:
            grad_avg = [state.grad_avg[k] for k in keys]
            torch._foreach_lerp_(grad_avg, g, 1.0 - alpha)
            v = torch._foreach_addcmul(v, grad_avg, grad_avg, value=-1.0)
        if self.eps_root != 0.0:
            v = torch._foreach_add(v, self.eps_root)
        denom = torch._foreach_sqrt(v)
        torch._foreach_add_(denom, self.eps)
        buffers: list[Tensor] = []
        if mu > 0.0:
            buffers = [state.momentum[k] for k in keys]
            torch._foreach_mul_(buffers, mu)
            torch._foreach_addcdiv_(buffers, g, denom)
            updates = torch._foreach_mul(buffers, -lr)
        else:
            updates = torch._foreach_div(g, denom)
            torch._foreach_mul_(updates, -lr)
        return dict(zip(keys, updates)), RMSpropState(square_avg=dict(zip(keys, square_avg)),
                                                      grad_avg=dict(zip(keys, grad_avg)),
                                                      momentum=dict(zip(keys, buffers)))

    def config(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "alpha": self.alpha,
            "eps": self.eps,
            "weight_decay": self.weight_decay,
            "momentum": self.momentum,
            "centered": self.centered,
            "eps_root": self.eps_root,
        }


# --------------------------------------------------------------------------------------------- Adam


class AdamState(NamedTuple):
    """State of :class:`Adam`: first and second moment estimates."""

    exp_avg: dict[str, Tensor]
    exp_avg_sq: dict[str, Tensor]


class Adam(Rule):
    r"""Adam (Kingma & Ba), as ``torch.optim.Adam`` (coupled L2), plus optax's ``eps_root``.

    With learning rate :math:`\gamma`, betas :math:`(\beta_1, \beta_2)` and weight decay
    :math:`\lambda`, from :math:`m_{-1} = v_{-1} = 0`, at step :math:`t` (0 for the first update):

    .. math::
        \begin{aligned}
            g_t &\leftarrow \nabla_\theta f_t(\theta_t) + \lambda \theta_t \\
            m_t &\leftarrow \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
            v_t &\leftarrow \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
            \hat m_t &= m_t / (1 - \beta_1^{t+1}), \qquad \hat v_t = v_t / (1 - \beta_2^{t+1}) \\
            u_t &= -\gamma \, \hat m_t / \left(\sqrt{\hat v_t + \epsilon_{root}} + \epsilon\right)
        \end{aligned}

    Args:
        lr: learning rate :math:`\gamma > 0`.
        betas: :math:`(\beta_1, \beta_2)`, each in :math:`[0, 1)`.
        eps: :math:`\epsilon \ge 0` added to the denominator (outside the square root).
        weight_decay: L2 penalty :math:`\lambda \ge 0` added to the gradient.
        eps_root: :math:`\epsilon_{root} \ge 0` added inside the square root; use a small positive
            value when differentiating through the rule (0 reproduces torch).
    """

    name = "adam"
    per_tensor_state = True

    def __init__(
        self,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        eps_root: float = 0.0,
    ) -> None:
        super().__init__()
        self.lr = check_hyperparameter("lr", lr, low=0.0, low_inclusive=False)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        self.betas = (
            check_hyperparameter("betas[0]", betas[0], low=0.0, high=1.0, high_inclusive=False),
            check_hyperparameter("betas[1]", betas[1], low=0.0, high=1.0, high_inclusive=False),
        )
        self.eps = check_hyperparameter("eps", eps)
        self.weight_decay = check_hyperparameter("weight_decay", weight_decay, high=_MAX_WEIGHT_DECAY)
        self.eps_root = check_hyperparameter("eps_root", eps_root)

    def init(self, params: Params) -> AdamState:
        """Zero moments shaped like ``params``."""
        check_params(params, rule="Adam")
        return AdamState(
            exp_avg={k: torch.zeros_like(p) for k, p in params.items()},
            exp_avg_sq={k: torch.zeros_like(p) for k, p in params.items()},
        )

    def check_update(self, grads: Params, state: AdamState, params: Params, *, step: int) -> None:
        """What :meth:`update` checks (see :meth:`l2o.Rule.check_update`)."""
        _check_update(self, grads, state, params, step, AdamState, ("exp_avg", "exp_avg_sq"))

    def update_unchecked(
        self,
        grads: Params,
        state: AdamState,
        params: Params,
        *,
        step: int,
        loss: Tensor | None = None,
    ) -> tuple[Params, AdamState]:
        """:meth:`update` without the argument checks."""
        beta1, beta2 = self.betas
        t = step + 1
        bias_correction1 = 1.0 - beta1**t
        bias_correction2 = 1.0 - beta2**t
        step_size = self.lr / bias_correction1
        bias_correction2_sqrt = bias_correction2**0.5
        updates: Params = {}
        exp_avg: Params = {}
        exp_avg_sq: Params = {}
        for k, p in params.items():
            g = _with_weight_decay(grads[k], p, self.weight_decay)
            m = torch.lerp(state.exp_avg[k], g, 1.0 - beta1)
            v = torch.addcmul(state.exp_avg_sq[k] * beta2, g, g, value=1.0 - beta2)
            exp_avg[k], exp_avg_sq[k] = m, v
            # sqrt(v / bc2 + eps_root) written as sqrt(v + eps_root * bc2) / sqrt(bc2): torch's
            # exact arithmetic when eps_root == 0.
            if self.eps_root != 0.0:
                v = v + self.eps_root * bias_correction2
            denom = v.sqrt() / bias_correction2_sqrt + self.eps
            updates[k] = (m / denom) * -step_size
        return updates, AdamState(exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)

    @torch.no_grad()
    def update_(
        self,
        grads: Params,
        state: AdamState,
        params: Params,
        *,
        step: int,
        loss: Tensor | None = None,
    ) -> tuple[Params, AdamState]:
        """:meth:`update`'s numbers with ``torch._foreach`` ops, the moments overwritten in place."""
        _check_update(self, grads, state, params, step, AdamState, ("exp_avg", "exp_avg_sq"))
        if not params:
            return {}, state
        beta1, beta2 = self.betas
        t = step + 1
        bias_correction2 = 1.0 - beta2**t
        step_size = self.lr / (1.0 - beta1**t)
        keys, g = _lists(grads, params, self.weight_decay)
        m = [state.exp_avg[k] for k in keys]
        v = [state.exp_avg_sq[k] for k in keys]
        torch._foreach_lerp_(m, g, 1.0 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, g, g, value=1.0 - beta2)
        # as update: sqrt(v + eps_root * bc2) / sqrt(bc2) + eps
        denom = torch._foreach_sqrt(torch._foreach_add(v, self.eps_root * bias_correction2)
                                    if self.eps_root != 0.0 else v)
        torch._foreach_div_(denom, bias_correction2**0.5)
        torch._foreach_add_(denom, self.eps)
        updates = torch._foreach_div(m, denom)
        torch._foreach_mul_(updates, -step_size)
        return dict(zip(keys, updates)), AdamState(exp_avg=dict(zip(keys, m)), exp_avg_sq=dict(zip(keys, v)))

    def config(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "betas": self.betas,
            "eps": self.eps,
            "weight_decay": self.weight_decay,
            "eps_root": self.eps_root,
        }


#: Hand-designed rules by registry name (``Rule.name``).
HAND_RULES: dict[str, type[Rule]] = {"sgd": SGD, "nag": NAG, "rmsprop": RMSprop, "adam": Adam}
