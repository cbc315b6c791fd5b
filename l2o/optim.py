r"""The torch.optim adapter: any l2o rule as a real :class:`torch.optim.Optimizer`.

::

    import l2o
    opt = l2o.LearnedOptimizer(model.parameters())  # "generalist-bounded"; or pretrained=, checkpoint=, rule=
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=50, gamma=0.5)
    for x, y in loader:
        opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step(); sched.step()

The step. For every parameter :math:`\theta` with a gradient :math:`g`, in a param group with
learning rate ``lr`` and weight decay :math:`\lambda` (``weight_decay``), ``step()`` asks the rule
for its update :math:`u` and applies

.. math::
    u = \text{rule}(g, s, \theta), \qquad
    \theta \leftarrow (1 - \text{lr}\cdot\eta\cdot\lambda)\,\theta + \text{lr}\cdot u

with :math:`s` the parameter's rule state and :math:`\eta` the rule's nominal step size (below).
``lr`` defaults to 1, so the learned rule's own step is used unchanged; ``lr`` and
``weight_decay`` live in ``defaults``/``param_groups``, so every ``torch.optim.lr_scheduler`` works.

With a hand-designed rule (``rule=l2o.Adam(lr=1e-3)``) the rule's own ``lr`` applies *and* the
group's ``lr`` multiplies it: ``LearnedOptimizer(ps, rule=l2o.SGD(lr=0.1), lr=0.5)`` takes the steps
of ``torch.optim.SGD(ps, lr=0.05)``. Leave the group ``lr`` at 1 to get the rule's own steps, and
let a scheduler scale it.

Weight decay is decoupled, as in ``torch.optim.AdamW`` (Loshchilov & Hutter): the parameter is
shrunk by the factor :math:`1 - \text{lr}\cdot\eta\cdot\lambda` before the rule's update is added,
and the decay never passes through the rule (it is not added to the gradient the rule sees; the
rule reads :math:`\theta` as it was when the gradient was taken). The nominal step size
:math:`\eta` makes :math:`\lambda` mean what it means for AdamW: a user's usual 0.01-0.1 with the
default ``lr=1`` decays by :math:`\eta\lambda` per step, as ``AdamW(lr=η, weight_decay=λ)`` does.
:math:`\eta` is the rule's ``nominal_lr`` attribute (a learned rule declares the step size its
updates are comparable to, e.g. 1e-3 for one that starts from Adam at 1e-3), else its ``lr`` (a
hand-designed rule's own learning rate): ``LearnedOptimizer(ps, rule=l2o.Adam(lr=1e-3),
weight_decay=0.1)`` follows ``torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1)``. A rule that
declares neither (``LSTMRule``) refuses ``weight_decay > 0`` with a ``ValueError``. ``weight_decay``
is a constructor default (0) and a per-group key (e.g. Hugging Face ``Trainer``'s two groups, with
and without decay), a finite number ``>= 0`` with :math:`\text{lr}\cdot\eta\cdot\lambda < 1`.

Param-group keys. A group may hold ``params``, the hyperparameters the optimizer reads (``lr``,
``weight_decay``), and the keys other tools keep there, which the optimizer accepts and leaves
alone: ``param_names`` (torch, from named parameters; used to name parameters in warnings),
``initial_lr`` (every torch LR scheduler), ``max_lr``/``min_lr`` (``OneCycleLR``), ``swa_lr``
(``SWALR``), ``name`` (a label for the group, e.g. PyTorch Lightning's ``LearningRateMonitor``),
``lr_scale`` (layer-wise lr decay, as timm and MAE build it: their schedulers set ``lr`` from it;
the optimizer does not read it) and ``differentiable=False`` (torch's bookkeeping). Any other key
(``momentum``, ``betas``, ``eps``, ``foreach``, a typo) is refused with a ``ValueError`` naming it
and the accepted keys, when a group is added and at every ``step()`` (for keys written into a
group later). A state dict of another optimizer (e.g. ``torch.optim.Adam``) loads with its other
keys dropped, with a ``RuntimeWarning`` naming them.

Non-finite steps. A NaN or Inf is never written into a parameter. A rule may overwrite the
state it is given (:meth:`l2o.Rule.update_`; every shipped rule does: the hand-designed rules'
``torch._foreach`` ``update_`` and the LSTM's blocked one), so first a tensor whose gradient has a
NaN or Inf is left out of the step before the rule runs: its parameter, rule state and ``"step"``
count stay exactly as they were. Then a tensor whose update :math:`u` is not finite (from finite
gradients: the rule overflowed) is not written (weight decay included): the parameter keeps its
value; its rule state is kept if the rule computed a new one, and otherwise, the old one being
gone, reset to the rule's initial state with ``"step"`` 0 (the rule starts afresh on that tensor,
as on a newly added parameter). A ``RuntimeWarning`` names the parameter (param group index,
position in the group, shape, and its name when the group has ``param_names``), once per
parameter. Each check is one fused pass (a sum per tensor, stacked; an exact ``aminmax`` only for
a tensor whose sum is not finite) and one host synchronisation per step and device: one for the
gradients (rules that overwrite their state) and one for the updates. Inside ``torch.compile``
(no host synchronisation) every tensor gets the exact check.

Rule calls. A rule whose state is kept per tensor (``Rule.per_tensor_state``: every
hand-designed rule) is called once per param group (and step count and device) with all of the
group's parameters that have a gradient, keyed by their position in the group (``"0"``, ``"1"``,
...), so a rule can use ``torch._foreach`` ops and keep its per-step op count independent of the
number of tensors (the hand-designed rules' ``update_`` does, in place, as torch's foreach
optimizers). A rule whose state is one block over all coordinates (the coordinate-wise LSTM's
``(H, N)`` tensors) is called once per parameter (``{"p": p}``); the LSTM is separable per tensor,
so this equals running it on all parameters at once.

State. Each parameter's rule state is stored flattened into named tensors in ``self.state[p]``
next to an integer ``"step"``:

=============================  ===================================================================
rule                           entries of ``self.state[p]`` besides ``"step"``
=============================  ===================================================================
``LSTMRule`` (L layers, H)     ``"hidden.0"`` ... ``"hidden.{L-1}"``, ``"cell.0"`` ...: ``(H, numel)``
``Adam``                       ``"exp_avg"``, ``"exp_avg_sq"`` (same names as ``torch.optim.Adam``)
``RMSprop``                    ``"square_avg"`` (+ ``"grad_avg"``, ``"momentum"`` when enabled)
``SGD``/``NAG`` with momentum  ``"momentum"``
=============================  ===================================================================

so ``state_dict()``/``load_state_dict()`` round-trip and an optimizer loaded mid-run continues the
identical trajectory. The LSTM state costs ``2 * L * H`` numbers per parameter coordinate (80 for
the paper's 2 x 20 LSTM, 40 times Adam's 2): ``state_dtype=torch.bfloat16`` stores it in half the
bytes (it is upcast to the rule's dtype for each step).

The rule's weights are frozen (``requires_grad_(False)``, ``eval()``) and ``step()`` runs under
``torch.no_grad()``: no autograd graph is built and memory stays flat across steps.

torch.compile. ``torch.compile(opt.step, fullgraph=True)`` works when the compiled kernels are off
(``L2O_KERNELS=0`` or ``l2o.kernels.set_enabled(False)``; the kernels are called through raw
pointers, which cannot be traced). A step compiles to one graph; the first steps compile up to
three times (state creation, then the integer ``"step"`` counts becoming dynamic). Inside a
compiled step the non-finite check runs without a host synchronisation, by masking: a non-finite
update is still never written, but no warning is issued, the gradients are not checked first (a
rule that overwrites its state, as every shipped rule does, has that tensor's state reset to the
initial one) and the tensor's ``"step"`` count still advances. Inside a compiled step every rule is called once per tensor (the graph holds the
same operations; grouping would compare the tensors' symbolic step counts). A float ``lr`` changed by a scheduler recompiles the step for each new value (as for
torch's optimizers); give the group a tensor ``lr`` (``torch.tensor(1.0)``) to avoid that.

Differences from ``torch.optim`` semantics (all deliberate):

* ``lr`` must be a finite number ``> 0`` when given to the constructor or ``add_param_group``
  (torch accepts 0); schedulers may still drive it to 0 later (then parameters do not move, but
  the rule state still advances, as with ``torch.optim.Adam(lr=0)``).
* ``weight_decay`` is decoupled (AdamW's, scaled by the rule's nominal step size :math:`\eta`; see
  above), not the coupled L2 penalty of ``torch.optim.Adam``/``SGD``: for that, give the
  hand-designed rule its own ``weight_decay`` (``l2o.Adam(weight_decay=...)``).
* Unknown param-group keys are refused (torch keeps any key); see above for the accepted ones.
* A non-finite step is skipped with a warning (torch writes NaN/Inf into the parameter).
* Integer, bool and complex parameters are refused at construction with a ``TypeError`` (torch
  accepts integer tensors and fails, or not, later); sparse gradients raise ``TypeError`` at
  ``step()`` (torch's dense optimizers raise ``RuntimeError``).
* ``load_state_dict`` keeps the rule state in this optimizer's state dtype (the LSTM's float32, or
  ``state_dtype``) instead of casting it to each parameter's dtype as torch does for all floating
  state; it moves it to the parameter's device. It refuses a state saved by a different rule. A
  saved group without ``weight_decay`` (written before groups had one) keeps the current group's.
* The rule itself (its weights) is not part of ``state_dict()``; build the optimizer with the same
  ``pretrained``/``checkpoint``/``rule`` before loading (a mismatch of state names or shapes is
  refused with a ``ValueError``).
* ``"step"`` is a Python ``int`` (torch's built-in optimizers keep a float tensor).
* No ``maximize``, ``foreach``, ``fused``, ``capturable`` or ``differentiable`` options; OneCycleLR
  and CyclicLR need ``cycle_momentum=False`` (there is no momentum hyperparameter to cycle).
* Hand-designed rules compute :math:`u` and the adapter then adds ``lr * u``; this can differ from
  torch's fused ``param.add_(grad, alpha=-lr)`` in the last bit unless ``lr`` is a power of two.
* Hand-designed rules compute in each parameter's dtype, as torch does, so on float16 parameters
  ``RMSprop``/``Adam`` inherit torch's float16 problem: their default ``eps=1e-8`` rounds to 0 and
  small gradients give inf/NaN steps (which are then skipped, see above). Use float32 or bfloat16
  parameters, or ``eps >= 1e-4``.
* Rules tied to particular params (``MetaSGD``, whose learning rates are per named tensor) are
  refused with a ``TypeError``: the adapter calls the rule on parameters it names itself.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from itertools import chain
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import torch
from torch import Tensor

from .rules.base import Rule
from .tree import is_namedtuple, state_fill, state_leaves

__all__ = ["LearnedOptimizer", "DEFAULT_PRETRAINED"]

#: The shipped rule ``LearnedOptimizer(params)`` uses when no rule is named.
DEFAULT_PRETRAINED = "generalist-bounded"

_PARAM_KEY = "p"  # the key of a parameter in the state template (and of per-parameter rule calls)

#: Param-group hyperparameters the optimizer reads.
HYPERPARAMETERS = ("lr", "weight_decay")
#: Param-group keys that torch and common trainers keep in a group: accepted, not read (except
#: ``param_names``, which names parameters in warnings). Values: who writes them.
FOREIGN_KEYS = {
    "param_names": "torch, for named parameters",
    "initial_lr": "every torch.optim.lr_scheduler",
    "max_lr": "torch.optim.lr_scheduler.OneCycleLR",
    "min_lr": "torch.optim.lr_scheduler.OneCycleLR",
    "swa_lr": "torch.optim.swa_utils.SWALR",
    "name": "a label for the group (PyTorch Lightning's LearningRateMonitor)",
    "lr_scale": "layer-wise lr decay (timm, MAE), applied by their schedulers",
    "differentiable": "torch's bookkeeping (False only)",
}
_ACCEPTED_KEYS = frozenset(("params", *HYPERPARAMETERS, *FOREIGN_KEYS))
_ACCEPTED_TEXT = (f"params, {', '.join(HYPERPARAMETERS)} (read by the optimizer) and {', '.join(FOREIGN_KEYS)} "
                  "(kept for torch and common trainers)")


def _check_lr(lr: Any, where: str) -> float:
    if isinstance(lr, Tensor) and lr.numel() == 1 and lr.is_floating_point():
        lr = float(lr)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise TypeError(f"{where}: lr must be a number, got {type(lr).__name__} ({lr!r})")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"{where}: lr must be a finite number > 0 (it multiplies the rule's update), got {lr!r}")
    return float(lr)


def _check_weight_decay(wd: Any, where: str) -> float:
    if isinstance(wd, Tensor) and wd.numel() == 1 and wd.is_floating_point():
        wd = float(wd)
    if isinstance(wd, bool) or not isinstance(wd, (int, float)):
        raise TypeError(f"{where}: weight_decay must be a number, got {type(wd).__name__} ({wd!r})")
    if not (math.isfinite(wd) and wd >= 0):
        raise ValueError(f"{where}: weight_decay must be a finite number >= 0 (decoupled, as AdamW's), got {wd!r}")
    return float(wd)


def _check_group_keys(group: dict[str, Any], where: str) -> None:
    # torch.compile's view of an optimizer's param groups adds "capturable" while it traces a step
    tracing = torch.compiler.is_compiling()
    unknown = [k for k in group if k not in _ACCEPTED_KEYS and not (tracing and k == "capturable")]
    if unknown:
        key = unknown[0]
        hint = ""
        if key in ("momentum", "betas", "eps", "alpha", "nesterov", "dampening", "centered", "amsgrad"):
            hint = (f" ({key!r} is a hyperparameter of the rule: set it there, e.g. rule=l2o.Adam(betas=...); "
                    "schedulers that cycle momentum need cycle_momentum=False)")
        elif key in ("maximize", "foreach", "fused", "capturable", "decoupled_weight_decay"):
            hint = f" (LearnedOptimizer has no {key!r} option)"
        raise ValueError(f"{where} has key {key!r}, which LearnedOptimizer does not use{hint}; accepted keys: "
                         f"{_ACCEPTED_TEXT}")
    if group.get("differentiable", False) is not False:
        raise ValueError(f"{where} has differentiable={group['differentiable']!r}; LearnedOptimizer steps without "
                         "autograd (differentiate through l2o.unroll instead)")


def _nominal_lr(rule: Rule) -> float | None:
    """The rule's nominal step size :math:`\\eta` (``nominal_lr``, else a hand-designed rule's ``lr``)."""
    for attr in ("nominal_lr", "lr"):
        value = getattr(rule, attr, None)
        if isinstance(value, Tensor) and value.numel() == 1:
            value = float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not (math.isfinite(value) and value > 0):
                raise TypeError(f"{type(rule).__name__}.{attr} is {value!r}; a rule's nominal step size must be a "
                                "finite number > 0")
            return float(value)
    return None


def _flatten_state(tree: Any, path: tuple[str, ...] = ()) -> list[tuple[str, Any]]:
    """``[(name, leaf)]`` for a rule state (NamedTuples, tuples, lists, dicts; tensor or plain leaves).

    Names join the path with dots; the single-parameter dict key ``"p"`` is dropped, so Adam's
    ``AdamState(exp_avg={"p": m}, ...)`` gives ``"exp_avg"`` and the LSTM's ``hidden[0]`` gives
    ``"hidden.0"``.
    """
    if is_namedtuple(tree):
        return [item for f in tree._fields for item in _flatten_state(getattr(tree, f), (*path, f))]
    if isinstance(tree, (tuple, list)):
        return [item for i, v in enumerate(tree) for item in _flatten_state(v, (*path, str(i)))]
    if isinstance(tree, dict):
        return [item for k, v in tree.items()
                for item in _flatten_state(v, path if k == _PARAM_KEY else (*path, str(k)))]
    return [(".".join(path) if path else "state", tree)]


def _keyed_per_tensor(template: Any, inside: bool = False) -> bool:
    """Whether every leaf of a one-parameter state ``template`` lies in a ``{"p": ...}`` dict (and
    every other dict is empty): the layout a ``per_tensor_state`` rule's state must have."""
    if is_namedtuple(template) or isinstance(template, (tuple, list)):
        return all(_keyed_per_tensor(v, inside) for v in template)
    if isinstance(template, dict):
        if not inside and set(template) == {_PARAM_KEY}:
            return _keyed_per_tensor(template[_PARAM_KEY], True)
        return inside or not template
    return inside


