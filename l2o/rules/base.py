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

``check_update`` and ``update_unchecked`` split ``update`` in two for the engine: the first raises
on arguments ``update`` would refuse, the second computes the step without checking them
(``update`` = ``check_update`` then ``update_unchecked``). The engine checks once per unroll and
then takes every inner step unchecked, so that no Python validation runs per step and a compiled
step (``torch.compile``) holds only the arithmetic. Defaults: no check, and ``update_unchecked``
calls ``update``; :func:`unchecked_update` picks the pair a rule's class really implements (a
subclass that overrides only ``update`` keeps its own ``update``).

``tape`` is an optional fast path for first-order truncated meta-training: a rule may return a
:class:`RuleTape` that runs the steps of one truncation without autograd and computes the
meta-gradient of the whole truncation in one backward, from the gradients at its updates (the
unroll engine computes those; see :func:`l2o.unroll.unroll`'s ``tape``). The default is ``None``:
the engine then differentiates ``update`` step by step.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Protocol, Sequence

from torch import Tensor, nn

from ..tree import Params, apply_updates

# The generic argument checks live in l2o.validation. They are re-exported here (and stay in
# __all__) as deprecated aliases for code that imports them from l2o.rules.base.
from ..validation import check_bool, check_float_dtype, check_hyperparameter, check_positive_int

__all__ = ["Rule", "RuleTape", "check_hyperparameter", "check_positive_int", "check_bool", "check_float_dtype", "check_update_args",
           "check_params", "unchecked_update"]


class RuleTape(Protocol):
    r"""One truncation of first-order inner steps, run without autograd (see :meth:`Rule.tape`).

    In first-order meta-training the gradients fed to the rule are constants, so the meta-loss
    :math:`\mathcal L` depends on the meta-params :math:`\Phi` only through the updates
    :math:`u_1, \dots, u_K` of the truncation, and

    .. math:: \frac{\partial\mathcal L}{\partial\Phi} = \sum_{s=1}^{K}
              \Big(\frac{\partial u_s}{\partial\Phi}\Big)^{\!\top} \frac{\partial\mathcal L}{\partial u_s}.

    A tape computes the updates (:meth:`step`, once per inner step, in order), keeps what the
    backward needs, and returns that sum for all steps at once (:meth:`backward`).
    """

    #: The meta-params the tape differentiates, in the order :meth:`backward` returns their gradients.
    meta_params: tuple[Tensor, ...]

    def step(self, grads: Params, params: Params, *, step: int, loss: Tensor | None = None) -> Params:
        """The updates of the next inner step (no graph), like :meth:`Rule.update`'s."""
        ...

    def state(self) -> Any:
        """The rule state after the steps taken so far, detached (as :func:`l2o.unroll.truncate` leaves it)."""
        ...

    def backward(self, du: Tensor) -> Sequence[Tensor | None]:
        """Given ``du``, ``(steps, N)``: the gradient of the meta-loss at every step's flat update
        (coordinates in ``params``' order), the gradients of :attr:`meta_params`."""
        ...


class Rule(nn.Module):
    """Base class of all update rules (see the module docstring for the contract).

    Subclasses define :meth:`init`, :meth:`update` and :meth:`config`; ``config()`` returns the
    keyword arguments that rebuild the rule (``type(rule)(**rule.config())``), which is what
    checkpoints store next to the weights.
    """

    #: Registry name used by checkpoints and the CLI (``"adam"``, ``"lstm"``, ...).
    name: str = "rule"

    #: Whether the rule is separable by tensor with a state keyed like ``params``: ``init`` and
    #: ``update`` on a params dict equal the union of their results on each tensor alone, and every
    #: tensor's state lies in dicts keyed like ``params`` (``AdamState(exp_avg={k: m_k}, ...)``).
    #: :class:`l2o.LearnedOptimizer` then calls the rule once per param group with all its tensors
    #: (so the rule may use ``torch._foreach`` ops); ``False`` (a state that is one block over all
    #: coordinates, like the LSTM's ``(H, N)`` tensors): it calls the rule once per tensor.
    per_tensor_state: bool = False

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
    ) -> tuple[Params, Any]:
        """Return ``(updates, new_state)`` for one inner step: :meth:`check_update`, then
        :meth:`update_unchecked`. A rule overrides either this or those two."""
        if type(self).update_unchecked is Rule.update_unchecked:  # pragma: no cover - abstract
            raise NotImplementedError(f"{type(self).__name__} must define update, or check_update and "
                                      "update_unchecked")
        self.check_update(grads, state, params, step=step)
        return self.update_unchecked(grads, state, params, step=step, loss=loss)

    def check_update(self, grads: Params, state: Any, params: Params, *, step: int) -> None:
        """Raise ``TypeError``/``ValueError`` for arguments that :meth:`update` would refuse (the
        default checks nothing). Rules that split :meth:`update` into this and
        :meth:`update_unchecked` let the engine validate once per unroll instead of once per step."""

    def update_unchecked(
        self,
        grads: Params,
        state: Any,
        params: Params,
        *,
        step: int,
        loss: Tensor | None = None,
    ) -> tuple[Params, Any]:
        """:meth:`update` for arguments already checked by :meth:`check_update` (the default calls
        :meth:`update`): no Python validation, only the step's arithmetic."""
        return self.update(grads, state, params, step=step, loss=loss)

    def apply_unchecked(
        self,
        grads: Params,
        state: Any,
        params: Params,
        *,
        step: int,
        loss: Tensor | None = None,
    ) -> tuple[Params, Any]:
        r"""The next params :math:`\theta_{t+1} = \theta_t + u_t` and state, for checked arguments:
        ``apply_updates(params, updates)`` of :meth:`update_unchecked` (the default). A rule may
        fuse the two (plain SGD: one ``torch.add(θ, g, alpha=-lr)`` per tensor, as
        ``torch.optim.SGD`` steps); the engine steps through this method."""
        updates, state = self.update_unchecked(grads, state, params, step=step, loss=loss)
        return apply_updates(params, updates), state

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

    def tape(self, params: Params, state: Any, steps: int) -> RuleTape | None:
        """A :class:`RuleTape` for ``steps`` first-order inner steps from ``state`` at ``params``,
        or ``None`` (the default) when this rule has none for them."""
        return None

    def config(self) -> dict[str, Any]:  # pragma: no cover - abstract
        """Keyword arguments that rebuild this rule."""
        raise NotImplementedError

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"call {type(self).__name__}.update(grads, state, params, step=...), not the module itself")

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config().items())


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


