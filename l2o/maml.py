r"""MAML (Finn et al. 2017) on the unroll engine: the meta-params are the initial params θ0.

For a task with support loss :math:`f^{s}` and query loss :math:`f^{q}`, MAML adapts from the
learned initialisation with ``K`` steps of an update rule (SGD with learning rate :math:`\gamma` in
the paper),

.. math:: \theta_0 = \theta^{\text{init}}, \qquad
          \theta_{t+1} = \theta_t + \text{rule.update}(\nabla f^{s}(\theta_t), s_t, \theta_t)
          \;\overset{\text{SGD}}{=}\; \theta_t - \gamma \nabla f^{s}(\theta_t),

and meta-trains :math:`\theta^{\text{init}}` (and the rule's own weights, if any) on the query loss
after adaptation, averaged over a meta-batch of tasks :math:`\mathcal T_b`:

.. math:: \mathcal L(\theta^{\text{init}}, \Phi) = \frac1B\sum_b f^{q}_b(\theta_{K,b}).

**Second order** (``first_order=False``, the default) differentiates through the inner gradients:
:math:`\partial\theta_{t+1}/\partial\theta_t = I - \gamma\nabla^2 f^{s}(\theta_t)` for SGD.
**First order** (FOMAML) treats the inner gradients as constants, so
:math:`\partial\theta_K/\partial\theta^{\text{init}} = I` and the meta-gradient is
:math:`\nabla f^{q}(\theta_K)`. The rule decides the algorithm: :class:`~l2o.rules.SGD` gives MAML,
:class:`~l2o.rules.MetaSGD` (a learned per-coordinate rate) gives Meta-SGD, and a learned
:class:`~l2o.rules.LSTMRule` gives a learned initialisation and a learned optimizer meta-trained
together.

There is no second inner loop: :meth:`MAML.adapt` wraps the model, the loss function and the data
in a small :class:`SupervisedTask` and runs :func:`l2o.unroll.unroll` on it, with zero meta-loss
weights (the caller reads the query loss from the returned params). Batched tasks (a leading task
dimension on params and data) run through ``torch.func.vmap`` over ``functional_call``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from .adaptation import adaptation_curve, adaptation_params  # MAML evaluations read these (re-exported)
from .rules.base import Rule
from .rules.hand import SGD
from .tasks import META, TRAIN, support_or_query
from .tree import Params
from .compiling import CompileOptions, compile_options, compiled_function, run_with_fallback
from .inner import InnerState
from .unroll import run_unroll
from .validation import check_bool, check_hyperparameter, check_positive_int

__all__ = ["MAML", "MAMLInit", "SupervisedTask", "adaptation_curve", "adaptation_params"]

#: ``loss_fn(prediction, target) -> scalar`` (e.g. ``torch.nn.functional.mse_loss``).
LossFn = Callable[[Tensor, Tensor], Tensor]


class SupervisedTask:
    r"""A task for the engine built from a model, a loss function and fixed data.

    ``loss(params, (x, y)) = loss_fn(model_params(x), y)`` with the model run through
    ``torch.func.functional_call``. With ``batched=True`` params, ``x`` and ``y`` carry a leading
    task dimension ``B`` and the loss is the ``(B,)`` vector of per-task losses, computed with
    ``vmap`` (each task gets exactly the gradient it would get alone, since the engine
    differentiates the sum).

    Args:
        model: the architecture (its own parameters are replaced by ``params`` in every call).
        loss_fn: ``loss_fn(prediction, target) -> scalar`` for one task.
        support: ``(x, y)``: the data of every inner step (split ``TRAIN``).
        query: ``(x, y)`` for the split ``META`` (optional).
        batched: whether params and data have a leading task dimension.
        params: what :meth:`init` returns (default: the model's own parameters, detached).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, support: tuple[Any, Any],
                 query: tuple[Any, Any] | None = None, *, batched: bool = False,
                 params: Params | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be a callable loss_fn(prediction, target) -> scalar, got "
                            f"{type(loss_fn).__name__}")
        for what, pair in (("support", support), ("query", query)):
            if (pair is not None or what == "support") and not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise TypeError(f"{what} must be a pair (x, y), got {type(pair).__name__}")
        check_bool("batched", batched)
        if params is not None and not (isinstance(params, dict) and params
                                       and all(isinstance(v, Tensor) for v in params.values())):
            raise TypeError(f"params must be None or a non-empty dict of tensors keyed like the model's "
                            f"named_parameters(), got {type(params).__name__}")
        self.model = model
        self.loss_fn = loss_fn
        self.support = support
        self.query = query
        self.batched = batched
        self._params = params

    def init(self, generator: torch.Generator) -> Params:
        """The given ``params``, or the model's parameters detached (expanded to ``B`` if batched)."""
        if self._params is not None:
            return self._params
        params = {k: v.detach() for k, v in self.model.named_parameters()}
        if self.batched:
            b = _leading_size(self.support[0])
            params = {k: v.expand(b, *v.shape) for k, v in params.items()}
        return params

    def sample_batch(self, split: str, generator: torch.Generator) -> tuple[Any, Any]:
        """The fixed support (``TRAIN``) or query (``META``) data; ``generator`` is not used."""
        return support_or_query(split, self.support, self.query)

    def _one_loss(self, params: Params, x: Any, y: Any) -> Tensor:
        out = self.loss_fn(functional_call(self.model, params, (x,)), y)
        if not isinstance(out, Tensor) or out.dim() != 0:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"loss_fn must return a scalar tensor per task, got {shape}")
        return out

    def instance_loss(self, params: Params, batch: tuple[Any, Any]) -> Tensor:
        """The loss of one task (params and data without a task dimension): what the batched
        :meth:`loss` is the ``vmap`` of (see :func:`l2o.tasks.instance_form`)."""
        x, y = batch
        return self._one_loss(params, x, y)

    def loss(self, params: Params, batch: tuple[Any, Any]) -> Tensor:
        """A scalar, or the ``(B,)`` per-task losses when batched."""
        x, y = batch
        if self.batched:  # the vmap wrapper is built per call: storing it on self would be a reference cycle
            return vmap(self._one_loss, randomness="different")(params, x, y)
        return self._one_loss(params, x, y)


