"""Hand-designed rules: conformance, float64 agreement with torch.optim, validation, gradcheck.

Every generic test iterates ``CASES``, one row per configuration (after torch.optim's table of
optimizer configs).

Trajectory tests: the problem is a fixed random least-squares-like loss whose gradients depend on
the current params, in float64, for ``STEPS`` steps. torch.optim gets two param groups with
different shapes and learning rates; our side builds one rule per group with that group's lr. One
torch parameter (``"unused"``) never receives a gradient (``.grad is None``), so torch skips it.
Our rules take a gradient for every parameter they are given, so the unused parameter is simply
not passed to them (that is the l2o way to freeze a parameter); the test checks torch left it
bit-identical and compares every used parameter's delta from the start, ``theta_t - theta_0``, at
every step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from l2o.rules import HAND_RULES, NAG, SGD, Adam, RMSprop, Rule
from l2o.tree import apply_updates
from tests.conformance import check_rule

DTYPE = torch.float64
STEPS = 20
TOL = 1e-10


@dataclass(frozen=True)
class Case:
    id: str
    rule_cls: type[Rule]
    kwargs: dict[str, Any]
    torch_cls: type[torch.optim.Optimizer]
    torch_kwargs: dict[str, Any]
    #: extra kwargs that make the rule smooth for gradcheck (eps_root > 0 under the square root)
    smooth: dict[str, Any] = field(default_factory=dict)

    def rule(self, **overrides: Any) -> Rule:
        return self.rule_cls(**{**self.kwargs, **overrides})


SMOOTH = {"eps_root": 1e-8}
CASES = [
    Case("sgd", SGD, dict(lr=0.05), torch.optim.SGD, dict(lr=0.05)),
    Case("sgd-momentum-dampening-wd", SGD, dict(lr=0.03, momentum=0.8, dampening=0.3, weight_decay=0.02),
         torch.optim.SGD, dict(lr=0.03, momentum=0.8, dampening=0.3, weight_decay=0.02)),
    Case("sgd-nesterov", SGD, dict(lr=0.02, momentum=0.7, nesterov=True),
         torch.optim.SGD, dict(lr=0.02, momentum=0.7, nesterov=True)),
    Case("nag-wd", NAG, dict(lr=0.02, momentum=0.9, weight_decay=0.01),
         torch.optim.SGD, dict(lr=0.02, momentum=0.9, nesterov=True, weight_decay=0.01)),
    Case("rmsprop", RMSprop, dict(lr=0.01), torch.optim.RMSprop, dict(lr=0.01), SMOOTH),
    Case("rmsprop-centered", RMSprop, dict(lr=0.01, alpha=0.9, centered=True),
         torch.optim.RMSprop, dict(lr=0.01, alpha=0.9, centered=True), SMOOTH),
    Case("rmsprop-momentum", RMSprop, dict(lr=0.005, alpha=0.95, momentum=0.9),
         torch.optim.RMSprop, dict(lr=0.005, alpha=0.95, momentum=0.9), SMOOTH),
    Case("rmsprop-wd", RMSprop, dict(lr=0.01, weight_decay=0.05, eps=1e-6),
         torch.optim.RMSprop, dict(lr=0.01, weight_decay=0.05, eps=1e-6), SMOOTH),
    Case("rmsprop-centered-momentum-wd", RMSprop,
         dict(lr=0.003, alpha=0.9, momentum=0.5, centered=True, weight_decay=0.1),
         torch.optim.RMSprop, dict(lr=0.003, alpha=0.9, momentum=0.5, centered=True, weight_decay=0.1), SMOOTH),
    Case("adam", Adam, dict(lr=0.01), torch.optim.Adam, dict(lr=0.01), SMOOTH),
    Case("adam-wd", Adam, dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05),
         torch.optim.Adam, dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05), SMOOTH),
]
IDS = [c.id for c in CASES]

# ------------------------------------------------------------------------------------------ problem

GROUP_A = ("layer.weight", "layer.bias")  # lr
GROUP_B = ("scale", "shift")  # lr * LR_B, plus the unused parameter in torch
LR_B = 0.5


def make_problem(seed: int = 0) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *s: torch.randn(*s, generator=gen, dtype=DTYPE)  # noqa: E731
    params0 = {
        "layer.weight": 0.5 * randn(4, 3),
        "layer.bias": randn(4),
        "scale": torch.tensor(1.3, dtype=DTYPE),
        "shift": randn(4),
        "unused": randn(5),
    }
    return params0, randn(16, 3), randn(16, 4)


def loss_fn(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    """Non-quadratic least squares: gradients depend on every used param."""
    pred = (x @ params["layer.weight"].T + params["layer.bias"]) * params["scale"] + torch.tanh(params["shift"])
    return ((pred - y) ** 2).mean() + 0.01 * params["scale"] ** 4


def grads_of(params: dict[str, Tensor], x: Tensor, y: Tensor, *, create_graph: bool = False) -> dict[str, Tensor]:
    if create_graph:
        leaves = params
    else:
        leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    g = torch.autograd.grad(loss_fn(leaves, x, y), list(leaves.values()), create_graph=create_graph)
    return dict(zip(leaves, g))


def torch_trajectory(case: Case, params0: dict[str, Tensor], x: Tensor, y: Tensor) -> list[dict[str, Tensor]]:
    leaves = {k: v.clone().requires_grad_() for k, v in params0.items()}
    lr_b = case.torch_kwargs["lr"] * LR_B
    opt = case.torch_cls(
        [{"params": [leaves[k] for k in GROUP_A]},
         {"params": [leaves[k] for k in (*GROUP_B, "unused")], "lr": lr_b}],
        **case.torch_kwargs,
    )
    out = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss_fn(leaves, x, y).backward()
        assert leaves["unused"].grad is None
        opt.step()
        out.append({k: v.detach().clone() for k, v in leaves.items()})
    return out


def l2o_trajectory(case: Case, params0: dict[str, Tensor], x: Tensor, y: Tensor) -> list[dict[str, Tensor]]:
    groups = {GROUP_A: case.rule(), GROUP_B: case.rule(lr=case.kwargs["lr"] * LR_B)}
    params = {k: params0[k] for k in (*GROUP_A, *GROUP_B)}
    states = {keys: rule.init({k: params[k] for k in keys}) for keys, rule in groups.items()}
    out = []
    for t in range(STEPS):
        grads = grads_of(params, x, y)
        updates: dict[str, Tensor] = {}
        for keys, rule in groups.items():
            sub = lambda d: {k: d[k] for k in keys}  # noqa: E731
            u, states[keys] = rule.update(sub(grads), states[keys], sub(params), step=t)
            updates.update(u)
        params = apply_updates(params, updates)
        out.append(params)
    return out


# ------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_conformance(case: Case) -> None:
    check_rule(case.rule())


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_matches_torch_optim_trajectory(case: Case) -> None:
    params0, x, y = make_problem()
    theirs = torch_trajectory(case, params0, x, y)
    ours = l2o_trajectory(case, params0, x, y)
    for t, (p_theirs, p_ours) in enumerate(zip(theirs, ours)):
        assert torch.equal(p_theirs["unused"], params0["unused"]), "torch moved the gradient-less parameter"
        for k in (*GROUP_A, *GROUP_B):
            torch.testing.assert_close(
                p_ours[k] - params0[k], p_theirs[k] - params0[k], rtol=0.0, atol=TOL,
                msg=lambda m: f"{case.id}, step {t}, {k}: {m}",
            )
    # the comparison is not vacuous: every used parameter moved visibly
    for k in (*GROUP_A, *GROUP_B):
        assert (ours[-1][k] - params0[k]).abs().max() > 1e-4, k


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradcheck_through_three_inner_steps(case: Case) -> None:
    """Meta-gradient d(theta_3)/d(theta_0), second order through the task gradients, in float64."""
    params0, x, y = make_problem(seed=1)
    keys = (*GROUP_A, *GROUP_B)
    rule = case.rule(**case.smooth)

    def unroll(*leaves: Tensor) -> tuple[Tensor, ...]:
        params = dict(zip(keys, leaves))
        state = rule.init(params)
        for t in range(3):
            grads = grads_of(params, x, y, create_graph=True)
            updates, state = rule.update(grads, state, params, step=t)
            params = apply_updates(params, updates)
        return tuple(params[k] for k in keys)

    inputs = tuple(params0[k].clone().requires_grad_() for k in keys)
    assert torch.autograd.gradcheck(unroll, inputs)


def test_registry_and_names() -> None:
    assert HAND_RULES == {"sgd": SGD, "nag": NAG, "rmsprop": RMSprop, "adam": Adam}
    for name, cls in HAND_RULES.items():
        rule = cls()
        assert rule.name == name
        assert type(rule)(**rule.config()).config() == rule.config()
        assert all(isinstance(v, (bool, float, tuple)) for v in rule.config().values())
        assert list(rule.parameters()) == []


def test_hyperparameters_are_plain_floats() -> None:
    rule = Adam(lr=1, betas=[0, 0], eps=0, weight_decay=0, eps_root=0)
    assert type(rule.lr) is float and rule.betas == (0.0, 0.0) and all(type(b) is float for b in rule.betas)
    assert NAG(lr=1).config() == {"lr": 1.0, "momentum": 0.9, "weight_decay": 0.0}


INVALID = [
    (SGD, dict(lr=0.0), ValueError, "lr"),
    (SGD, dict(lr=-1e-3), ValueError, "lr"),
    (SGD, dict(lr=float("nan")), ValueError, "lr"),
    (SGD, dict(lr="0.1"), TypeError, "lr"),
    (SGD, dict(momentum=-0.1), ValueError, "momentum"),
    (SGD, dict(momentum=1.0), ValueError, "momentum"),
    (SGD, dict(dampening=1.5), ValueError, "dampening"),
    (SGD, dict(weight_decay=-1.0), ValueError, "weight_decay"),
    (SGD, dict(nesterov=1), TypeError, "nesterov"),
    (SGD, dict(nesterov=True), ValueError, "nesterov"),
    (SGD, dict(nesterov=True, momentum=0.9, dampening=0.1), ValueError, "dampening"),
    (NAG, dict(momentum=0.0), ValueError, "momentum"),
    (NAG, dict(lr=-1.0), ValueError, "lr"),
    (RMSprop, dict(alpha=1.0), ValueError, "alpha"),
    (RMSprop, dict(alpha=-0.5), ValueError, "alpha"),
    (RMSprop, dict(eps=-1e-8), ValueError, "eps"),
    (RMSprop, dict(eps_root=-1.0), ValueError, "eps_root"),
    (RMSprop, dict(momentum=2.0), ValueError, "momentum"),
    (RMSprop, dict(centered="yes"), TypeError, "centered"),
    (Adam, dict(lr=0), ValueError, "lr"),
    (Adam, dict(betas=(1.0, 0.999)), ValueError, r"betas\[0\]"),
    (Adam, dict(betas=(0.9, -0.1)), ValueError, r"betas\[1\]"),
    (Adam, dict(betas=(0.9,)), TypeError, "betas"),
    (Adam, dict(betas=0.9), TypeError, "betas"),
    (Adam, dict(eps=float("inf")), ValueError, "eps"),
    (Adam, dict(weight_decay=-0.1), ValueError, "weight_decay"),
    (Adam, dict(eps_root=-1e-9), ValueError, "eps_root"),
]


@pytest.mark.parametrize("cls,kwargs,exc,match", INVALID,
                         ids=[f"{c.__name__}-{'-'.join(k)}-{i}" for i, (c, k, _, _) in enumerate(INVALID)])
def test_invalid_hyperparameters(cls: type[Rule], kwargs: dict[str, Any], exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        cls(**kwargs)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_mismatched_keys_rejected(case: Case) -> None:
    rule = case.rule()
    params = {"a": torch.ones(2, dtype=DTYPE), "b": torch.ones(3, dtype=DTYPE)}
    with pytest.raises(ValueError, match="same keys"):
        rule.update({"a": torch.ones(2, dtype=DTYPE)}, rule.init(params), params, step=0)


def test_nag_equals_sgd_nesterov() -> None:
    gen = torch.Generator().manual_seed(3)
    params = {"w": torch.randn(6, generator=gen, dtype=DTYPE)}
    nag, sgd = NAG(lr=0.1, momentum=0.8, weight_decay=0.01), SGD(lr=0.1, momentum=0.8, nesterov=True, weight_decay=0.01)
    s_nag, s_sgd = nag.init(params), sgd.init(params)
    for t in range(4):
        grads = {"w": torch.randn(6, generator=gen, dtype=DTYPE)}
        u_nag, s_nag = nag.update(grads, s_nag, params, step=t)
        u_sgd, s_sgd = sgd.update(grads, s_sgd, params, step=t)
        assert torch.equal(u_nag["w"], u_sgd["w"])


def test_first_step_closed_forms() -> None:
    """Adam's first step is -lr * g / (|g| + eps); RMSprop's is -lr * g / (sqrt(1 - alpha) |g| + eps)."""
    g = torch.tensor([-3.0, -1e-3, 2e-2, 5.0], dtype=DTYPE)
    p = {"w": torch.zeros(4, dtype=DTYPE)}
    adam = Adam(lr=0.1, betas=(0.5, 0.9), eps=1e-8)
    u, _ = adam.update({"w": g}, adam.init(p), p, step=0)
    torch.testing.assert_close(u["w"], -0.1 * g / (g.abs() + 1e-8), rtol=1e-14, atol=0.0)
    rms = RMSprop(lr=0.1, alpha=0.75, eps=1e-8)
    u, _ = rms.update({"w": g}, rms.init(p), p, step=0)
    torch.testing.assert_close(u["w"], -0.1 * g / (0.5 * g.abs() + 1e-8), rtol=1e-14, atol=0.0)


@pytest.mark.parametrize("name", sorted(HAND_RULES))
def test_eps_root_makes_zero_gradients_differentiable(name: str) -> None:
    """With eps_root > 0, differentiating an update at g == 0 gives finite meta-gradients."""
    kwargs = {"eps_root": 1e-12} if name in ("adam", "rmsprop") else {}
    rule = HAND_RULES[name](**kwargs)
    p = {"w": torch.zeros(3, dtype=DTYPE)}
    g = torch.zeros(3, dtype=DTYPE, requires_grad=True)
    u, _ = rule.update({"w": g}, rule.init(p), p, step=0)
    (d,) = torch.autograd.grad(u["w"].sum(), g)
    assert bool(torch.isfinite(d).all())


@settings(max_examples=15, deadline=None)
@given(
    name=st.sampled_from(sorted(HAND_RULES)),
    shapes=st.lists(st.lists(st.integers(0, 4), max_size=3), min_size=1, max_size=3),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_shapes_and_dtypes(name: str, shapes: list[list[int]], dtype: torch.dtype, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    rule = HAND_RULES[name]()
    params = {f"p{i}": torch.randn(s, generator=gen, dtype=dtype) for i, s in enumerate(shapes)}
    state = rule.init(params)
    for t in range(2):
        grads = {k: torch.randn(v.shape, generator=gen, dtype=dtype) for k, v in params.items()}
        updates, state = rule.update(grads, state, params, step=t)
        assert list(updates) == list(params)
        for k, v in params.items():
            assert updates[k].shape == v.shape and updates[k].dtype == dtype
            assert bool(torch.isfinite(updates[k]).all())
        params = apply_updates(params, updates)


# ------------------------------------------------------- check_rule itself rejects broken rules


class _Broken(Rule):
    """SGD-like rule with one contract violation selected by ``flaw``."""

    name = "broken"

    def __init__(self, flaw: str = "none") -> None:
        super().__init__()
        self.flaw = flaw
        self.calls = 0

    def init(self, params: dict[str, Tensor]) -> Any:
        state = Adam().init(params)
        return tuple(state) if self.flaw == "plain-tuple-state" else state

    def update(self, grads, state, params, *, step, loss=None):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.flaw == "in-place-state":
            for v in state.exp_avg.values():
                v.add_(1.0)
        if self.flaw == "detach":
            grads = {k: g.detach() for k, g in grads.items()}
        updates = {k: -0.1 * g for k, g in grads.items()}
        if self.flaw == "wrong-dtype":
            updates = {k: u.float() for k, u in updates.items()}
        if self.flaw == "impure":
            updates = {k: u * self.calls for k, u in updates.items()}
        if self.flaw == "missing-key":
            updates.pop(next(iter(updates)))
        return updates, state

    def config(self) -> dict[str, Any]:
        return {"flaw": self.flaw}


def test_check_rule_accepts_the_control() -> None:
    check_rule(_Broken("none"))


@pytest.mark.parametrize("flaw", ["in-place-state", "detach", "wrong-dtype", "impure", "missing-key",
                                  "plain-tuple-state"])
def test_check_rule_rejects(flaw: str) -> None:
    with pytest.raises(AssertionError):
        check_rule(_Broken(flaw))
