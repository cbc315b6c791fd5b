r"""Per-instance gradients of a batched task at params every instance shares.

A batched task (a leading instance dimension ``B`` on params and data) whose ``loss`` is the
``vmap`` of a one-instance loss may expose that loss as ``instance_loss(params, batch) -> scalar``,
with the params and the batch of one instance (see :func:`l2o.tasks.instance_form`). When all
``B`` instances start from the same params :math:`\theta` (MAML's initialisation:
``inner.params[k]`` is ``theta[k].expand(B, *theta[k].shape)``), the engine takes the first
gradient at :math:`\theta` itself,

.. math:: g_b = \nabla_\theta f(\theta;\, x_b), \qquad b = 1, \dots, B,

as ``vmap(grad(instance_loss), in_dims=(None, 0))``: the same numbers as the gradient of the summed
loss at the expanded params, but the model runs on :math:`\theta` unbatched, so neither the forward
pass nor its backward materialises ``B`` copies of :math:`\theta` (what a second-order meta-gradient
would otherwise keep in its graph).
"""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor
from torch.func import grad, vmap

from .tree import Params

__all__ = ["shared_loss_and_grads"]


def shared_loss_and_grads(instance_loss: Callable[[Params, Any], Tensor], shared: Params, batch: Any, *,
                          second_order: bool) -> tuple[Tensor, Params]:
    r"""Per-instance losses ``(B,)`` and gradients ``{k: (B, *shape)}`` at ``shared`` params.

    ``batch`` carries the leading instance dimension ``B`` on every tensor; ``shared`` does not.
    In second order the gradients are differentiable functions of ``shared`` (and of anything it
    was computed from); in first order they and the losses are detached.
    """
    start = shared if second_order else {k: v.detach() for k, v in shared.items()}

    def one(params: Params, instance: Any) -> tuple[Tensor, Tensor]:
        loss = instance_loss(params, instance)
        return loss, loss

    grads, loss = vmap(grad(one, has_aux=True), in_dims=(None, 0), randomness="different")(start, batch)
    if not second_order:
        return loss.detach(), {k: g.detach() for k, g in grads.items()}
    return loss, grads