def _join_states(template: Any, keys: list[str], leaves: list[Iterator[Any]]) -> Any:
    """One rule state for the tensors ``keys`` from each one's leaves (``template`` from a
    one-parameter ``init``, every leaf in a ``{"p": ...}`` dict): ``{"p": x}`` becomes ``{k: x_k}``."""
    if is_namedtuple(template):
        return type(template)(*(_join_states(v, keys, leaves) for v in template))
    if isinstance(template, (tuple, list)):
        return type(template)(_join_states(v, keys, leaves) for v in template)
    if template:  # {"p": subtree}
        return {k: state_fill(template[_PARAM_KEY], it) for k, it in zip(keys, leaves)}
    return {}


def _split_state(template: Any, state: Any, keys: list[str]) -> list[list[Any]]:
    """Inverse of :func:`_join_states`: the leaves of each tensor's part of ``state``, in ``keys`` order."""
    out: list[list[Any]] = [[] for _ in keys]

    def walk(t: Any, s: Any) -> None:
        if is_namedtuple(t) or isinstance(t, (tuple, list)):
            for a, b in zip(t, s):
                walk(a, b)
        elif t:  # {"p": subtree}
            for leaves, k in zip(out, keys):
                leaves.extend(state_leaves(s[k]))

    walk(template, state)
    return out


