r"""The torch.optim adapter: any l2o rule as a real :class:`torch.optim.Optimizer`.

::

    import l2o
    opt = l2o.LearnedOptimizer(model.parameters(), pretrained="quadratic")  # or checkpoint=..., rule=...
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=50, gamma=0.5)
    for x, y in loader:
        opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step(); sched.step()

For every parameter :math:`\theta` with a gradient, ``step()`` asks the rule for its update
:math:`u` and applies :math:`\theta \leftarrow \theta + \text{lr} \cdot u`, with ``lr`` the
parameter group's learning rate (default 1, so the learned rule's own step is used unchanged).
``lr`` lives in ``defaults``/``param_groups``, so every ``torch.optim.lr_scheduler`` works.

With a hand-designed rule (``rule=l2o.Adam(lr=1e-3)``) the rule's own ``lr`` applies *and* the
group's ``lr`` multiplies it: ``LearnedOptimizer(ps, rule=l2o.SGD(lr=0.1), lr=0.5)`` takes the steps
of ``torch.optim.SGD(ps, lr=0.05)``. Leave the group ``lr`` at 1 to get the rule's own steps, and
let a scheduler scale it.

State. The rule is called on one parameter at a time (``{"p": p}``); the coordinate-wise LSTM is
separable per tensor, so this equals running it on all parameters at once. Each parameter's rule
state is stored flattened into named tensors in ``self.state[p]`` next to an integer ``"step"``:

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

Differences from ``torch.optim`` semantics (all deliberate):

* ``lr`` must be a finite number ``> 0`` when given to the constructor or ``add_param_group``
  (torch accepts 0); schedulers may still drive it to 0 later (then parameters do not move, but
  the rule state still advances, as with ``torch.optim.Adam(lr=0)``).
* Integer, bool and complex parameters are refused at construction with a ``TypeError`` (torch
  accepts integer tensors and fails, or not, later); sparse gradients raise ``TypeError`` at
  ``step()`` (torch's dense optimizers raise ``RuntimeError``).
* ``load_state_dict`` keeps the rule state in this optimizer's state dtype (the LSTM's float32, or
  ``state_dtype``) instead of casting it to each parameter's dtype as torch does for all floating
  state; it moves it to the parameter's device. It refuses a state saved by a different rule.
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
  small gradients give inf/NaN steps. Use float32 or bfloat16 parameters, or ``eps >= 1e-4``.
* Rules tied to particular params (``MetaSGD``, whose learning rates are per named tensor) are
  refused with a ``TypeError``: the adapter calls the rule on one parameter at a time.
"""

from __future__ import annotations

import copy
import math
import os
from itertools import chain
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from .rules.base import Rule
from .tree import is_namedtuple, state_fill, state_leaves

__all__ = ["LearnedOptimizer"]

_PARAM_KEY = "p"  # the one key of the params dict each rule call receives


def _check_lr(lr: Any, where: str) -> float:
    if isinstance(lr, Tensor) and lr.numel() == 1 and lr.is_floating_point():
        lr = float(lr)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise TypeError(f"{where}: lr must be a number, got {type(lr).__name__} ({lr!r})")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"{where}: lr must be a finite number > 0 (it multiplies the rule's update), got {lr!r}")
    return float(lr)


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


