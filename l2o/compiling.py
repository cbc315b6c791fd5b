r"""The compiled unroll engine: :func:`l2o.unroll.unroll` (and :class:`l2o.MAML`, :func:`l2o.meta_train`)
with ``compile=True``.

The ``K`` inner steps and the meta-loss of one unroll run as **one** function under
:func:`torch.compile`: for every step, the task loss, its gradient, the rule's update and
:math:`\theta_{t+1} = \theta_t + u_t`, then the meta-loss terms. It is the same algorithm as the
eager engine, written functionally so that the compiler can trace it whole:

* gradients come from ``torch.func.grad`` of the summed task loss (eager:
  ``torch.autograd.grad``). In second order they stay differentiable, so the compiled function's
  backward (AOTAutograd) is the meta-gradient through the inner gradients,
  :math:`\partial\theta_{t+1}/\partial\theta_t = I + \partial u_t/\partial\theta_t`; in first order
  they are detached, and the meta-loss is the first-order surrogate of :mod:`l2o.unroll`.
* the task's batches are drawn before the call, eagerly and in the eager engine's order (a
  ``torch.Generator`` cannot be traced), and passed in; the generator ends where the eager engine
  leaves it.
* arguments are validated once per call, before the traced function: the unroll's own checks and
  the rule's :meth:`~l2o.rules.base.Rule.check_update` on the starting params and state; every
  step then runs :meth:`~l2o.rules.base.Rule.update_unchecked` (no Python validation, locks or
  ``data_ptr`` reads in the traced code, and no data-dependent Python branch: finiteness is a
  tensor read after the call).

Compiling is paid on the first call of each configuration (seconds per graph on a CPU with the
default inductor backend; a graph holds all ``K`` steps, so its compile time grows with ``K``);
later calls with the same shapes, rule, task type and settings reuse the graph. The compiled and
eager engines give the same numbers up to float rounding (the compiler may fuse and reorder float
operations; ``tests/test_compile.py`` checks them against each other).

**Fallback.** If compiling or running the compiled function raises, the unroll runs eagerly
instead and l2o warns once per configuration (:class:`CompileWarning`, naming the error);
``CompileOptions(fallback=False)`` raises the error instead. An error that the eager engine
raises too (bad data, a wrong loss function) is raised as it is, without the warning.

Not compiled: a rule's :meth:`~l2o.rules.base.Rule.tape` (its compiled C kernels are its own fast
path; ``tape=True`` is ignored with ``compile``); the compiled kernels of :mod:`l2o.kernels`
(the rules' torch twins run inside a compiled graph); the LSTM rule's hand-differentiated step
(a ``fused`` rule runs the plain-autograd reference under the compiler, the same math).
"""

from __future__ import annotations

import types
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from .inner import LOG_EPS, InnerState, UnrollResult
from .instances import shared_loss_and_grads
from .tasks import META, TRAIN, closed_form, instance_form

__all__ = ["CompileOptions", "CompileWarning", "compile_options", "compiled_unroll", "functional_unroll",
           "compiled_function"]


class CompileWarning(UserWarning):
    """``torch.compile`` failed and l2o ran the eager engine instead (see :mod:`l2o.compiling`)."""


