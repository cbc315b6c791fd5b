"""Conformance checks every :class:`l2o.rules.Rule` must pass (a new rule's test is one line).

Usage::

    from tests.conformance import check_rule

    def test_my_rule_conforms():
        check_rule(MyRule())

A rule with its own weights (a learned rule) must compute in ``dtype``: cast it first
(``check_rule(rule.double())``) or pass ``dtype=torch.float32``.
"""

from __future__ import annotations

from typing import Any, Mapping

import pytest
import torch
from torch import Tensor

from l2o.rules.base import Rule
from l2o.tree import apply_updates, state_leaves

__all__ = ["check_rule", "random_params", "state_tensors"]

#: Shapes of the params ``check_rule`` feeds a rule: 0-d, 1-d, 2-d, 3-d and an empty tensor.
SHAPES: dict[str, tuple[int, ...]] = {
    "scale": (),
    "layer.bias": (5,),
    "layer.weight": (5, 3),
    "conv.weight": (2, 3, 2),
    "empty": (0, 4),
}


def _nonzero_randn(shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype) -> Tensor:
    """Standard normal values pushed away from 0 (|x| >= 0.1): non-degenerate, never all-zero."""
    x = torch.randn(shape, generator=gen, dtype=dtype)
    return x + 0.1 * torch.where(x >= 0, 1.0, -1.0).to(dtype)


def random_params(gen: torch.Generator, dtype: torch.dtype = torch.float64,
                  shapes: Mapping[str, tuple[int, ...]] = SHAPES) -> dict[str, Tensor]:
    """A dict of random non-degenerate tensors with the given shapes."""
    return {k: _nonzero_randn(tuple(s), gen, dtype) for k, s in shapes.items()}


def state_tensors(obj: Any) -> list[Tensor]:
    """All tensors inside a (nested) state: NamedTuples, tuples, lists and dicts, in order."""
    return [leaf for leaf in state_leaves(obj) if isinstance(leaf, Tensor)]


def _structure(obj: Any) -> Any:
    """Type/key/shape/dtype skeleton of a state, for structural comparisons."""
    if isinstance(obj, Tensor):
        return ("tensor", tuple(obj.shape), obj.dtype)
    if isinstance(obj, Mapping):
        return (type(obj).__name__, tuple((k, _structure(v)) for k, v in obj.items()))
    if isinstance(obj, (tuple, list)):
        return (type(obj).__name__, tuple(_structure(x) for x in obj))
    return (type(obj).__name__, obj)


def _assert_same_tensors(a: list[Tensor], b: list[Tensor], what: str) -> None:
    assert len(a) == len(b), f"{what}: {len(a)} tensors vs {len(b)}"
    for i, (x, y) in enumerate(zip(a, b)):
        torch.testing.assert_close(x, y, rtol=0.0, atol=0.0, equal_nan=True, msg=lambda m: f"{what} [{i}]: {m}")


def _snapshot(tensors: list[Tensor]) -> list[tuple[Tensor, int]]:
    return [(t.detach().clone(), t._version) for t in tensors]


def _assert_unchanged(tensors: list[Tensor], snap: list[tuple[Tensor, int]], what: str) -> None:
    for t, (copy, version) in zip(tensors, snap):
        assert t._version == version, f"update modified {what} in place (version {version} -> {t._version})"
        torch.testing.assert_close(t.detach(), copy, rtol=0.0, atol=0.0, equal_nan=True,
                                   msg=lambda m: f"update changed {what}: {m}")


