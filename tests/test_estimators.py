"""Gradient estimators (truncated backprop, ES, PES) and horizon schedules of the meta-trainer."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from l2o import LSTMRule
from l2o.checkpoints import load_training_state
from l2o.meta import MetaTrainConfig, meta_train
from l2o.meta.estimators import AntitheticES, PersistentES, SegmentContext, TruncatedBackprop
from l2o.meta.schedules import epoch_horizon, num_segments, task_generator
from l2o.meta.slots import TaskSlot
from l2o.rules.base import Rule
from l2o.tasks import TRAIN
from l2o.unroll import init_inner, unroll
from optimizees.quadratic import QuadraticFamily
from tests.helpers import record_training_states

F64 = torch.float64


class _LogLRSGD(Rule):
    """SGD whose log learning rate is the one meta-param: u = -exp(log_lr) g."""

    name = "test-log-lr-sgd"

    def __init__(self, lr: float) -> None:
        super().__init__()
        self.log_lr = nn.Parameter(torch.tensor(math.log(lr), dtype=F64))

    def init(self, params):
        return ()

    def update(self, grads, state, params, *, step, loss=None):
        return {k: -self.log_lr.exp() * g for k, g in grads.items()}, state

    def config(self):
        return {"lr": float(self.log_lr.exp())}


class _Quadratic:
    """f(θ) = ½ Σ_i a_i θ_i², deterministic (no batches): the meta-loss is a function of Φ alone."""

    def __init__(self) -> None:
        self.a = torch.tensor([1.0, 3.0], dtype=F64)

    def init(self, generator):
        return {"x": torch.tensor([1.0, -1.0], dtype=F64)}

    def sample_batch(self, split, generator):
        return None

    def loss(self, params, batch):
        return 0.5 * (self.a * params["x"] ** 2).sum()

    def loss_and_grads(self, params, batch):  # closed form (what autograd gives), for speed
        return self.loss(params, batch), {"x": self.a * params["x"]}


HORIZON, TRUNCATION = 12, 3


def _exact_full_unroll_gradient(rule: _LogLRSGD) -> float:
    """d/dΦ of Σ_{t=1..H} f(θ_t) through the whole horizon (second order: the exact derivative)."""
    task = _Quadratic()
    rule.zero_grad()
    gen = torch.Generator().manual_seed(0)
    result = unroll(rule, task, init_inner(rule, task, gen), steps=HORIZON, generator=gen, second_order=True)
    result.meta_loss.backward()
    return float(rule.log_lr.grad)


def _horizon_estimates(estimator, rule: _LogLRSGD, runs: int, *, second_order: bool = False) -> torch.Tensor:
    """Per run, the sum over the horizon's truncations of the estimator's meta-gradient (Φ fixed)."""
    task = _Quadratic()
    ctx = SegmentContext(rule, [rule.log_lr], 1, TRAIN, second_order, "loss", 0.01)
    out = []
    for run in range(runs):
        g = task_generator(11, run)
        slot = TaskSlot(run, task, g, init_inner(rule, task, g))
        slot.extra = estimator.start(slot, [rule.log_lr])
        total = 0.0
        for _ in range(HORIZON // TRUNCATION):
            rule.zero_grad(set_to_none=True)
            result = estimator.segment(ctx, [slot], TRUNCATION, None)
            assert result.finite
            total += float(rule.log_lr.grad)
            slot.inner, slot.extra = result.states[0]
        out.append(total)
    return torch.tensor(out, dtype=F64)


def test_pes_is_unbiased_for_the_full_unroll_gradient_and_truncated_backprop_is_not():
    """On a problem whose full-unroll meta-gradient is exact
    (SGD with a meta-learned rate on a fixed quadratic, 12 steps cut into 4 truncations of 3), the
    mean of PES's summed estimates over many runs matches it within its standard error, while
    truncated backprop (exact within each truncation, second order) is off by far more, and so is
    truncated ES (which also restarts both particles from one state every truncation)."""
    rule = _LogLRSGD(0.05)
    exact = _exact_full_unroll_gradient(rule)
    pes = _horizon_estimates(PersistentES(), rule, 1000)
    mean, se = float(pes.mean()), float(pes.std() / math.sqrt(len(pes)))
    assert se < 0.05 * abs(exact)  # the check below is informative
    assert abs(mean - exact) < 4 * se, (mean, exact, se)
    tbptt = float(_horizon_estimates(TruncatedBackprop(), rule, 1, second_order=True)[0])  # deterministic
    assert abs(tbptt - exact) > 0.3 * abs(exact), (tbptt, exact)
    es = _horizon_estimates(AntitheticES(), rule, 300)
    assert abs(float(es.mean()) - exact) > 10 * float(es.std() / math.sqrt(len(es))), (float(es.mean()), exact)


def test_es_matches_the_truncation_gradient_it_estimates():
    """Truncated ES on one truncation from the start is unbiased for that truncation's gradient."""
    rule = _LogLRSGD(0.05)
    task = _Quadratic()
    gen = torch.Generator().manual_seed(0)
    result = unroll(rule, task, init_inner(rule, task, gen), steps=TRUNCATION, generator=gen, second_order=True)
    (exact,) = torch.autograd.grad(result.meta_loss, [rule.log_lr])
    ctx = SegmentContext(rule, [rule.log_lr], 1, TRAIN, False, "loss", 0.01)
    estimates = []
    for run in range(500):
        g = task_generator(5, run)
        slot = TaskSlot(run, task, g, init_inner(rule, task, g))
        rule.zero_grad(set_to_none=True)
        AntitheticES().segment(ctx, [slot], TRUNCATION, None)
        estimates.append(float(rule.log_lr.grad))
    est = torch.tensor(estimates, dtype=F64)
    assert abs(float(est.mean()) - float(exact)) < 4 * float(est.std()) / math.sqrt(len(est))