class LearnedOptimizer(torch.optim.Optimizer):
    r"""A learned (or hand-designed) l2o rule as a drop-in :class:`torch.optim.Optimizer`.

    Args:
        params: iterable of parameters or of param-group dicts, as for any torch optimizer.
        pretrained: name of a rule shipped with l2o (see :func:`l2o.list_pretrained`).
        checkpoint: path of a rule checkpoint (``l2o meta-train --out ...`` or :func:`l2o.save_rule`).
        rule: an :class:`l2o.Rule` object (an ``LSTMRule`` or a hand-designed rule); it is copied.
        lr: multiplies the rule's update, :math:`\theta \leftarrow \theta + \text{lr}\cdot u`
            (default 1: the rule's own step). A per-group hyperparameter, driven by LR schedulers.
        state_dtype: dtype the rule state is stored in between steps (default: the LSTM's own
            dtype, or each parameter's dtype for hand-designed rules). ``torch.bfloat16`` halves
            the LSTM state's memory; it is upcast for each step's computation.

    Exactly one of ``pretrained``, ``checkpoint`` and ``rule`` must be given. See the module
    docstring of :mod:`l2o.optim` for the state layout and every difference from ``torch.optim``.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        *,
        pretrained: str | None = None,
        checkpoint: str | os.PathLike | None = None,
        rule: Rule | None = None,
        lr: float = 1.0,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        given = [name for name, value in (("pretrained", pretrained), ("checkpoint", checkpoint), ("rule", rule))
                 if value is not None]
        if len(given) != 1:
            which = f"got {' and '.join(given)}" if given else "got none of them"
            raise ValueError(
                "LearnedOptimizer needs exactly one of pretrained= (a shipped rule name, see "
                f"l2o.list_pretrained()), checkpoint= (a path) or rule= (an l2o rule object); {which}"
            )
        lr = _check_lr(lr, "LearnedOptimizer")
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
        self.rule: Rule = rule
        self.state_dtype: torch.dtype | None = state_dtype
        # A learned rule computes in its weights' dtype; a hand-designed one in each param's dtype.
        self._rule_dtype: torch.dtype | None = next(
            (w.dtype for w in rule.parameters() if w.is_floating_point()), None)
        try:
            template = rule.init({_PARAM_KEY: torch.zeros(1)})
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"{type(rule).__name__} cannot drive a torch.optim optimizer: LearnedOptimizer calls the rule on one "
                f"parameter at a time, and this rule is tied to particular params ({exc}); use it with l2o.MAML or "
                "l2o.unroll instead"
            ) from None
        self._state_template = state_fill(template, iter(lambda: None, 0))  # the structure, leaves None
        self._state_names = tuple(name for name, _ in _flatten_state(template))
        if "step" in self._state_names or len(set(self._state_names)) != len(self._state_names):
            raise TypeError(f"{type(rule).__name__}'s state has field names {self._state_names} that clash with "
                            "each other or with 'step'")
        self._device_rules: dict[torch.device, Rule] = {}

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
        super().__init__(params, {"lr": lr})

    # ------------------------------------------------------------------------------ param groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (missing hyperparameters come from ``defaults``); refuses bad params/lr."""
        if not isinstance(param_group, dict) or "params" not in param_group:
            found = f"a dict with keys {sorted(map(str, param_group))}" if isinstance(param_group, dict) else \
                type(param_group).__name__
            raise TypeError(f"a param group must be a dict with a 'params' entry (an iterable of tensors) and "
                            f"optionally 'lr', got {found}")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _check_lr(group["lr"], "param group")
            for i, p in enumerate(group["params"]):
                what = f"parameter {i} of param group {len(self.param_groups) - 1} (shape {tuple(p.shape)}, {p.dtype})"
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

    # ------------------------------------------------------------------------------ stepping

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Apply one update of the rule to every parameter with a gradient.

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
        for group in self.param_groups:  # refuse before changing any parameter
            lr = group["lr"]
            lr = float(lr) if isinstance(lr, Tensor) else lr
            for p in group["params"]:
                if p.grad is not None and lr != 1 and not abs(lr) <= torch.finfo(p.dtype).max:
                    raise ValueError(f"lr={lr!r} of a param group does not fit its {p.dtype} parameters (it multiplies "
                                     "their updates); use a finite lr within the dtype's range")
                if p.grad is not None and p.grad.layout != torch.strided:
                    raise TypeError(
                        f"LearnedOptimizer does not support sparse gradients (parameter of shape {tuple(p.shape)} has a "
                        f"{p.grad.layout} gradient); use dense gradients (e.g. nn.Embedding(sparse=False)) or "
                        "torch.optim.SparseAdam for that parameter"
                    )
        for group in self.param_groups:
            lr = group["lr"]
            lr = float(lr) if isinstance(lr, Tensor) else lr
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                rule = self._rule_on(p.device)
                state = self.state[p]
                if not state:
                    state.update(self._init_state(p, rule))
                compute = self._compute_dtype(p)
                storage = self._storage_dtype(p)
                values = []
                for name in self._state_names:
                    value = state[name]
                    if isinstance(value, Tensor) and value.is_floating_point():
                        value = value.to(device=p.device, dtype=compute)
                    values.append(value)
                rule_state = state_fill(self._state_template, iter(values))
                updates, new_state = rule.update_({_PARAM_KEY: grad.detach()}, rule_state, {_PARAM_KEY: p.detach()},
                                                 step=state["step"], loss=rule_loss)
                u = updates[_PARAM_KEY]
                if u.dtype != p.dtype:
                    u = u.to(p.dtype)
                if lr == 1:
                    p.add_(u)
                else:
                    p.add_(u, alpha=lr)
                for name, value in zip(self._state_names, state_leaves(new_state)):
                    if isinstance(value, Tensor) and value.is_floating_point() and value.dtype != storage:
                        value = value.to(storage)
                    state[name] = value
                state["step"] += 1
        return loss

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
        super().load_state_dict({**state_dict, "state": kept})
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
            _device_rules={},
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