def _is_plain(value: Any) -> bool:
    """Values a ``weights_only`` checkpoint can hold: numbers, strings, None and containers of them."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (tuple, list)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


def _check_updates(updates: Any, params: Mapping[str, Tensor], where: str) -> None:
    assert isinstance(updates, dict), f"{where}: updates must be a dict, got {type(updates).__name__}"
    assert set(updates) == set(params), f"{where}: update keys {sorted(updates)} != param keys {sorted(params)}"
    for k, p in params.items():
        u = updates[k]
        assert isinstance(u, Tensor), f"{where}: updates[{k!r}] is {type(u).__name__}, not a Tensor"
        assert u.shape == p.shape, f"{where}: updates[{k!r}] has shape {tuple(u.shape)}, param {tuple(p.shape)}"
        assert u.dtype == p.dtype, f"{where}: updates[{k!r}] has dtype {u.dtype}, param {p.dtype}"
        assert u.device == p.device, f"{where}: updates[{k!r}] is on {u.device}, param on {p.device}"
        assert bool(torch.isfinite(u).all()), f"{where}: updates[{k!r}] is not finite"


def _check_state(state: Any, reference: Any, where: str) -> None:
    assert isinstance(state, tuple) and hasattr(state, "_fields"), (
        f"{where}: state must be a NamedTuple, got {type(state).__name__}"
    )
    assert _structure(state) == _structure(reference), f"{where}: state structure changed across steps"
    for t in state_tensors(state):
        if t.is_floating_point():
            assert bool(torch.isfinite(t).all()), f"{where}: state holds non-finite values"


def check_rule(rule: Rule, *, dtype: torch.dtype = torch.float64, steps: int = 3, seed: int = 0) -> None:
    """Assert that ``rule`` honours the :class:`~l2o.rules.Rule` contract.

    Checks, on random non-degenerate params (0-d to 3-d and an empty tensor) for ``steps`` steps:
    ``init`` returns a NamedTuple whose structure ``update`` keeps; updates have the params' keys,
    shapes, dtypes and devices and are finite; inputs (grads, params, state) are neither mutated nor
    version-bumped; re-running ``update`` on the same inputs gives bit-identical results (pure and
    deterministic); updates are differentiable with respect to grads, params, the previous step and
    the rule's own parameters (twice, for second-order meta-gradients); ``config()`` is plain data
    and ``type(rule)(**rule.config())`` plus the state_dict reproduces the rule; calling the module
    raises ``TypeError``.
    """
    gen = torch.Generator().manual_seed(seed)
    assert isinstance(rule, Rule), f"{type(rule).__name__} is not an l2o.rules.Rule"
    assert isinstance(rule.name, str) and rule.name and rule.name != Rule.name, (
        f"{type(rule).__name__} must set a registry name (class attribute `name`), got {rule.name!r}"
    )

    params = random_params(gen, dtype)
    grads_seq = [random_params(gen, dtype) for _ in range(steps)]
    loss = torch.tensor(1.2345, dtype=dtype)

    # ---- init: NamedTuple, deterministic, inputs untouched
    snap = _snapshot(list(params.values()))
    state0 = rule.init(params)
    _assert_unchanged(list(params.values()), snap, "params (in init)")
    assert isinstance(state0, tuple) and hasattr(state0, "_fields"), (
        f"init must return a NamedTuple, got {type(state0).__name__}"
    )
    _assert_same_tensors(state_tensors(state0), state_tensors(rule.init(params)), "init twice")
    _check_state(state0, state0, "init")

    # ---- forward steps: shapes, purity, determinism, no mutation
    state, p = state0, params
    trajectory: list[tuple[dict[str, Tensor], Any, dict[str, Tensor], dict[str, Tensor]]] = []
    for t, grads in enumerate(grads_seq):
        where = f"step {t}"
        inputs = list(grads.values()) + list(p.values()) + state_tensors(state)
        snap = _snapshot(inputs)
        step_loss = loss if t % 2 else None
        updates, new_state = rule.update(grads, state, p, step=t, loss=step_loss)
        _assert_unchanged(inputs, snap, f"its inputs at {where}")
        _check_updates(updates, p, where)
        _check_state(new_state, state0, where)
        # pure + deterministic: the same (old) state and inputs give the same answer again
        updates2, new_state2 = rule.update(grads, state, p, step=t, loss=step_loss)
        _assert_same_tensors(list(updates.values()), [updates2[k] for k in updates], f"{where}: update twice")
        _assert_same_tensors(state_tensors(new_state), state_tensors(new_state2), f"{where}: new state twice")
        # ... and equal (cloned) inputs too
        clone = lambda d: {k: v.clone() for k, v in d.items()}  # noqa: E731
        updates3, _ = rule.update(clone(grads), state, clone(p), step=t, loss=step_loss)
        _assert_same_tensors(list(updates.values()), [updates3[k] for k in updates], f"{where}: cloned inputs")
        trajectory.append((grads, state, p, updates))
        state, p = new_state, apply_updates(p, updates)

    # ---- differentiability: through grads, params, the previous step and the rule's weights
    rule_params = [w for w in rule.parameters() if w.requires_grad]
    g0 = {k: v.clone().requires_grad_() for k, v in grads_seq[0].items()}
    g1 = {k: v.clone().requires_grad_() for k, v in grads_seq[1 % steps].items()}
    p0 = {k: v.clone().requires_grad_() for k, v in params.items()}
    u0, s1 = rule.update(g0, rule.init(p0), p0, step=0)
    p1 = apply_updates(p0, u0)
    u1, s2 = rule.update(g1, s1, p1, step=1, loss=loss)
    total = sum(u.sum() for u in u1.values()) + sum(u.sum() for u in u0.values())
    total = total + sum((t.sum() for t in state_tensors(s2) if t.requires_grad), torch.zeros((), dtype=dtype))
    assert total.requires_grad, "updates carry no autograd history: does update detach its inputs?"
    wrt = list(g0.values()) + list(g1.values()) + list(p0.values()) + rule_params
    first = torch.autograd.grad(total, wrt, allow_unused=True, create_graph=True)
    n_g = len(g0)
    assert any(d is not None for d in first[n_g:2 * n_g]), "updates do not depend on the current grads"
    for d in first:
        assert d is None or bool(torch.isfinite(d).all()), "non-finite gradient through update"
    for w, d in zip(rule_params, first[3 * n_g:]):
        assert d is not None, f"rule parameter of shape {tuple(w.shape)} gets no gradient from the updates"
    second = [d for d in first if d is not None and d.requires_grad]
    if second:  # second order (MAML, meta-gradients through the unroll): must not raise
        dd = torch.autograd.grad(sum(d.sum() for d in second), wrt, allow_unused=True)
        for d in dd:
            assert d is None or bool(torch.isfinite(d).all()), "non-finite second-order gradient"

    # ---- config round trip
    config = rule.config()
    assert isinstance(config, dict) and all(isinstance(k, str) for k in config), "config() must be a dict[str, ...]"
    assert _is_plain(config), f"config() must hold plain data (numbers, strings, containers), got {config!r}"
    twin = type(rule)(**config)
    assert twin.config() == config, f"config round trip changed it: {config} -> {twin.config()}"
    floating = [w.dtype for w in rule.state_dict().values() if isinstance(w, Tensor) and w.is_floating_point()]
    if floating:
        twin = twin.to(floating[0])
    twin.load_state_dict(rule.state_dict())
    for t, (grads, st, pt, updates) in enumerate(trajectory):
        twin_updates, _ = twin.update(grads, st, pt, step=t, loss=loss if t % 2 else None)
        _assert_same_tensors(list(updates.values()), [twin_updates[k] for k in updates], f"rebuilt rule, step {t}")
    assert isinstance(repr(rule), str)

    # ---- the module itself is not callable
    with pytest.raises(TypeError):
        rule(grads_seq[0], state0, params, step=0)


def check_task(task: Any, *, seed: int = 0) -> None:
    """Conformance of a :class:`l2o.tasks.Task`: seeded init, finite losses, per-instance gradients.

    Checks that ``init`` is deterministic for a seeded generator and returns a dict of floating
    tensors; ``loss`` returns a finite scalar or vector; the gradient of its sum reaches every
    param and is finite; and ``loss`` neither mutates the params nor keeps them alive in state.
    """
    from l2o.tasks import TRAIN

    gen_a = torch.Generator().manual_seed(seed)
    gen_b = torch.Generator().manual_seed(seed)
    params_a, params_b = task.init(gen_a), task.init(gen_b)
    assert isinstance(params_a, dict) and params_a, "init must return a non-empty dict of tensors"
    assert params_a.keys() == params_b.keys()
    for k in params_a:
        assert params_a[k].is_floating_point(), f"param {k!r} is not floating point"
        assert torch.equal(params_a[k], params_b[k]), f"init is not deterministic for a seeded generator ({k!r})"
    batch = task.sample_batch(TRAIN, torch.Generator().manual_seed(seed + 1))
    leaves = {k: v.clone().requires_grad_() for k, v in params_a.items()}
    snap = _snapshot(list(leaves.values()))
    loss = task.loss(leaves, batch)
    assert isinstance(loss, Tensor) and loss.dim() <= 1, f"loss must be a scalar or a vector, got shape {tuple(loss.shape)}"
    assert torch.isfinite(loss).all(), "loss at the initial params is not finite"
    grads = torch.autograd.grad(loss.sum(), list(leaves.values()), allow_unused=True)
    for (k, v), g in zip(leaves.items(), grads):
        assert g is not None, f"param {k!r} gets no gradient from the loss"
        assert g.shape == v.shape and torch.isfinite(g).all(), f"bad gradient for {k!r}"
    _assert_unchanged(list(leaves.values()), snap, "params (loss must not mutate them)")
