r"""The unroll engine: every inner loop in l2o (learned optimizers and MAML) runs here.

Given a rule, a task and an :class:`InnerState` (params, rule state, step count), :func:`unroll`
applies ``K`` inner steps

.. math:: g_t = \nabla f(\theta_t; b_t),\quad (u_t, s_{t+1}) = \text{rule.update}(g_t, s_t, \theta_t),
          \quad \theta_{t+1} = \theta_t + u_t

and returns the meta-loss :math:`\mathcal L = \sum_{t=1}^{K} w_t\, \bar f(\theta_t)` (``w_t = 1`` by
default, as in the paper; :math:`\bar f` is the mean over the task's batched instances), read either
on the training batches or on the task's :data:`~l2o.tasks.META` split.

**First order (default, as in the paper).** The gradients fed to the rule are treated as
constants, :math:`\partial g_t/\partial\theta_t := 0`; this avoids second derivatives of the task,
which the paper found unnecessary. Then :math:`\theta_t` depends on the meta-params only through the
updates, and :math:`\partial\mathcal L/\partial\theta_t = w_t \nabla\bar f(\theta_t)`, a quantity the
engine computes anyway. So the returned meta-loss carries the value of :math:`\mathcal L` but is
differentiated through the surrogate :math:`\sum_t w_t\langle\theta_t, \operatorname{sg}(\nabla\bar
f(\theta_t))\rangle`, which has exactly the same gradient with respect to every meta-param and never
keeps the task's forward graph alive (one task gradient per step, flat memory in the task).

**Second order** (``second_order=True``, MAML needs it) differentiates through the task gradients
too (``create_graph=True``) and through the true losses.

:func:`truncate` ends a truncation: it returns a detached copy of the inner state so the next
segment's graph starts clean (never an in-place ``detach_``).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from .compiling import CompileOptions, compile_options, compiled_unroll, traced_unroll
from .inner import LOG_EPS, OBJECTIVES, InnerState, UnrollResult
from .rules.base import Rule, RuleTape, unchecked_update
from .validation import check_positive_int
from .instances import shared_loss_and_grads
from .tasks import META, TRAIN, Task, closed_form, instance_form
from .tree import Params, apply_updates, detach, flatten, state_map

__all__ = ["InnerState", "UnrollResult", "OBJECTIVES", "init_inner", "unroll", "truncate", "loss_and_grads"]

def init_inner(rule: Rule, task: Task, generator: torch.Generator, params: Params | None = None) -> InnerState:
    """Start an inner optimisation: θ0 from ``task.init`` (unless given) and ``rule.init``."""
    if params is None:
        params = task.init(generator)
    return InnerState(params=params, rule_state=rule.init(params), step=0)


def loss_and_grads(task: Task, params: Params, batch: Any, *, create_graph: bool = False,
                   objective: str = "loss") -> tuple[Tensor, Params]:
    r"""Per-instance loss and the gradient of its sum at ``params``.

    With ``objective="log_loss"`` the gradient is that of :math:`\sum_b \log(f_b + \epsilon)`
    instead (each instance's gradient divided by its loss); the returned loss is unchanged.
    Without ``create_graph`` the result is detached from any graph that ``params`` carry; with it,
    the gradients are differentiable functions of ``params`` (second-order mode).
    Without ``create_graph`` and with the task's own ``loss_and_grads`` (see :mod:`l2o.tasks`; not
    when a subclass redefines ``loss`` below it), that computes the result (no autograd).
    """
    task_grads = closed_form(task) if not create_graph and objective == "loss" else None
    if task_grads is not None:
        with torch.no_grad():
            return task_grads({k: v.detach() for k, v in params.items()}, batch)
    with torch.enable_grad():
        if create_graph:
            leaves = {k: v if v.requires_grad else v.detach().requires_grad_() for k, v in params.items()}
        else:
            leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
        loss = task.loss(leaves, batch)
        weight = 1.0 / (loss.detach() + LOG_EPS) if objective == "log_loss" else torch.ones_like(loss)
        grads = torch.autograd.grad(loss, list(leaves.values()), grad_outputs=weight, create_graph=create_graph,
                                    allow_unused=True)
    out = {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), grads)}
    if not create_graph:
        loss = loss.detach()
    return loss, out


def _all_finite(loss: Tensor | None, grads: Params | None) -> Tensor:
    if loss is None:
        return torch.ones((), dtype=torch.bool)
    ok = torch.isfinite(loss).all()
    for g in (grads or {}).values():
        ok = ok & torch.isfinite(g).all()
    return ok


def unroll(rule: Rule, task: Task, inner: InnerState, *, steps: int, generator: torch.Generator,
           weights: Sequence[float] | Tensor | None = None, meta_split: str = TRAIN,
           second_order: bool = False, objective: str = "loss", tape: bool = False,
           compile: bool | CompileOptions = False) -> UnrollResult:
    """Run ``steps`` inner steps of ``rule`` on ``task`` from ``inner``.

    Args:
        rule: the update rule (its parameters receive the meta-gradient).
        task: the optimizee.
        inner: the starting :class:`InnerState` (see :func:`init_inner`, :func:`truncate`).
        steps: ``K``, the number of inner steps.
        generator: draws the task's batches.
        weights: ``w_1..w_K`` of the meta-loss (default all ones). Zero weights skip the work of
            their meta-loss terms; ``[0, ..., 0, 1]`` reads only the final params (MAML).
        meta_split: :data:`~l2o.tasks.TRAIN` (the paper: the meta-loss reads the losses the rule
            was trained on) or :data:`~l2o.tasks.META` (a separate batch from the task's meta split).
        second_order: differentiate through the task gradients (``create_graph``).
        objective: what each meta-loss term reads, one of :data:`OBJECTIVES` (default ``"loss"``,
            the paper's).
        tape: for callers that end the truncation here (:func:`truncate` the result, as the
            meta-trainer does): in first order, when ``inner`` carries no graph, ask the rule for a
            :meth:`~l2o.rules.base.Rule.tape` of these steps and, when it has one, take the steps
            through it. The meta-loss and its gradient are the same (up to float rounding),
            computed without a per-step graph; the returned ``inner`` carries no graph, so no
            gradient flows into a later segment through it. Otherwise (second order, params or
            rule state with a graph, or a rule without a tape) this flag changes nothing. Not
            used with ``compile`` (a tape runs compiled C kernels of its own).
        compile: run the ``K`` steps and the meta-loss as one function compiled with
            :func:`torch.compile` (``True``, a backend name, or a
            :class:`~l2o.compiling.CompileOptions`): the same numbers as eager up to float
            rounding, the gradients by ``torch.func.grad``; see :mod:`l2o.compiling` (first calls
            compile; a failure falls back to eager with a warning).
    """
    check_positive_int("steps", steps)
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if meta_split not in (TRAIN, META):
        raise ValueError(f"meta_split must be {TRAIN!r} or {META!r}, got {meta_split!r}")
    if weights is None:
        w = (1.0,) * steps
    else:
        w = tuple(float(v) for v in weights)
        if len(w) != steps:
            raise ValueError(f"weights must have one entry per inner step ({steps}), got {len(w)}")
    options = compile_options(compile)
    return run_unroll(rule, task, inner, steps=steps, generator=generator, weights=w, meta_split=meta_split,
                      second_order=second_order, objective=objective, tape=tape, options=options, record=True)


def run_unroll(rule: Rule, task: Task, inner: InnerState, *, steps: int, generator: torch.Generator,
               weights: tuple[float, ...], meta_split: str, second_order: bool, objective: str, tape: bool,
               options: CompileOptions | None, record: bool, check: bool = True,
               keep_inner: bool = True, shared: Params | None = None) -> UnrollResult:
    """:func:`unroll` for checked arguments. ``record=False`` (what :class:`l2o.MAML`'s verbs use:
    they read only the params) skips the per-step losses, the finiteness check and the last step's
    training loss when no meta-loss term reads it: ``losses`` is then empty, ``finite`` True.
    ``check=False`` skips the rule's :meth:`~l2o.rules.base.Rule.check_update` (for a state the
    caller just made with ``rule.init(params)``); ``keep_inner=False`` (only the meta-loss is read)
    lets the compiled engine return no final params. ``shared``: params that every instance of a
    batched task starts from, of which ``inner.params`` are the expansion (``shared[k].expand(B,
    ...)``, MAML's θ0): with a task that has an ``instance_loss``, the first gradient is taken at
    them unbatched (:mod:`l2o.instances`; the same numbers, no ``B`` copies of them in the graph).

    Called while :func:`torch.compile` traces (a user's compiled function that calls the engine),
    the unroll is traced as it stands: through :func:`l2o.compiling.functional_unroll`, whose
    gradients (``torch.func.grad``) the compiler can trace, where ``torch.autograd.grad`` could not.
    """
    validate, rule_step = unchecked_update(rule)
    if check:
        validate(inner.params, inner.rule_state, inner.params, step=inner.step)  # once: grads are shaped like params
    if shared is not None and (instance_form(task) is None or (inner.grads is not None and not second_order)):
        shared = None  # no per-instance loss to take it with, or no first gradient to take
    if torch.compiler.is_compiling():
        return traced_unroll(task, inner, rule_step, steps=steps, generator=generator, weights=weights,
                             meta_split=meta_split, second_order=second_order, objective=objective, record=record,
                             shared=shared)
    if options is not None:
        return compiled_unroll(rule, task, inner, rule_step, options, steps=steps, generator=generator,
                               weights=weights, meta_split=meta_split, second_order=second_order,
                               objective=objective, record=record, eager=_eager_unroll, keep_inner=keep_inner,
                               shared=shared)
    return _eager_unroll(rule, task, inner, rule_step, steps=steps, generator=generator, weights=weights,
                         meta_split=meta_split, second_order=second_order, objective=objective, tape=tape,
                         record=record, shared=shared)


def _eager_unroll(rule: Rule, task: Task, inner: InnerState, update: Any, *, steps: int, generator: torch.Generator,
                  weights: tuple[float, ...], meta_split: str, second_order: bool, objective: str, tape: bool,
                  record: bool, shared: Params | None = None) -> UnrollResult:
    w = weights
    params, rule_state, step = inner.params, inner.rule_state, inner.step
    if inner.grads is not None and not second_order:
        loss, grads = inner.loss, inner.grads
    elif shared is not None:
        loss, grads = shared_loss_and_grads(instance_form(task), shared, task.sample_batch(TRAIN, generator),
                                            second_order=second_order)
    else:
        loss, grads = loss_and_grads(task, params, task.sample_batch(TRAIN, generator), create_graph=second_order)
    finite = _all_finite(loss, grads) if record else True
    rule_tape = None
    if tape and not second_order and not any(p.requires_grad for p in params.values()):
        rule_tape = rule.tape(params, rule_state, steps)
    terms: _MetaTerms = _GraphTerms(update) if rule_tape is None else _TapeTerms(rule_tape, grads)
    losses: list[Tensor] = []
    for t in range(steps):
        params, rule_state = terms.step(grads, rule_state, params, step=step, loss=loss)
        step += 1
        last_batch = task.sample_batch(TRAIN, generator)
        last = t == steps - 1
        if last and not record and (w[t] == 0.0 or meta_split == META):
            loss = grads = None  # nothing reads the training loss after the last step
        elif second_order and last:
            # second order never reuses cached gradients: after the last step only the loss is needed
            with torch.enable_grad():
                loss = task.loss(params, last_batch)
            grads = None
        else:
            loss, grads = loss_and_grads(task, params, last_batch, create_graph=second_order)
        if record:
            finite = finite & _all_finite(loss, grads)
            losses.append(loss.detach().reshape(-1))
        if w[t] == 0.0:
            terms.skip()
        elif second_order:
            m_loss = loss if meta_split == TRAIN else task.loss(params, task.sample_batch(META, generator))
            terms.add_loss(w[t] * (torch.log(m_loss + LOG_EPS).mean() if objective == "log_loss" else m_loss.mean()))
        else:
            value, m_grads, finite = _first_order_term(task, params, loss, grads, last_batch, finite,
                                                       generator=generator, meta_split=meta_split, objective=objective)
            terms.add(w[t], params, value, m_grads)
    new_inner = InnerState(params, terms.state(rule_state), step, grads, loss)
    stacked = torch.stack(losses) if losses else torch.zeros(0, 0)
    return UnrollResult(terms.meta_loss(), stacked, new_inner, bool(finite))


def _first_order_term(task: Task, params: Params, loss: Tensor, grads: Params, last_batch: Any, finite: Tensor, *,
                      generator: torch.Generator, meta_split: str, objective: str) -> tuple[Tensor, Params, Tensor]:
    """What a first-order meta-loss term reads at ``params``: the per-instance values, the gradient
    of their sum, and the finiteness flag updated (the training loss and gradients are reused when
    the term reads them)."""
    if meta_split == TRAIN and objective == "loss":
        return loss, grads, finite
    batch = last_batch if meta_split == TRAIN else task.sample_batch(META, generator)
    m_loss, m_grads = loss_and_grads(task, params, batch, objective=objective)
    value = torch.log(m_loss + LOG_EPS) if objective == "log_loss" else m_loss
    return value, m_grads, finite & _all_finite(m_loss, m_grads)


class _MetaTerms:
    """How :func:`unroll`'s loop takes its steps and builds the meta-loss from its terms: through
    autograd (:class:`_GraphTerms`) or through a rule's tape (:class:`_TapeTerms`)."""

    def step(self, grads: Params, state: Any, params: Params, *, step: int,
             loss: Tensor | None) -> tuple[Params, Any]:  # pragma: no cover - abstract
        """The next params and rule state."""
        raise NotImplementedError

    def skip(self) -> None:
        """A step with meta-loss weight 0."""

    def add(self, weight: float, params: Params, value: Tensor, grads: Params) -> None:  # pragma: no cover
        """A first-order term: ``weight * value.mean()`` at ``params``, whose gradient in the params is
        ``weight * grads / value.numel()`` (``grads`` is the gradient of ``value.sum()``)."""
        raise NotImplementedError

    def add_loss(self, term: Tensor) -> None:  # pragma: no cover - abstract
        """A second-order term, differentiable as it is."""
        raise NotImplementedError

    def meta_loss(self) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def state(self, state: Any) -> Any:
        """The rule state after the last step (``state`` is what the loop's updates returned)."""
        return state


class _GraphTerms(_MetaTerms):
    r"""Steps by ``rule.update``; the meta-loss is the sum of the terms, differentiated by autograd.

    A first-order term is the surrogate of the module docstring: value :math:`w\,\bar v`, gradient
    :math:`w\,\nabla\bar v` flowing through the params only.
    """

    def __init__(self, rule_step: Any) -> None:
        self.rule_step = rule_step  # the rule's unchecked step: the unroll checked its arguments once
        self.terms: list[Tensor] = []

    def step(self, grads: Params, state: Any, params: Params, *, step: int,
             loss: Tensor | None) -> tuple[Params, Any]:
        return self.rule_step(grads, state, params, step=step, loss=loss)

    def add(self, weight: float, params: Params, value: Tensor, grads: Params) -> None:
        n = value.numel()
        lin = sum((p * g.detach()).sum() for p, g in zip(params.values(), grads.values())) / n
        self.terms.append(weight * (value.detach().mean() + (lin - lin.detach())))

    def add_loss(self, term: Tensor) -> None:
        self.terms.append(term)

    def meta_loss(self) -> Tensor:
        return torch.stack(self.terms).sum() if self.terms else torch.zeros(())


class _TapeTerms(_MetaTerms):
    r"""Steps by a :class:`~l2o.rules.base.RuleTape`; the meta-loss is one autograd node.

    With :math:`\theta_t = \theta_0 + \sum_{s \le t} u_s` and the terms' gradients
    :math:`w_t \nabla\bar f(\theta_t)` (computed anyway), the gradient at the update of step
    :math:`s` is :math:`\partial\mathcal L/\partial u_s = \sum_{t \ge s} w_t \nabla\bar f(\theta_t)`,
    a reverse cumulative sum; the tape's backward turns those into the meta-gradient.
    """

    def __init__(self, rule_tape: RuleTape, grads: Params) -> None:
        self.tape = rule_tape
        self.values: list[Tensor] = []
        self.dtheta: list[Tensor] = []
        self.no_term = torch.zeros(sum(g.numel() for g in grads.values()))

    def step(self, grads: Params, state: Any, params: Params, *, step: int,
             loss: Tensor | None) -> tuple[Params, Any]:
        return apply_updates(params, self.tape.step(grads, params, step=step, loss=loss)), state

    def skip(self) -> None:
        self.dtheta.append(self.no_term)

    def add(self, weight: float, params: Params, value: Tensor, grads: Params) -> None:
        self.values.append(weight * value.mean())
        self.dtheta.append(flatten(grads) * (weight / value.numel()))

    def add_loss(self, term: Tensor) -> None:  # pragma: no cover - tapes run first order only
        raise RuntimeError("a rule tape runs first-order steps only")

    def meta_loss(self) -> Tensor:
        du = torch.stack(self.dtheta).flip(0).cumsum(0).flip(0)
        value = torch.stack(self.values).sum() if self.values else torch.zeros(())
        return _TapeMetaLoss.apply(value, self.tape, du, *self.tape.meta_params)

    def state(self, state: Any) -> Any:
        return self.tape.state()


class _TapeMetaLoss(torch.autograd.Function):
    """The meta-loss value, differentiated by a :class:`~l2o.rules.base.RuleTape`'s backward."""

    @staticmethod
    def forward(ctx: Any, value: Tensor, rule_tape: RuleTape, du: Tensor, *meta_params: Tensor) -> Tensor:
        ctx.rule_tape, ctx.du = rule_tape, du
        return value.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.rule_tape is None:
            raise RuntimeError("this meta-loss was already backpropagated (its tape is spent)")
        grads = ctx.rule_tape.backward(ctx.du)
        ctx.rule_tape = ctx.du = None
        return (None, None, None, *(None if g is None else g * grad for g in grads))


def truncate(inner: InnerState) -> InnerState:
    """A copy of ``inner`` with every tensor detached (new tensors; the input is left untouched)."""
    return InnerState(
        params=detach(inner.params),
        rule_state=state_map(Tensor.detach, inner.rule_state),
        step=inner.step,
        grads=None if inner.grads is None else detach(inner.grads),
        loss=None if inner.loss is None else inner.loss.detach(),
    )
