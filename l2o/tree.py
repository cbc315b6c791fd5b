"""Functions for params, grads, updates and states stored as ``dict[str, Tensor]``.

Optimizee parameters are plain dictionaries keyed like ``module.named_parameters()``. Every
function here is out-of-place and differentiable: nothing mutates its inputs, so the unroll engine
can differentiate through any of them.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor

Params = dict[str, Tensor]

__all__ = [
    "Params",
    "zeros_like",
    "apply_updates",
    "detach",
    "flatten",
    "split_like",
    "num_elements",
    "is_namedtuple",
    "state_map",
    "state_leaves",
    "state_fill",
]


def zeros_like(tree: Mapping[str, Tensor]) -> Params:
    """A tree of zeros with the shapes, dtypes and devices of ``tree``."""
    return {k: torch.zeros_like(v) for k, v in tree.items()}


def apply_updates(params: Mapping[str, Tensor], updates: Mapping[str, Tensor]) -> Params:
    r"""Return :math:`\theta_{t+1} = \theta_t + u_t` leafwise (the only place params change).

    Updates are cast to each parameter's dtype, so a float32 rule can drive float64 params.
    """
    if params.keys() != updates.keys():
        raise ValueError(
            f"updates and params have different keys: params {sorted(params)}, updates {sorted(updates)}"
        )
    return {k: p + (u if (u := updates[k]).dtype == p.dtype else u.to(p.dtype)) for k, p in params.items()}


def detach(tree: Mapping[str, Tensor]) -> Params:
    """New detached tensors (``Tensor.detach``, never in-place ``detach_``)."""
    return {k: v.detach() for k, v in tree.items()}


def num_elements(tree: Mapping[str, Tensor]) -> int:
    """Total number of coordinates in the tree."""
    return sum(v.numel() for v in tree.values())


def flatten(tree: Mapping[str, Tensor]) -> Tensor:
    """Concatenate all leaves into one 1-D tensor (coordinate order: keys, then row-major)."""
    leaves = [v.reshape(-1) for v in tree.values()]
    if len(leaves) == 1:
        return leaves[0]
    return torch.cat(leaves)


def split_like(flat: Tensor, tree: Mapping[str, Tensor]) -> Params:
    """Inverse of :func:`flatten`: cut ``flat`` into ``tree``'s shapes (and dtypes), in its key order."""
    out: Params = {}
    offset = 0
    for k, v in tree.items():
        size = v.numel()
        out[k] = flat[offset:offset + size].reshape(v.shape).to(v.dtype)
        offset += size
    return out


# Rule states are nested NamedTuples, tuples, lists and dicts with tensors (or other values) as
# leaves. These three functions walk that structure in one fixed order.


def is_namedtuple(x: Any) -> bool:
    """True for instances of ``typing.NamedTuple`` / ``collections.namedtuple`` classes."""
    return isinstance(x, tuple) and hasattr(x, "_fields")


def state_map(fn: Callable[[Tensor], Any], state: Any) -> Any:
    """The same structure with ``fn`` applied to every tensor leaf (other leaves kept as they are)."""
    if isinstance(state, Tensor):
        return fn(state)
    if is_namedtuple(state):
        return type(state)(*(state_map(fn, v) for v in state))
    if isinstance(state, (tuple, list)):
        return type(state)(state_map(fn, v) for v in state)
    if isinstance(state, dict):
        return {k: state_map(fn, v) for k, v in state.items()}
    return state


def state_leaves(state: Any) -> list[Any]:
    """Every leaf (tensor or not) of a nested state, in a fixed order."""
    if isinstance(state, dict):
        return [leaf for v in state.values() for leaf in state_leaves(v)]
    if isinstance(state, (tuple, list)):
        return [leaf for v in state for leaf in state_leaves(v)]
    return [state]


def state_fill(template: Any, leaves: Iterator[Any]) -> Any:
    """Inverse of :func:`state_leaves`: the structure of ``template`` holding the next ``leaves``."""
    if is_namedtuple(template):
        return type(template)(*(state_fill(v, leaves) for v in template))
    if isinstance(template, (tuple, list)):
        return type(template)(state_fill(v, leaves) for v in template)
    if isinstance(template, dict):
        return {k: state_fill(v, leaves) for k, v in template.items()}
    return next(leaves)