def _finite_flags(tensors: list[Tensor]) -> Tensor:
    """Whether each of ``tensors`` (non-empty, on one device) is all finite, exactly, as one bool
    tensor and without a host synchronisation: a tensor is finite exactly when its min and max are
    (both are NaN if any entry is), so one ``aminmax`` per tensor and one stack (80-100 times faster
    than ``isfinite().all()`` or the inf-norm on a 1M-float CPU tensor)."""
    extremes = torch.stack([torch.stack(torch.aminmax(t)) for t in tensors])
    return extremes.isfinite().all(dim=1)


def _finite_sums(tensors: list[Tensor]) -> Tensor:
    """Whether each of ``tensors`` (non-empty, on one device) has a finite sum, as one bool tensor.

    A finite sum means a finite tensor (a NaN or Inf entry makes the sum NaN or Inf); a sum that is
    not finite can also be the overflow of finite entries, so :func:`_nonfinite` re-checks those
    with :func:`_finite_flags`. Sums accumulate in float32 at least (a half-precision tensor's sum
    does not overflow at 65504) and take half the time of :func:`_finite_flags`."""
    return torch.stack([t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
                        for t in tensors]).isfinite()


def _by_device(tensors: list[Tensor]) -> list[list[int]]:
    """The indices of ``tensors`` grouped by device, leaving out empty tensors (finite; their min is
    undefined) and meta tensors (no values)."""
    by_device: dict[torch.device, list[int]] = {}
    for k, t in enumerate(tensors):
        if t.numel() and t.device.type != "meta":
            by_device.setdefault(t.device, []).append(k)
    return list(by_device.values())


