"""Helpers for params, grads, updates and states stored as ``dict[str, Tensor]``.

Optimizee parameters are plain dictionaries keyed like ``module.named_parameters()``. Every
helper here is out-of-place and differentiable: nothing mutates its inputs, so the unroll engine
can differentiate through any of them.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import Tensor

Params = dict[str, Tensor]

__all__ = [
    "Params",
    "tree_map",
    "zeros_like",
    "apply_updates",
    "detach",
    "flatten",
    "unflatten",
    "num_elements",
    "all_finite",
]


def tree_map(fn: Callable[..., Tensor], tree: Mapping[str, Tensor], *rest: Mapping[str, Tensor]) -> Params:
    """Apply ``fn`` leafwise: ``{k: fn(tree[k], rest[0][k], ...)}``, keys and order of ``tree``."""
    return {k: fn(v, *(r[k] for r in rest)) for k, v in tree.items()}


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
    return {k: p + updates[k].to(p.dtype) for k, p in params.items()}


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


def unflatten(flat: Tensor, like: Mapping[str, Tensor]) -> Params:
    """Inverse of :func:`flatten`: split ``flat`` (last dim) into tensors shaped like ``like``."""
    sizes = [v.numel() for v in like.values()]
    pieces = torch.split(flat, sizes, dim=-1) if len(sizes) > 1 else (flat,)
    lead = flat.shape[:-1]
    return {k: piece.reshape(*lead, *v.shape) for (k, v), piece in zip(like.items(), pieces)}


def all_finite(tree: Mapping[str, Tensor]) -> bool:
    """True when every element of every leaf is finite."""
    return all(bool(torch.isfinite(v).all()) for v in tree.values())