@dataclass(frozen=True)
class CompileOptions:
    """How the engine calls :func:`torch.compile` (``compile=True`` means the defaults).

    Attributes:
        backend: the ``torch.compile`` backend (default ``"inductor"``; ``"aot_eager"`` traces
            and differentiates the same graph without generating code: quick to compile, for
            checking).
        mode: the ``torch.compile`` mode (``None``, ``"reduce-overhead"``, ``"max-autotune"``, ...).
        fullgraph: refuse graph breaks (an error, or the fallback, instead of a partly compiled unroll).
        dynamic: ``torch.compile``'s ``dynamic`` (``None``: specialise, and mark sizes dynamic when
            they change).
        fallback: when compiling fails, warn and run eagerly (default); ``False`` raises the error.
    """

    backend: str = "inductor"
    mode: str | None = None
    fullgraph: bool = False
    dynamic: bool | None = None
    fallback: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.backend, str) or not self.backend:
            raise TypeError(f"CompileOptions.backend must be a backend name (a str, e.g. 'inductor'), got "
                            f"{self.backend!r}")
        if self.mode is not None and not isinstance(self.mode, str):
            raise TypeError(f"CompileOptions.mode must be None or a str, got {type(self.mode).__name__}")
        for name in ("fullgraph", "fallback"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"CompileOptions.{name} must be True or False, got {getattr(self, name)!r}")
        if self.dynamic is not None and not isinstance(self.dynamic, bool):
            raise TypeError(f"CompileOptions.dynamic must be None, True or False, got {self.dynamic!r}")

    def torch_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`torch.compile`."""
        return {"backend": self.backend, "mode": self.mode, "fullgraph": self.fullgraph, "dynamic": self.dynamic}


def compile_options(value: Any) -> CompileOptions | None:
    """``compile=`` as given by a user -> :class:`CompileOptions`, or ``None`` for eager.

    ``False``/``None``: eager; ``True``: the defaults; a :class:`CompileOptions`: itself; a str:
    that backend. Anything else is a ``TypeError``.
    """
    if value is None or value is False:
        return None
    if value is True:
        return CompileOptions()
    if isinstance(value, CompileOptions):
        return value
    if isinstance(value, str):
        return CompileOptions(backend=value)
    raise TypeError(f"compile must be True, False, a backend name or an l2o.compiling.CompileOptions, got "
                    f"{type(value).__name__} ({value!r})")


_COMPILED: dict[tuple[Any, ...], Callable[..., Any]] = {}
_FAILED: set[tuple[Any, ...]] = set()


def compiled_function(fn: Callable[..., Any], options: CompileOptions, key: tuple[Any, ...] = ()) -> Callable[..., Any]:
    """``torch.compile`` of a private copy of ``fn`` for ``options`` and ``key`` (a configuration:
    rule and task types, steps, flags), built once and kept.

    The copy has its own code object, so each configuration keeps its own graphs in torch's
    compile cache (which holds a few per code object, then runs eagerly without a word): meta-training
    with several rules, or MAML with training and evaluation settings, never crowds it out.
    """
    full = (fn, options, key)
    compiled = _COMPILED.get(full)
    if compiled is None:
        code = fn.__code__.replace(co_name=f"{fn.__name__}_{len(_COMPILED)}")
        copy = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
        copy.__kwdefaults__, copy.__doc__, copy.__qualname__ = fn.__kwdefaults__, fn.__doc__, code.co_name
        compiled = _COMPILED[full] = torch.compile(copy, **options.torch_kwargs())
    return compiled


def run_with_fallback(what: str, key: tuple[Any, ...], options: CompileOptions, compiled: Callable[[], Any],
                      eager: Callable[[], Any], before_eager: Callable[[], None] | None = None) -> Any:
    """``compiled()``; if it raises, ``eager()`` (after ``before_eager()``), warning once per ``key``
    when the eager run succeeds (an error both raise is the caller's, raised as it is).
    ``options.fallback=False`` raises the compiled call's error. A ``key`` that failed before runs
    eagerly at once."""
    if key in _FAILED:
        return eager()
    try:
        return compiled()
    except Exception as exc:
        if not options.fallback:
            raise
        error = exc
    if before_eager is not None:
        before_eager()
    result = eager()
    _FAILED.add(key)
    first = (str(error).strip().splitlines() or [""])[0]
    warnings.warn(f"l2o: torch.compile of {what} failed ({type(error).__name__}: {first}); running it eagerly "
                  "instead (same numbers, eager speed). Pass compile=l2o.compiling.CompileOptions(fallback=False) "
                  "to raise the error.", CompileWarning, stacklevel=4)
    return result


# ------------------------------------------------------------------------------------------ the unroll


def _loss_grads(task: Any, params: dict[str, Tensor], batch: Any, second_order: bool,
                objective: str) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-instance loss and the gradient of its sum (``log_loss``: of the sum of logs), as
    :func:`l2o.unroll.loss_and_grads`, with ``torch.func.grad`` (traceable); detached in first order."""
    closed = closed_form(task) if not second_order and objective == "loss" else None
    if closed is not None:
        loss, grads = closed({k: v.detach() for k, v in params.items()}, batch)
        return loss.detach(), {k: g.detach() for k, g in grads.items()}
    start = params if second_order else {k: v.detach() for k, v in params.items()}

    def total(p: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        loss = task.loss(p, batch)
        if objective == "log_loss":
            return (loss * (1.0 / (loss.detach() + LOG_EPS))).sum(), loss
        return loss.sum(), loss

    grads, loss = torch.func.grad(total, has_aux=True)(start)
    if not second_order:
        return loss.detach(), {k: g.detach() for k, g in grads.items()}
    return loss, grads


def _finite(loss: Tensor | None, grads: dict[str, Tensor] | None) -> Tensor:
    if loss is None:
        return torch.ones((), dtype=torch.bool, device=None)
    ok = torch.isfinite(loss).all()
    for g in (grads or {}).values():
        ok = ok & torch.isfinite(g).all()
    return ok


def functional_unroll(task: Any, rule_step: Callable[..., Any], params: dict[str, Tensor], rule_state: Any, step: int,
                      loss: Tensor | None, grads: dict[str, Tensor] | None, batches: list[Any], meta_batches: list[Any],
                      weights: tuple[float, ...], meta_split: str, second_order: bool, objective: str,
                      record: bool, keep_inner: bool = True, shared: dict[str, Tensor] | None = None) -> tuple[Any, ...]:
    r"""The eager engine's loop (:func:`l2o.unroll.unroll`) as a pure function of tensors, what
    ``compile=True`` traces.

    ``batches[0]`` is the training batch at the start (``None`` when ``loss``/``grads`` are the
    cached first-order ones), ``batches[t + 1]`` the one after step ``t``; ``meta_batches[t]`` the
    meta-split batch of step ``t``'s term (``None`` where it reads none). ``rule_step`` is the rule's
    unchecked step (:func:`l2o.rules.base.unchecked_update`). Returns ``(meta_loss, losses (K, B)
    or empty, params, rule_state, grads, loss, finite)``, ``finite`` a bool tensor (``None``
    without ``record``); without ``keep_inner``, params, rule_state, grads and loss are ``None``.
    With ``shared`` (see :func:`l2o.unroll.run_unroll`; ``params`` is then not read), the first
    gradient is taken at those params unbatched and the instances' params are their expansion.
    """
    steps = len(weights)
    if shared is not None:
        loss, grads = shared_loss_and_grads(instance_form(task), shared, batches[0], second_order=second_order)
        params = {k: v.expand(grads[k].shape[0], *v.shape) for k, v in shared.items()}
    elif batches[0] is not None:
        loss, grads = _loss_grads(task, params, batches[0], second_order, objective="loss")
    finite = _finite(loss, grads) if record else None
    terms: list[Tensor] = []
    losses: list[Tensor] = []
    for t in range(steps):
        params, rule_state = rule_step(grads, rule_state, params, step=step + t, loss=loss)
        batch, last, w = batches[t + 1], t == steps - 1, weights[t]
        if last and not record and (w == 0.0 or meta_split == META):
            loss = grads = None
        elif second_order and last:
            loss, grads = task.loss(params, batch), None
        else:
            loss, grads = _loss_grads(task, params, batch, second_order, objective="loss")
        if record:
            finite = finite & _finite(loss, grads)
            losses.append(loss.detach().reshape(-1))
        if w == 0.0:
            continue
        if second_order:
            m_loss = loss if meta_split == TRAIN else task.loss(params, meta_batches[t])
            terms.append(w * (torch.log(m_loss + LOG_EPS).mean() if objective == "log_loss" else m_loss.mean()))
            continue
        if meta_split == TRAIN and objective == "loss":
            value, m_grads = loss, grads
        else:
            m_batch = batch if meta_split == TRAIN else meta_batches[t]
            m_loss, m_grads = _loss_grads(task, params, m_batch, False, objective)
            value = torch.log(m_loss + LOG_EPS) if objective == "log_loss" else m_loss
            if record:
                finite = finite & _finite(m_loss, m_grads)
        n = value.numel()
        lin = sum((p * g.detach()).sum() for p, g in zip(params.values(), m_grads.values())) / n
        terms.append(w * (value.detach().mean() + (lin - lin.detach())))
    meta_loss = torch.stack(terms).sum() if terms else torch.zeros(())
    stacked = torch.stack(losses) if losses else torch.zeros(0, 0)
    if not keep_inner:
        return meta_loss, stacked, None, None, None, None, finite
    return meta_loss, stacked, params, rule_state, grads, loss, finite


def _draw_batches(task: Any, generator: Any, weights: tuple[float, ...], meta_split: str,
                  cached: bool) -> tuple[list[Any], list[Any]]:
    """Every batch the eager engine would draw, in its order (see :func:`functional_unroll`)."""
    batches: list[Any] = [None if cached else task.sample_batch(TRAIN, generator)]
    meta_batches: list[Any] = []
    for w in weights:
        batches.append(task.sample_batch(TRAIN, generator))
        meta_batches.append(task.sample_batch(META, generator) if w != 0.0 and meta_split == META else None)
    return batches, meta_batches


def traced_unroll(task: Any, inner: Any, rule_step: Callable[..., Any], *, steps: int, generator: Any,
                  weights: tuple[float, ...], meta_split: str, second_order: bool, objective: str, record: bool,
                  shared: dict[str, Tensor] | None = None) -> Any:
    """The unroll inside a function that :func:`torch.compile` is tracing (no nested compile)."""
    cached = inner.grads is not None and not second_order
    batches, meta_batches = _draw_batches(task, generator, weights, meta_split, cached)
    meta_loss, losses, params, state, grads, loss, finite = functional_unroll(
        task, rule_step, inner.params, inner.rule_state, inner.step, inner.loss if cached else None,
        inner.grads if cached else None, batches, meta_batches, weights, meta_split, second_order, objective, record,
        shared=shared)
    return UnrollResult(meta_loss, losses, InnerState(params, state, inner.step + steps, grads, loss),
                        True if finite is None else finite)


def compiled_unroll(rule: Any, task: Any, inner: Any, rule_step: Callable[..., Any], options: CompileOptions, *,
                    steps: int, generator: Any, weights: tuple[float, ...], meta_split: str,
                    second_order: bool, objective: str, record: bool, eager: Callable[..., Any],
                    keep_inner: bool = True, shared: dict[str, Tensor] | None = None) -> Any:
    """One unroll through the compiled :func:`functional_unroll` (arguments already checked),
    falling back to ``eager`` (the eager engine) as described in the module docstring."""
    saved = generator.get_state()
    cached = inner.grads is not None and not second_order
    batches, meta_batches = _draw_batches(task, generator, weights, meta_split, cached)
    key = ("unroll", options, type(rule), type(task), steps, weights, meta_split, second_order, objective, record,
           cached, keep_inner, shared is not None)

    def run_compiled() -> Any:
        fn = compiled_function(functional_unroll, options, key[2:])
        meta_loss, losses, params, state, grads, loss, finite = fn(
            task, rule_step, None if shared is not None else inner.params, inner.rule_state, inner.step,
            inner.loss if cached else None, inner.grads if cached else None, batches, meta_batches, weights,
            meta_split, second_order, objective, record, keep_inner, shared)
        ok = True if finite is None else bool(finite)
        return UnrollResult(meta_loss, losses, InnerState(params, state, inner.step + steps, grads, loss), ok)

    def run_eager() -> Any:
        return eager(rule, task, inner, rule_step, steps=steps, generator=generator, weights=weights,
                     meta_split=meta_split, second_order=second_order, objective=objective, tape=False, record=record,
                     shared=shared)

    return run_with_fallback("the unroll", key, options, run_compiled, run_eager,
                             before_eager=lambda: generator.set_state(saved))