def _finite_by_device(tensors: list[Tensor]) -> list[tuple[list[int], Tensor]]:
    """``[(indices, flags)]``: :func:`_finite_flags` of ``tensors`` per device (indices into ``tensors``)."""
    return [(ks, _finite_flags([tensors[k] for k in ks])) for ks in _by_device(tensors)]


def _nonfinite(tensors: list[Tensor]) -> set[int]:
    """Indices of the ``tensors`` that hold a NaN or Inf: one stacked sum and one host
    synchronisation per device; only a tensor whose sum is not finite is checked again, exactly."""
    checks = [(ks, _finite_sums([tensors[k] for k in ks])) for ks in _by_device(tensors)]
    if all(bool(ok.all()) for _, ok in checks):
        return set()
    suspects = [ks[j] for ks, ok in checks for j in torch.nonzero(~ok).flatten().tolist()]
    exact = _finite_by_device([tensors[k] for k in suspects])
    return {suspects[i] for ks, ok in exact for i, finite in zip(ks, ok.tolist()) if not finite}


class _Update(NamedTuple):
    """One tensor's step, computed but not yet written (see :meth:`LearnedOptimizer._write`)."""

    group: int  # param group index
    index: int  # position in the group
    param: Tensor
    update: Tensor  # in the param's dtype
    new: list[Any]  # the new state leaves, in _state_names order
    kept: bool  # whether the stored state is intact (so a skipped step can keep it)