def _leading_size(x: Any) -> int:
    if isinstance(x, Tensor) and x.dim() >= 1:
        return x.shape[0]
    raise ValueError(f"batched data must be tensors with a leading task dimension, got {type(x).__name__}")


class MAMLInit(nn.Module):
    r"""Holds MAML's learned initialisation :math:`\theta^{\text{init}}` (the model's parameters).

    ``params()`` returns them as a params dict keyed like ``model.named_parameters()``;
    ``expand(B)`` returns every tensor broadcast to ``(B, *shape)``, a differentiable view (no copy),
    so that a batched task family starts all ``B`` tasks from the same θ0 and the meta-gradient
    sums over them::

        inner = l2o.init_inner(rule, task, gen, params=init.expand(task.num_tasks))
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"MAMLInit needs an nn.Module, got {type(model).__name__}")
        if not any(True for _ in model.parameters()):
            raise ValueError(f"{type(model).__name__} has no parameters to learn an initialisation for")
        self.model = model

    def params(self) -> Params:
        """θ0 as a params dict: the live parameters (gradients flow into them)."""
        return dict(self.model.named_parameters())

    def expand(self, batch_size: int) -> Params:
        """θ0 broadcast to ``(batch_size, *shape)`` for every tensor (a view; differentiable)."""
        b = check_positive_int("batch_size", batch_size)
        return {k: p.expand(b, *p.shape) for k, p in self.model.named_parameters()}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("MAMLInit holds θ0: use .params() or .expand(batch_size), or call the model itself")


class MAML(nn.Module):
    r"""Model-agnostic meta-learning with learn2learn-like verbs, on the unroll engine.

    Its parameters are the model's (θ0) plus the rule's meta-params when the rule has any
    (:class:`~l2o.rules.MetaSGD`'s learning rates, an LSTM rule's weights), so one
    ``torch.optim.Adam(maml.parameters())`` meta-trains them all::

        maml = l2o.MAML(model, inner_lr=0.01, inner_steps=1)          # second order by default
        params = maml.adapt(F.mse_loss, support_x, support_y)           # θ_K, functional
        query_loss = F.mse_loss(maml(params, query_x), query_y)         # differentiable in θ0
        query_loss.backward(); meta_opt.step()

    For a meta-batch of tasks, ``adapt_batch``/``forward_batch`` take data with a leading task
    dimension and run every task at once with ``vmap``.

    Args:
        model: the network whose initialisation is learned; it must be usable with
            ``torch.func.functional_call`` (and ``vmap`` for the batched verbs).
        inner_lr: SGD's learning rate :math:`\gamma` when ``rule`` is None (the paper: 0.01 on sine,
            0.4 on Omniglot); ignored otherwise.
        inner_steps: ``K``, inner steps per :meth:`adapt`.
        first_order: treat the inner gradients as constants (FOMAML); default second order.
        rule: the inner update rule (default ``SGD(lr=inner_lr)``): ``MetaSGD(model)`` gives
            Meta-SGD, an ``LSTMRule`` a jointly learned init and optimizer.
        compile: run the verbs through :func:`torch.compile` (``True``, a backend name or a
            :class:`~l2o.compiling.CompileOptions`): every adaptation is one compiled graph of its
            ``K`` steps (see :mod:`l2o.compiling`), ``forward_batch`` and :meth:`query_loss_batch`
            are compiled too. The same numbers as eager up to float rounding; the first call of
            each configuration compiles (seconds); a failure falls back to eager with a warning.
    """

    def __init__(self, model: nn.Module, inner_lr: float = 0.01, inner_steps: int = 1, first_order: bool = False,
                 rule: Rule | None = None, compile: bool | str | CompileOptions = False) -> None:
        super().__init__()
        self.compile_options: CompileOptions | None = compile_options(compile)
        self.inner_lr = check_hyperparameter("inner_lr", inner_lr, low=0.0, low_inclusive=False)
        self.inner_steps = check_positive_int("inner_steps", inner_steps)
        self.first_order = check_bool("first_order", first_order)
        if rule is not None and not isinstance(rule, Rule):
            raise TypeError(f"rule must be an l2o Rule (e.g. l2o.SGD, l2o.MetaSGD, l2o.LSTMRule), got {type(rule).__name__}")
        self.init = MAMLInit(model)
        self.rule = SGD(lr=self.inner_lr) if rule is None else rule

    @property
    def module(self) -> nn.Module:
        """The wrapped model (its parameters are θ0)."""
        return self.init.model

    def params(self) -> Params:
        """θ0 as a params dict (live parameters)."""
        return self.init.params()

    def task(self, loss_fn: LossFn, support: tuple[Any, Any], query: tuple[Any, Any] | None = None, *,
             batched: bool = False) -> SupervisedTask:
        """A :class:`SupervisedTask` for this model (to drive :func:`l2o.unroll` directly)."""
        return SupervisedTask(self.module, loss_fn, support, query, batched=batched)

    def _adapt(self, task: SupervisedTask, params: Params | None, steps: int | None, first_order: bool | None,
               query: bool = False) -> Any:
        """θ_K (or, with ``query``, the mean query loss after adaptation: one engine call whose
        meta-loss reads the task's query split). ``params=None`` starts from θ0: for a batched task
        its expansion over the tasks, with the first gradient taken at θ0 unbatched."""
        shared = None
        if params is None:
            params = self.params()
            if task.batched:
                shared, params = params, self.init.expand(_leading_size(task.support[0]))
        k = self.inner_steps if steps is None else check_positive_int("steps", steps)
        if first_order is not None and not isinstance(first_order, bool):
            raise TypeError(f"first_order must be a bool or None, got {type(first_order).__name__} ({first_order!r})")
        fo = self.first_order if first_order is None else first_order
        if not (isinstance(params, dict) and params and all(isinstance(v, Tensor) for v in params.values())):
            raise TypeError(f"params must be a non-empty dict of tensors keyed like the model's named_parameters(), "
                            f"got {type(params).__name__}")
        gen = _NO_DRAWS  # the task's data is fixed; the engine's generator draws nothing
        inner = InnerState(params=params, rule_state=self.rule.init(params), step=0)
        weights = (0.0,) * (k - 1) + (1.0 if query else 0.0,)
        result = run_unroll(self.rule, task, inner, steps=k, generator=gen, weights=weights,
                            meta_split=META if query else TRAIN, second_order=not fo, objective="loss", tape=False,
                            options=self.compile_options, record=False, check=False, keep_inner=not query,
                            shared=shared)
        return result.meta_loss if query else result.inner.params

    def adapt(self, loss_fn: LossFn, support_x: Any, support_y: Any, *, params: Params | None = None,
              steps: int | None = None, first_order: bool | None = None) -> Params:
        r"""Adapt to one task: :math:`\theta_K` after ``steps`` (default ``inner_steps``) rule steps.

        Minimises ``loss_fn(model(support_x), support_y)`` from ``params`` (default θ0) through
        :func:`l2o.unroll.unroll`; the result is differentiable with respect to θ0 and the rule's
        weights (first order: through the updates only). The rule's state starts afresh on every
        call. Works under ``torch.no_grad()`` too (evaluation: no graph is kept).
        """
        task = SupervisedTask(self.module, loss_fn, (support_x, support_y))
        return self._adapt(task, params, steps, first_order)

    def adapt_batch(self, loss_fn: LossFn, support_x: Tensor, support_y: Tensor, *, params: Params | None = None,
                    steps: int | None = None, first_order: bool | None = None) -> Params:
        r"""Adapt ``B`` tasks at once: data ``(B, K, ...)``, returned params ``(B, *shape)``.

        Every task starts from θ0 (``params`` default: ``init.expand(B)``) and is adapted exactly
        as :meth:`adapt` would adapt it alone; the model runs through ``vmap``.
        """
        task = SupervisedTask(self.module, loss_fn, (support_x, support_y), batched=True)
        return self._adapt(task, params, steps, first_order)

    def forward(self, params: Params | None, x: Any) -> Any:
        """The model with ``params`` (θ0 when None): ``functional_call(model, params, (x,))``."""
        if params is None:
            return self.module(x)
        return functional_call(self.module, params, (x,))

    def forward_batch(self, params: Params, x: Tensor) -> Tensor:
        """Per-task predictions for params ``(B, *shape)`` and inputs ``(B, N, ...)`` (``vmap``;
        compiled with ``compile``)."""
        if self.compile_options is None:
            return _batched_forward(self.module, params, x)
        options = self.compile_options
        fn = compiled_function(_batched_forward, options, (type(self.module),))
        return run_with_fallback("forward_batch", ("forward_batch", options, type(self.module)), options,
                                 lambda: fn(self.module, params, x), lambda: _batched_forward(self.module, params, x))

    def query_loss_batch(self, loss_fn: LossFn, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                         query_y: Tensor, *, params: Params | None = None, steps: int | None = None,
                         first_order: bool | None = None) -> Tensor:
        r"""MAML's meta-loss on a meta-batch in one call: :math:`\frac1B\sum_b
        \text{loss\_fn}(h_{\theta_{K,b}}(x^q_b), y^q_b)`, with :math:`\theta_{K,b}` what
        :meth:`adapt_batch` returns for task ``b``.

        The same number as ``loss_fn`` on :meth:`forward_batch` of :meth:`adapt_batch`'s params,
        averaged over the tasks (``loss_fn`` is applied per task), from one engine call: with
        ``compile`` the adaptation and the query loss are one compiled graph (the fastest form of
        a meta-iteration). Data ``(B, N, ...)``; differentiable in θ0 and the rule's weights.
        """
        task = SupervisedTask(self.module, loss_fn, (support_x, support_y), (query_x, query_y), batched=True)
        return self._adapt(task, params, steps, first_order, query=True)


def _batched_forward(module: nn.Module, params: Params, x: Tensor) -> Tensor:
    return vmap(lambda p, xb: functional_call(module, p, (xb,)), randomness="different")(params, x)


class _NoDraws:
    """The generator of a :class:`SupervisedTask`'s unroll: its data is fixed, nothing is drawn
    (``get_state``/``set_state`` for the compiled engine's fallback)."""

    def get_state(self) -> None:
        return None

    def set_state(self, state: None) -> None:
        return None


_NO_DRAWS: Any = _NoDraws()