def test_perturbations_leave_the_meta_params_exactly_as_they_were():
    torch.manual_seed(0)
    rule = LSTMRule(hidden_size=4).double()
    before = {k: v.clone() for k, v in rule.state_dict().items()}
    family = QuadraticFamily(dim=3, num_functions=4, dtype=F64)
    params = [p for p in rule.parameters()]
    ctx = SegmentContext(rule, params, 1, TRAIN, False, "loss", 0.1)
    g = task_generator(0, 0)
    task = family.sample(g)
    slot = TaskSlot(0, task, g, init_inner(rule, task, g))
    slot.extra = PersistentES().start(slot, params)
    result = PersistentES().segment(ctx, [slot], 4, None)
    assert result.finite and all(torch.equal(before[k], v) for k, v in rule.state_dict().items())
    assert all(p.grad is not None and bool(p.grad.ne(0).any()) for p in params)  # every meta-param moved
    inner, extra = result.states[0]
    assert inner.step == extra["neg"].step == 4  # the two particles ran apart
    assert not torch.equal(inner.params["theta"], extra["neg"].params["theta"])


@pytest.mark.parametrize("estimator", ["es", "pes"])
def test_es_and_pes_meta_train_an_lstm_rule(estimator):
    """A short ES/PES run lowers the validation meta-loss of an untrained LSTM rule."""
    torch.manual_seed(0)
    rule = LSTMRule(hidden_size=8, output_scale=0.1)
    family = QuadraticFamily(dim=5, num_functions=16)
    config = MetaTrainConfig(epochs=15, horizon=20, truncation=10, estimator=estimator, es_std=0.05, tasks_per_step=4,
                             meta_lr=3e-2, validate_every=0, seed=1)
    from l2o.meta import validation_loss, sample_tasks

    tasks = sample_tasks(family, 4, seed=99)
    before = validation_loss(rule, tasks, 20, 0)
    result = meta_train(rule, family, config, progress=False)
    assert result.skipped_steps == 0 and result.meta_steps == 15 * 2
    after = validation_loss(rule, tasks, 20, 0)
    assert after < 0.8 * before, (before, after)


def test_log_uniform_horizons_are_drawn_per_round_within_bounds():
    config = MetaTrainConfig(epochs=200, horizon=400, truncation=10, horizon_schedule="log_uniform", min_horizon=20)
    horizons = [epoch_horizon(config, e) for e in range(200)]
    assert min(horizons) >= 20 and max(horizons) <= 400
    assert horizons == [epoch_horizon(config, e) for e in range(200)]  # a function of (seed, epoch) alone
    assert len(set(horizons)) > 50
    logs = torch.tensor(horizons, dtype=F64).log()
    # log-uniform: the median horizon is near the geometric mean of the bounds, not the arithmetic one
    assert abs(float(logs.median()) - 0.5 * (math.log(20) + math.log(400))) < 0.3
    assert epoch_horizon(MetaTrainConfig(horizon=100), 7) == 100
    assert num_segments(config, 95) == 10


def test_a_log_uniform_pes_run_resumes_bitwise_from_every_meta_step(tmp_path, monkeypatch):
    """PES keeps per-task state (the negative particle, the accumulated perturbation) in the
    training state; with log-uniform horizons a run resumed from any meta-step, mid-horizon
    included, ends bitwise where the uninterrupted run does."""
    config = MetaTrainConfig(epochs=4, horizon=12, truncation=3, horizon_schedule="log_uniform", min_horizon=4,
                             estimator="pes", es_std=0.05, tasks_per_step=2, validate_every=2, seed=2)

    def rule():
        torch.manual_seed(0)
        return LSTMRule(hidden_size=4)

    family = QuadraticFamily(dim=3, num_functions=4)
    states = record_training_states(monkeypatch, tmp_path)
    full = meta_train(rule(), family, config, progress=False, checkpoint_path=tmp_path / "run.pt", checkpoint_every=1)
    assert sorted(states) == list(range(1, full.meta_steps + 1))
    mid = [k for k, p in states.items() if load_training_state(p)["current"] is not None]
    assert mid and "neg" in load_training_state(states[mid[0]])["current"]["tasks"][0]["extra"]
    for k in sorted(states)[:-1]:
        resumed = meta_train(rule(), family, config, progress=False, resume=states[k])
        assert resumed.resumed_at == k and resumed.history == full.history
        assert all(torch.equal(a, b) for a, b in zip(full.rule.state_dict().values(),
                                                     resumed.rule.state_dict().values())), k


@pytest.mark.parametrize("kw, match", [
    (dict(estimator="adam"), "estimator must be one of"),
    (dict(estimator="es", second_order=True), "second_order .* only estimator='tbptt'"),
    (dict(es_std=0.0), "es_std must be a positive number"),
    (dict(horizon_schedule="cosine"), "horizon_schedule must be one of"),
    (dict(min_horizon=5), "min_horizon is the shortest horizon of horizon_schedule='log_uniform'"),
    (dict(horizon_schedule="log_uniform", min_horizon=500), r"min_horizon \(500\) must not be longer"),
])
def test_bad_estimator_and_schedule_settings_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        MetaTrainConfig(**kw).validate()