class LearnedOptimizer(torch.optim.Optimizer):
    r"""A learned (or hand-designed) l2o rule as a drop-in :class:`torch.optim.Optimizer`.

    For every parameter :math:`\theta` with a gradient :math:`g`, one step is

    .. math::
        u = \text{rule}(g, s, \theta), \qquad
        \theta \leftarrow (1 - \text{lr}\cdot\eta\cdot\lambda)\,\theta + \text{lr}\cdot u

    with ``lr`` and :math:`\lambda` = ``weight_decay`` the parameter's group's, :math:`s` its rule
    state and :math:`\eta` the rule's nominal step size (its ``nominal_lr``, or a hand-designed
    rule's ``lr``). The weight decay is decoupled, as ``torch.optim.AdamW``'s: with
    ``rule=l2o.Adam(lr=1e-3)`` and ``weight_decay=0.1`` the trajectory is ``AdamW(lr=1e-3,
    weight_decay=0.1)``'s. A NaN or Inf is never written: a tensor with a non-finite gradient or
    update is skipped (parameter unchanged, rule state kept, or reset where the rule had already
    overwritten it) with a warning naming it.

    Args:
        params: iterable of parameters, of ``(name, parameter)`` pairs, or of param-group dicts, as
            for any torch optimizer (see :mod:`l2o.optim` for the accepted group keys).
        pretrained: name of a rule shipped with l2o (see :func:`l2o.list_pretrained`).
        checkpoint: path of a rule checkpoint (``l2o meta-train --out ...`` or :func:`l2o.save_rule`).
        rule: an :class:`l2o.Rule` object (an ``LSTMRule`` or a hand-designed rule); it is copied.
        lr: multiplies the rule's update (default 1: the rule's own step). A per-group
            hyperparameter, driven by LR schedulers.
        weight_decay: decoupled weight decay :math:`\lambda \ge 0` (default 0), a per-group
            hyperparameter; needs a rule with a nominal step size.
        state_dtype: dtype the rule state is stored in between steps (default: the LSTM's own
            dtype, or each parameter's dtype for hand-designed rules). ``torch.bfloat16`` halves
            the LSTM state's memory; it is upcast for each step's computation.
        total_steps: the number of ``step()`` calls the training will make, for rules with
            training-progress inputs (:class:`l2o.MLPRule`: the fraction of training done
            enters the rule); optional, such a rule also works without it. Refused (``TypeError``)
            by rules without such inputs.

    At most one of ``pretrained``, ``checkpoint`` and ``rule`` may be given; with none,
    ``pretrained="generalist-bounded"`` (:data:`DEFAULT_PRETRAINED`) is used. See the module
    docstring of :mod:`l2o.optim` for the state layout, non-finite updates, ``torch.compile`` and
    every difference from ``torch.optim``.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[tuple[str, Tensor]] | Iterable[dict[str, Any]],
        *,
        pretrained: str | None = None,
        checkpoint: str | os.PathLike | None = None,
        rule: Rule | None = None,
        lr: float = 1.0,
        weight_decay: float = 0.0,
        state_dtype: torch.dtype | None = None,
        total_steps: int | None = None,
    ) -> None:
        given = [name for name, value in (("pretrained", pretrained), ("checkpoint", checkpoint), ("rule", rule))
                 if value is not None]
        if len(given) > 1:
            raise ValueError(
                "LearnedOptimizer takes at most one of pretrained= (a shipped rule name, see "
                f"l2o.list_pretrained()), checkpoint= (a path) or rule= (an l2o rule object); got {' and '.join(given)}"
            )
        if not given:
            pretrained = DEFAULT_PRETRAINED
        lr = _check_lr(lr, "LearnedOptimizer")
        weight_decay = _check_weight_decay(weight_decay, "LearnedOptimizer")
        if state_dtype is not None and not (isinstance(state_dtype, torch.dtype) and state_dtype.is_floating_point):
            raise TypeError(f"state_dtype must be a floating torch.dtype such as torch.bfloat16, got {state_dtype!r}")
        if pretrained is not None:
            from .pretrained import load_pretrained

            rule = load_pretrained(pretrained)
        elif checkpoint is not None:
            from .checkpoints import load_rule

            if not isinstance(checkpoint, (str, os.PathLike)):
                raise TypeError(f"checkpoint must be a path (str or os.PathLike) of a rule checkpoint, got "
                                f"{type(checkpoint).__name__} ({checkpoint!r})")

            rule = load_rule(checkpoint)
        elif not isinstance(rule, Rule):
            raise TypeError(
                f"rule must be an l2o rule (l2o.Rule: LSTMRule, SGD, NAG, RMSprop, Adam), got {type(rule).__name__}; "
                "for a torch.optim optimizer use it directly"
            )
        rule = copy.deepcopy(rule)
        rule.requires_grad_(False)
        rule.eval()
        if total_steps is not None:
            if not hasattr(rule, "total_steps"):
                raise TypeError(f"total_steps= is read by rules with training-progress inputs (l2o.MLPRule, e.g. "
                                f"pretrained='generalist'); {type(rule).__name__} has none: leave total_steps out")
            if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
                raise ValueError(f"total_steps must be a positive integer (the number of step() calls the training "
                                 f"will make), got {total_steps!r}")
            rule.total_steps = total_steps
        self.rule: Rule = rule
        self.state_dtype: torch.dtype | None = state_dtype
        # A learned rule computes in its weights' dtype; a hand-designed one in each param's dtype.
        self._rule_dtype: torch.dtype | None = next(
            (w.dtype for w in rule.parameters() if w.is_floating_point()), None)
        self._nominal_lr: float | None = _nominal_lr(rule)
        try:
            template = rule.init({_PARAM_KEY: torch.zeros(1)})
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"{type(rule).__name__} cannot drive a torch.optim optimizer: LearnedOptimizer calls the rule on "
                f"parameters it names itself, and this rule is tied to particular params ({exc}); use it with l2o.MAML "
                "or l2o.unroll instead"
            ) from None
        self._state_template = state_fill(template, iter(lambda: None, 0))  # the structure, leaves None
        self._state_names = tuple(name for name, _ in _flatten_state(template))
        if "step" in self._state_names or len(set(self._state_names)) != len(self._state_names):
            raise TypeError(f"{type(rule).__name__}'s state has field names {self._state_names} that clash with "
                            "each other or with 'step'")
        self._per_tensor: bool = bool(getattr(rule, "per_tensor_state", False))
        if self._per_tensor and not _keyed_per_tensor(self._state_template):
            raise TypeError(f"{type(rule).__name__} sets per_tensor_state but its state is not keyed by tensor "
                            f"(init({{'p': p}}) gave {type(template).__name__} with entries outside a {{'p': ...}} dict)")
        # update_ may overwrite the state it is given (the default, update, never does)
        self._overwrites_state: bool = type(rule).update_ is not Rule.update_
        self._device_rules: dict[torch.device, Rule] = {}
        self._warned: set[tuple[int, int]] = set()  # (group, position) of parameters warned about

        if isinstance(params, Tensor):
            raise TypeError("params must be an iterable of tensors or of param-group dicts (e.g. model.parameters()), "
                            "got a single Tensor: wrap it in a list")
        try:
            iterator = iter(params)
        except TypeError:
            raise TypeError("params must be an iterable of tensors or of param-group dicts (e.g. model.parameters()), "
                            f"got {type(params).__name__}") from None
        params = list(iterator)
        if not params:
            raise ValueError("LearnedOptimizer got an empty parameter list: pass model.parameters() (a generator "
                             "can only be consumed once) or a non-empty list of tensors")
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    # ------------------------------------------------------------------------------ param groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (missing hyperparameters come from ``defaults``); refuses bad params,
        ``lr``, ``weight_decay`` and unknown keys (see :mod:`l2o.optim`)."""
        if not isinstance(param_group, dict) or "params" not in param_group:
            found = f"a dict with keys {sorted(map(str, param_group))}" if isinstance(param_group, dict) else \
                type(param_group).__name__
            raise TypeError(f"a param group must be a dict with a 'params' entry (an iterable of tensors) and "
                            f"optionally 'lr' and 'weight_decay', got {found}")
        where = f"param group {len(self.param_groups)}"
        _check_group_keys(param_group, where)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            lr = _check_lr(group["lr"], where)
            wd = _check_weight_decay(group["weight_decay"], where)
            self._check_decay(wd, where)
            if lr * (self._nominal_lr or 0.0) * wd >= 1:
                raise ValueError(f"{where}: lr * nominal step size * weight_decay = {lr} * {self._nominal_lr} * {wd} "
                                 ">= 1 would shrink the parameters to zero or flip their sign in one step; use a "
                                 "smaller weight_decay")
            for i, p in enumerate(group["params"]):
                what = f"parameter {i} of {where} (shape {tuple(p.shape)}, {p.dtype})"
                if p.layout != torch.strided:
                    raise TypeError(f"{what} has layout {p.layout}; LearnedOptimizer supports dense (strided) tensors")
                if p.is_complex():
                    raise TypeError(f"{what} is complex; LearnedOptimizer supports real floating-point parameters "
                                    "only (optimize torch.view_as_real(param) as a real tensor instead)")
                if not p.is_floating_point():
                    raise TypeError(f"{what} is not floating point; LearnedOptimizer optimizes float16, bfloat16, "
                                    "float32 or float64 parameters (leave integer buffers out of the optimizer)")
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    def _check_decay(self, wd: float, where: str) -> None:
        if wd > 0 and self._nominal_lr is None:
            raise ValueError(
                f"{where}: weight_decay={wd} needs the rule's nominal step size (the decay per step is lr * "
                f"nominal_lr * weight_decay, as AdamW's lr * weight_decay), but {type(self.rule).__name__} declares "
                "none (no nominal_lr attribute); use weight_decay=0, or set rule.nominal_lr to the step size its "
                "updates are comparable to before building the optimizer"
            )

    # ------------------------------------------------------------------------------ state layout

    def _rule_on(self, device: torch.device) -> Rule:
        """The rule with its weights on ``device`` (a lazily made, cached copy for other devices)."""
        if self._rule_dtype is None:
            return self.rule  # no weights: device-agnostic
        home = next(iter(self.rule.parameters())).device
        if device == home:
            return self.rule
        cached = self._device_rules.get(device)
        if cached is None:
            cached = copy.deepcopy(self.rule).to(device)
            self._device_rules[device] = cached
        return cached

    def _storage_dtype(self, p: Tensor) -> torch.dtype:
        if self.state_dtype is not None:
            return self.state_dtype
        return self._rule_dtype if self._rule_dtype is not None else p.dtype

    def _compute_dtype(self, p: Tensor) -> torch.dtype:
        return self._rule_dtype if self._rule_dtype is not None else p.dtype

    def _init_state(self, p: Tensor, rule: Rule) -> dict[str, Any]:
        template = rule.init({_PARAM_KEY: p.detach()})
        storage = self._storage_dtype(p)
        state: dict[str, Any] = {"step": 0}
        for name, leaf in _flatten_state(template):
            state[name] = leaf.to(storage) if isinstance(leaf, Tensor) and leaf.is_floating_point() else leaf
        return state

    def _rule_inputs(self, p: Tensor, rule: Rule) -> tuple[list[Any], bool]:
        """The parameter's stored state leaves in the compute dtype (its state made on first use),
        and whether they are all copies (so ``update_`` cannot overwrite the stored state)."""
        state = self.state[p]
        if not state:
            state.update(self._init_state(p, rule))
        compute = self._compute_dtype(p)
        values, copies = [], True
        for name in self._state_names:
            stored = state[name]
            value = stored
            if isinstance(stored, Tensor) and stored.is_floating_point():
                value = stored.to(device=p.device, dtype=compute)
            copies = copies and (value is not stored or not isinstance(stored, Tensor))
            values.append(value)
        return values, copies

    # ------------------------------------------------------------------------------ stepping

    def _check_step(self) -> None:
        """Refuse (before changing any parameter) unknown group keys, bad hyperparameters and sparse grads."""
        for gi, group in enumerate(self.param_groups):
            where = f"param group {gi}"
            _check_group_keys(group, where)
            wd = group["weight_decay"]
            if not isinstance(wd, Tensor):
                self._check_decay(_check_weight_decay(wd, where), where)
            lr = group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not isinstance(lr, Tensor) and lr != 1 and not abs(lr) <= torch.finfo(p.dtype).max:
                    raise ValueError(f"lr={lr!r} of {where} does not fit its {p.dtype} parameters (it multiplies "
                                     "their updates); use a finite lr within the dtype's range")
                if p.grad.layout != torch.strided:
                    raise TypeError(
                        f"LearnedOptimizer does not support sparse gradients (parameter of shape {tuple(p.shape)} has a "
                        f"{p.grad.layout} gradient); use dense gradients (e.g. nn.Embedding(sparse=False)) or "
                        "torch.optim.SparseAdam for that parameter"
                    )

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Apply one update of the rule to every parameter with a gradient (see :mod:`l2o.optim`).

        ``closure`` (optional) re-evaluates the model and returns the loss; it runs with autograd
        enabled before the update, and its loss is returned.
        """
        loss = None
        if closure is not None and not callable(closure):
            raise TypeError(f"closure must be a callable that re-evaluates the model and returns the loss, or None, "
                            f"got {type(closure).__name__}")
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rule_loss = loss.detach() if isinstance(loss, Tensor) else None
        self._check_step()
        held_back = self._nonfinite_grads()
        pending: list[_Update] = []
        for gi, group in enumerate(self.param_groups):
            members = [(i, p) for i, p in enumerate(group["params"]) if p.grad is not None and (gi, i) not in held_back]
            # inside torch.compile, one call per tensor too: grouping compares the tensors' step counts,
            # symbolic there (comparing them made inductor lose a symbol: NameError in its generated code)
            if not self._per_tensor or torch.compiler.is_compiling():
                for i, p in members:
                    pending.append(self._update_one(gi, i, p, rule_loss))
                continue
            # tensors that share a step count and device: one rule call (a list, not a dict keyed by the
            # count: hashing it would make torch.compile specialise the step on its value)
            buckets: list[tuple[int, torch.device, list[tuple[int, Tensor]]]] = []
            for i, p in members:
                if not self.state[p]:
                    self.state[p].update(self._init_state(p, self._rule_on(p.device)))
                step = self.state[p]["step"]
                bucket = next((b for s, d, b in buckets if s == step and d == p.device), None)
                if bucket is None:
                    buckets.append((step, p.device, bucket := []))
                bucket.append((i, p))
            for step, device, bucket in buckets:
                pending.extend(self._update_group(gi, bucket, step, device, rule_loss))
        self._write(pending)
        for gi, i in sorted(held_back):
            self._warn_once(gi, i, "gradient", "its rule state was kept", depth=1)
        return loss

    def _nonfinite_grads(self) -> set[tuple[int, int]]:
        """``(group, position)`` of the parameters whose gradient is not finite, for a rule that
        overwrites its state (checked before it runs, so that their state is kept); else nothing.
        Not inside ``torch.compile`` (see :meth:`_write_masked`)."""
        if not self._overwrites_state or torch.compiler.is_compiling():
            return set()
        where = [(gi, i, p.grad) for gi, group in enumerate(self.param_groups) for i, p in enumerate(group["params"])
                 if p.grad is not None]
        bad = _nonfinite([g for _, _, g in where])
        return {where[k][:2] for k in bad}

    def _update_one(self, gi: int, i: int, p: Tensor, rule_loss: Tensor | None) -> _Update:
        """One rule call for one parameter (``{"p": p}``)."""
        rule = self._rule_on(p.device)
        values, copies = self._rule_inputs(p, rule)
        rule_state = state_fill(self._state_template, iter(values))
        updates, new_state = rule.update_({_PARAM_KEY: p.grad.detach()}, rule_state, {_PARAM_KEY: p.detach()},
                                          step=self.state[p]["step"], loss=rule_loss)
        u = updates[_PARAM_KEY]
        return _Update(gi, i, p, u if u.dtype == p.dtype else u.to(p.dtype), state_leaves(new_state),
                       copies or not self._overwrites_state)

    def _update_group(self, gi: int, members: list[tuple[int, Tensor]], step: int, device: torch.device,
                      rule_loss: Tensor | None) -> list[_Update]:
        """One rule call for the parameters ``members`` of group ``gi`` (keyed by position)."""
        rule = self._rule_on(device)
        keys = [str(i) for i, _ in members]
        inputs = [self._rule_inputs(p, rule) for _, p in members]
        rule_state = _join_states(self._state_template, keys, [iter(values) for values, _ in inputs])
        grads = {k: p.grad.detach() for k, (_, p) in zip(keys, members)}
        params = {k: p.detach() for k, (_, p) in zip(keys, members)}
        updates, new_state = rule.update_(grads, rule_state, params, step=step, loss=rule_loss)
        out = []
        for k, (i, p), new, (_, copies) in zip(keys, members, _split_state(self._state_template, new_state, keys),
                                                inputs):
            u = updates[k]
            out.append(_Update(gi, i, p, u if u.dtype == p.dtype else u.to(p.dtype), new,
                               copies or not self._overwrites_state))
        return out

    def _write(self, pending: list[_Update]) -> None:
        """Check every update for non-finite values (one fused reduction) and write the finite ones."""
        if not pending:
            return
        if torch.compiler.is_compiling():
            self._write_masked(pending)
            return
        bad = _nonfinite([r.update for r in pending])
        good = [r for k, r in enumerate(pending) if k not in bad]
        for gi in sorted({r.group for r in good}):
            self._apply(self.param_groups[gi], [r for r in good if r.group == gi])
        for r in good:
            self._store(r.param, r.new)
        for r in (pending[k] for k in sorted(bad)):
            if not r.kept:  # the rule overwrote the stored state: start afresh
                self.state[r.param].clear()
                self.state[r.param].update(self._init_state(r.param, self._rule_on(r.param.device)))
            self._warn_once(r.group, r.index, "update", "its rule state was kept" if r.kept else
                            f"{type(self.rule).__name__} had overwritten its rule state, which was reset to the "
                            "initial state", depth=2)

    def _decay_factor(self, group: dict[str, Any]) -> Any:
        """:math:`1 - \\text{lr}\\,\\eta\\,\\lambda` of a group (1 without weight decay)."""
        wd = group["weight_decay"]
        if isinstance(wd, (int, float)) and wd == 0:
            return 1.0
        return 1 - group["lr"] * self._nominal_lr * wd

    def _apply(self, group: dict[str, Any], rs: list[_Update]) -> None:
        """Write the (finite) updates ``rs`` of one group into its parameters."""
        params = [r.param for r in rs]
        updates = [r.update for r in rs]
        decay = self._decay_factor(group)
        if not (isinstance(decay, float) and decay == 1.0):
            torch._foreach_mul_(params, decay)
        lr = group["lr"]
        if isinstance(lr, Tensor):
            torch._foreach_add_(params, torch._foreach_mul(updates, lr))
        elif lr == 1:
            torch._foreach_add_(params, updates)
        else:
            torch._foreach_add_(params, updates, alpha=lr)

    def _store(self, p: Tensor, new: list[Any]) -> None:
        state = self.state[p]
        storage = self._storage_dtype(p)
        for name, value in zip(self._state_names, new):
            if isinstance(value, Tensor) and value.is_floating_point() and value.dtype != storage:
                value = value.to(storage)
            state[name] = value
        state["step"] += 1

    def _warn_once(self, gi: int, i: int, what: str, state: str, depth: int) -> None:
        """Warn that parameter ``i`` of group ``gi`` was skipped (its ``what`` was not finite), once per
        parameter; ``depth``: frames from :meth:`step` to here."""
        if (gi, i) in self._warned:
            return
        self._warned.add((gi, i))
        group = self.param_groups[gi]
        names = group.get("param_names")
        name = f" {names[i]!r}" if isinstance(names, (list, tuple)) and i < len(names) else ""
        warnings.warn(
            f"LearnedOptimizer: the {what} of parameter{name} (param group {gi}, position {i}, shape "
            f"{tuple(group['params'][i].shape)}) is not finite (NaN or Inf), so its step was skipped: the parameter "
            f"is unchanged and {state}. Further non-finite steps of this parameter are skipped without a warning; "
            "check the loss and gradients for inf/NaN (e.g. lower lr or clip gradients)",
            RuntimeWarning, stacklevel=depth + 4)  # + step, no_grad's wrapper, the step hooks' wrapper, the caller

    def _write_masked(self, pending: list[_Update]) -> None:
        """:meth:`_write` without a host synchronisation (inside ``torch.compile``): every tensor is
        written through ``torch.where`` on its finiteness flag; no warning, the step count advances."""
        flags: dict[int, Tensor] = {}
        for ks, ok in _finite_by_device([r.update for r in pending]):
            for j, k in enumerate(ks):
                flags[k] = ok[j]
        for k, r in enumerate(pending):
            ok = flags.get(k)
            group = self.param_groups[r.group]
            p, u = r.param, r.update
            if ok is not None:
                u = torch.where(ok, u, 0)
            decay = self._decay_factor(group)
            if not (isinstance(decay, float) and decay == 1.0):
                factor = torch.as_tensor(decay, dtype=p.dtype, device=p.device)
                p.mul_(factor if ok is None else torch.where(ok, factor, 1))
            lr = group["lr"]
            if isinstance(lr, Tensor):
                p.add_(u * lr)
            elif lr == 1:
                p.add_(u)
            else:
                p.add_(u, alpha=lr)
            if ok is None:
                self._store(p, r.new)
                continue
            state = self.state[p]
            source = state if r.kept else self._init_state(p, self._rule_on(p.device))
            storage = self._storage_dtype(p)
            new = []
            for value, name in zip(r.new, self._state_names):
                if isinstance(value, Tensor) and value.is_floating_point():
                    before = source[name].to(device=value.device, dtype=storage)
                    value = torch.where(ok, value.to(storage), before)
                new.append(value)
            self._store(p, new)

    # ------------------------------------------------------------------------------ (de)serialising

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`; the rule state keeps this optimizer's state dtype (see module docs).

        Refuses (``ValueError``, before changing anything) a state whose entries or shapes do not
        match this optimizer's rule. A float-tensor ``"step"`` (as saved by torch's optimizers) is
        read as an ``int``.
        """
        groups_saved = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        saved_state = state_dict.get("state") if isinstance(state_dict, dict) else None
        if not isinstance(groups_saved, list) or not isinstance(saved_state, dict) or not all(
                isinstance(g, dict) and isinstance(g.get("params"), list)
                and all(isinstance(i, int) for i in g["params"]) for g in groups_saved):
            raise ValueError("not an optimizer state_dict: expected a dict with 'state' and 'param_groups' (a list of "
                             "dicts, each with a 'params' list of parameter ids)")
        for i, g in enumerate(groups_saved):
            lr = g.get("lr")
            lr = float(lr) if isinstance(lr, Tensor) and lr.numel() == 1 and lr.is_floating_point() else lr
            # 0 is allowed here: a scheduler may have driven lr there before the state was saved
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr >= 0):
                raise ValueError(f"state_dict param group {i} has lr {g.get('lr')!r}; expected a finite number >= 0")
            if "weight_decay" in g:
                self._check_decay(_check_weight_decay(g["weight_decay"], f"state_dict param group {i}"),
                                  f"state_dict param group {i}")
        groups_saved, dropped = self._own_groups(groups_saved)
        if dropped:
            warnings.warn(f"LearnedOptimizer.load_state_dict: dropped param-group keys {sorted(dropped)} of the saved "
                          "optimizer, which LearnedOptimizer does not use (the rule's own hyperparameters apply)",
                          RuntimeWarning, stacklevel=2)
        saved_ids = list(chain.from_iterable(g["params"] for g in groups_saved))
        own = list(chain.from_iterable(g["params"] for g in self.param_groups))
        id_map = dict(zip(saved_ids, own)) if len(saved_ids) == len(own) else {}
        names = set(self._state_names)
        try:  # the rule on the meta device, to get expected state shapes without allocating
            meta_rule: Rule | None = copy.deepcopy(self.rule).to("meta")
        except (RuntimeError, NotImplementedError, TypeError):  # pragma: no cover
            meta_rule = None
        kept: dict[Any, Any] = {}
        rule_entries: dict[Any, dict[str, Any]] = {}
        for pid, entry in saved_state.items():
            if pid in id_map and not isinstance(entry, dict):
                raise ValueError(f"state_dict state of parameter {pid} is a {type(entry).__name__}; expected a dict")
            if isinstance(entry, dict) and pid in id_map:
                if entry:
                    self._check_saved_state(pid, entry, id_map[pid], meta_rule)
                rule_entries[pid] = {k: v for k, v in entry.items() if k in names}
                kept[pid] = {k: v for k, v in entry.items() if k not in names}
            else:
                kept[pid] = entry
        # torch validates the groups, maps saved ids to this optimizer's params and loads the rest
        super().load_state_dict({**state_dict, "state": kept, "param_groups": groups_saved})
        for pid, entries in rule_entries.items():
            p = id_map[pid]
            state = self.state[p]
            if isinstance(state.get("step"), Tensor):
                state["step"] = int(state["step"].item())
            storage = self._storage_dtype(p)
            for name, value in entries.items():
                if isinstance(value, Tensor):
                    dtype = storage if value.is_floating_point() else value.dtype
                    value = value.to(device=p.device, dtype=dtype, copy=True)
                else:
                    value = copy.deepcopy(value)
                state[name] = value

    def _own_groups(self, groups_saved: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], set[str]]:
        """The saved groups with only the keys this optimizer accepts (and the keys dropped); a
        hyperparameter a saved group lacks (saved before it existed) keeps the current group's value."""
        out, dropped = [], set()
        for i, g in enumerate(groups_saved):
            keep = {k for k in g if k in _ACCEPTED_KEYS and not (k == "differentiable" and g[k] is not False)}
            dropped |= {str(k) for k in g if k not in keep}
            own = {k: v for k, v in g.items() if k in keep}
            current = self.param_groups[i] if i < len(self.param_groups) else self.defaults
            for key in HYPERPARAMETERS:
                own.setdefault(key, current.get(key, self.defaults[key]))
            out.append(own)
        return out, dropped

    def _check_saved_state(self, pid: Any, entry: dict[str, Any], p: Tensor, meta_rule: Rule | None) -> None:
        expected = set(self._state_names) | {"step"}
        if set(entry) != expected:
            raise ValueError(
                f"state_dict was saved by an optimizer with a different rule: parameter {pid} has state entries "
                f"{sorted(map(str, entry))}, but this optimizer's rule ({type(self.rule).__name__}) keeps "
                f"{sorted(expected)}; build the optimizer with the same rule before loading"
            )
        step = entry["step"]
        if isinstance(step, Tensor):
            ok = step.numel() == 1 and not step.is_complex() and float(step) >= 0 and float(step).is_integer()
        else:
            ok = isinstance(step, int) and not isinstance(step, bool) and step >= 0
        if not ok:
            raise ValueError(f"state_dict entry 'step' of parameter {pid} is {step!r}; expected an int >= 0")
        if meta_rule is None:  # pragma: no cover
            return
        try:  # shapes from the rule's init on the meta device (allocates nothing)
            template = dict(_flatten_state(meta_rule.init({_PARAM_KEY: torch.empty(p.shape, device="meta")})))
        except (RuntimeError, NotImplementedError, TypeError):  # pragma: no cover - rule not meta-friendly
            return
        for name, value in entry.items():
            want = template.get(name)
            if isinstance(want, Tensor) and not isinstance(value, Tensor):
                raise ValueError(f"state_dict does not match this optimizer: state {name!r} of parameter {pid} is a "
                                 f"{type(value).__name__}, but {type(self.rule).__name__} keeps a tensor there")
            if isinstance(want, Tensor) and want.is_floating_point() and not value.is_floating_point():
                raise ValueError(f"state_dict does not match this optimizer: state {name!r} of parameter {pid} is "
                                 f"{value.dtype}, but {type(self.rule).__name__} keeps a floating-point tensor there")
            if isinstance(want, Tensor) and value.shape != want.shape:
                raise ValueError(
                    f"state_dict does not match this optimizer: state {name!r} of parameter {pid} has shape "
                    f"{tuple(value.shape)}, but {type(self.rule).__name__} on a parameter of shape {tuple(p.shape)} "
                    f"keeps shape {tuple(want.shape)} (a different model or rule config?)"
                )

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim.Optimizer pickles/deep-copies only defaults, state and param_groups
        state = super().__getstate__()
        state.update(
            rule=self.rule,
            state_dtype=self.state_dtype,
            _rule_dtype=self._rule_dtype,
            _state_template=self._state_template,
            _state_names=self._state_names,
            _nominal_lr=self._nominal_lr,
            _per_tensor=self._per_tensor,
            _overwrites_state=self._overwrites_state,
            _device_rules={},
            _warned=set(self._warned),
        )
        return state

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} (", f"    rule: {type(self.rule).__name__}({self.rule.extra_repr()})"]
        if self.state_dtype is not None:
            lines.append(f"    state_dtype: {self.state_dtype}")
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            for key in sorted(group):
                if key != "params":
                    lines.append(f"    {key}: {group[key]}")
        lines.append(")")
        return "\n".join(lines)
