r"""Meta-SGD (Li et al. 2017): SGD with a learnable learning rate per parameter coordinate.

For every parameter tensor :math:`\theta^{(k)}` the rule holds a tensor :math:`\alpha^{(k)}` of the
same shape (its meta-params) and proposes

.. math:: u_t^{(k)} = -\,\alpha^{(k)} \odot g_t^{(k)}, \qquad
          \theta_{t+1}^{(k)} = \theta_t^{(k)} + u_t^{(k)}

so one inner step is :math:`\theta' = \theta - \alpha \odot \nabla f(\theta)`. :math:`\alpha` is
meta-learned together with MAML's initialisation :math:`\theta_0` (``l2o.MAML(model,
rule=MetaSGD(model))``): both the step size and the direction of the update are learned, since the
entries of :math:`\alpha` are unconstrained (they may become negative). With
:math:`\alpha \equiv \gamma` fixed it is plain SGD with learning rate :math:`\gamma`.

Batched tasks: when a gradient has one more leading dimension than its :math:`\alpha` (a meta-batch
of tasks, ``(B, *shape)``), the same :math:`\alpha` is broadcast over that dimension, so every task
of the meta-batch is adapted with the shared learned rates and :math:`\partial\mathcal L/\partial
\alpha` sums over the tasks.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from ..tree import Params
from ..validation import check_hyperparameter
from .base import Rule, check_update_args

__all__ = ["MetaSGD", "MetaSGDState"]


class MetaSGDState(NamedTuple):
    """Meta-SGD keeps no per-run memory: its state is an empty NamedTuple."""


def _shapes_of(shapes: nn.Module | Mapping[str, Tensor | Sequence[int]]) -> dict[str, tuple[int, ...]]:
    if isinstance(shapes, nn.Module):
        out = {k: tuple(p.shape) for k, p in shapes.named_parameters()}
        if not out:
            raise ValueError(f"MetaSGD needs at least one parameter tensor, got a {type(shapes).__name__} "
                             "without parameters")
        return out
    if not isinstance(shapes, Mapping):
        raise TypeError(
            "MetaSGD needs the params it will update: an nn.Module, a params dict or a dict of shapes, "
            f"got {type(shapes).__name__}"
        )
    out: dict[str, tuple[int, ...]] = {}
    for k, v in shapes.items():
        if not isinstance(k, str):
            raise TypeError(f"MetaSGD shapes must be keyed by parameter names (str), got key {k!r}")
        shape = tuple(v.shape) if isinstance(v, Tensor) else v
        if not isinstance(shape, (tuple, list)) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise ValueError(f"MetaSGD shape of {k!r} must be a sequence of non-negative ints, got {v!r}")
        out[k] = tuple(int(d) for d in shape)
    if not out:
        raise ValueError("MetaSGD needs at least one parameter tensor, got none")
    return out


def _first_tensor(shapes: Any) -> Tensor | None:
    if isinstance(shapes, nn.Module):
        return next(shapes.parameters(), None)
    return next((v for v in shapes.values() if isinstance(v, Tensor) and v.is_floating_point()), None)


class MetaSGD(Rule):
    r"""Meta-SGD: :math:`u_t = -\alpha \odot g_t` with a learnable :math:`\alpha` per coordinate.

    See the module docstring for the math. :math:`\alpha` starts at ``lr`` everywhere (Li et al.
    draw it from U[0.005, 0.1]; a constant start makes step 0 identical to SGD/MAML and the rule
    rebuildable from its config) and is stored as one ``nn.Parameter`` per parameter tensor, in the
    order of ``shapes`` (state-dict keys ``alpha.0``, ``alpha.1``, ...).

    Args:
        shapes: the params the rule will update: an ``nn.Module`` (its ``named_parameters()``), a
            params dict, or a dict ``{name: shape}``. Only the shapes are kept; ``config()`` stores
            them as ``{name: [d0, d1, ...]}`` so checkpoints rebuild the rule from plain data.
            :math:`\alpha` takes the dtype and device of the given tensors (float32 on the CPU when
            only shapes are given, as when a checkpoint rebuilds the rule; use ``.to()`` then).
        lr: the initial learning rate :math:`\alpha_0 > 0`.

    ``update`` accepts gradients shaped like the params or with one extra leading (task) dimension,
    over which :math:`\alpha` is broadcast; the updates take the gradients' dtype.
    """

    name = "metasgd"

    def __init__(self, shapes: nn.Module | Mapping[str, Tensor | Sequence[int]], lr: float = 1e-2) -> None:
        super().__init__()
        self.lr = check_hyperparameter("lr", lr, low=0.0, low_inclusive=False)
        self.shapes = _shapes_of(shapes)
        self.names = tuple(self.shapes)
        like = _first_tensor(shapes)
        kw = {} if like is None else {"dtype": like.dtype, "device": like.device}
        dtype = like.dtype if like is not None else torch.get_default_dtype()
        if self.lr > torch.finfo(dtype).max:
            raise ValueError(f"lr must fit the learning rates' dtype {dtype} (at most {torch.finfo(dtype).max:g}), "
                             f"got {lr!r}")
        self.alpha = nn.ParameterList(nn.Parameter(torch.full(s, self.lr, **kw)) for s in self.shapes.values())

    def learning_rates(self) -> Params:
        r"""The current :math:`\alpha` as a dict keyed like the params (the live parameters, not copies)."""
        return dict(zip(self.names, self.alpha))

    def init(self, params: Params) -> MetaSGDState:
        """Check that ``params`` are the ones this rule was built for; the state is empty."""
        self._check(params, params, batched_ok=True)
        return MetaSGDState()

    def check_update(self, grads: Params, state: MetaSGDState, params: Params, *, step: int) -> None:
        """What :meth:`update` checks (see :meth:`l2o.Rule.check_update`)."""
        check_update_args(grads, params, step, rule="MetaSGD")
        if not isinstance(state, MetaSGDState):
            raise TypeError(f"MetaSGD.update: state must be the MetaSGDState that rule.init(params) returned, "
                            f"got {type(state).__name__}")
        self._check(grads, params, batched_ok=True)

    def update_unchecked(self, grads: Params, state: MetaSGDState, params: Params, *, step: int,
                         loss: Tensor | None = None) -> tuple[Params, MetaSGDState]:
        """:meth:`update` without the argument checks."""
        updates = {k: -(a.to(dtype=grads[k].dtype) * grads[k]) for k, a in zip(self.names, self.alpha)}
        return updates, state

    def apply_unchecked(self, grads: Params, state: MetaSGDState, params: Params, *, step: int,
                        loss: Tensor | None = None) -> tuple[Params, MetaSGDState]:
        r""":math:`\theta - \alpha \odot g` as one ``addcmul`` per tensor (a subclass with its own
        ``update_unchecked``: that and ``apply_updates``)."""
        if type(self).update_unchecked is not MetaSGD.update_unchecked:
            return super().apply_unchecked(grads, state, params, step=step, loss=loss)
        return {k: torch.addcmul(params[k], a.to(dtype=grads[k].dtype), grads[k], value=-1.0).to(params[k].dtype)
                for k, a in zip(self.names, self.alpha)}, state

    def _check(self, grads: Mapping[str, Tensor], params: Mapping[str, Tensor], *, batched_ok: bool) -> None:
        if not isinstance(params, Mapping) or not all(isinstance(v, Tensor) for v in params.values()):
            raise TypeError(f"MetaSGD: params must be a dict of tensors keyed like the model's parameters, "
                            f"got {type(params).__name__}")
        if grads.keys() != params.keys():
            raise ValueError(
                f"grads and params must have the same keys: params {sorted(params)}, grads {sorted(grads)}"
            )
        if set(grads) != set(self.names):
            raise ValueError(
                f"MetaSGD was built for params {sorted(self.names)}, got {sorted(grads)}; "
                "build it from the same model or params dict"
            )
        for k, shape in self.shapes.items():
            s = tuple(grads[k].shape)
            if s != shape and not (batched_ok and len(s) == len(shape) + 1 and s[1:] == shape):
                raise ValueError(
                    f"MetaSGD: {k!r} has shape {s}; expected {shape} or (tasks, *{shape}) for a batch of tasks"
                )

    def config(self) -> dict[str, Any]:
        return {"shapes": {k: list(s) for k, s in self.shapes.items()}, "lr": self.lr}

    def extra_repr(self) -> str:
        return f"lr={self.lr!r}, params={len(self.names)} tensors"