def unchecked_update(rule: Rule) -> tuple[Callable[..., None], Callable[..., tuple[Params, Any]]]:
    """``(check, step)`` for an engine that validates once and then steps unchecked; ``step(grads,
    state, params, *, step, loss)`` returns the next params and state.

    ``(rule.check_update, rule.apply_unchecked)`` when the most derived class that defines
    ``update``, ``update_unchecked`` or ``apply_unchecked`` defines one of the last two (the split
    is then the rule's own); otherwise (a subclass that overrides ``update`` alone, or a rule
    without the split) no check and ``apply_updates`` of ``rule.update``, so every step runs the
    ``update`` the class defines.
    """
    for klass in type(rule).__mro__:
        if klass is Rule:
            break
        if "update_unchecked" in vars(klass) or "apply_unchecked" in vars(klass):
            return rule.check_update, rule.apply_unchecked
        if "update" in vars(klass):
            break
    update = rule.update

    def checked_step(grads: Params, state: Any, params: Params, *, step: int,
                     loss: Tensor | None = None) -> tuple[Params, Any]:
        updates, state = update(grads, state, params, step=step, loss=loss)
        return apply_updates(params, updates), state

    return _no_check, checked_step


def _no_check(grads: Any, state: Any, params: Any, *, step: int) -> None:
    return None
