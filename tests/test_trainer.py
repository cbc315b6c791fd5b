"""Learned-optimizer meta-training: validation, safety, golden numbers, convergence."""

from __future__ import annotations

import math

import pytest
import torch

from l2o import LSTMRule
from l2o.meta import (MetaTrainConfig, MetaTrainingError, compare, loss_curves, lr_grid, meta_train,
                      sample_tasks, tune_lr)
from l2o.rules import Adam
from optimizees.quadratic import QuadraticFamily
from tests.helpers import SometimesNaNFamily, TrivialFamily


def _f64_family(**kw):
    return QuadraticFamily(dtype=torch.float64, **kw)


@pytest.mark.parametrize("field, value, match", [
    ("horizon", 0, "horizon"), ("truncation", -3, "truncation"), ("epochs", 0, "epochs"),
    ("truncation", 200, "truncation .* longer than the horizon"), ("meta_lr", 0.0, "meta_lr"),
    ("meta_lr", float("nan"), "meta_lr"), ("max_grad_norm", -1.0, "max_grad_norm"), ("validate_every", -1, "validate_every"),
    ("tell_total_steps", 1.5, "tell_total_steps"), ("tell_total_steps", -0.1, "tell_total_steps"),
])
def test_bad_config_is_named(field, value, match):
    config = MetaTrainConfig()
    setattr(config, field, value)
    with pytest.raises(ValueError, match=match):
        meta_train(LSTMRule(), QuadraticFamily(), config, progress=False)


def test_rule_without_parameters_is_refused():
    with pytest.raises(ValueError, match="no trainable parameters"):
        meta_train(Adam(), QuadraticFamily(), MetaTrainConfig(epochs=1), progress=False)


def test_tell_total_steps_needs_a_rule_with_total_steps():
    with pytest.raises(ValueError, match="total_steps attribute"):
        meta_train(LSTMRule(), QuadraticFamily(), MetaTrainConfig(epochs=1, tell_total_steps=0.5), progress=False)


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
def test_tell_total_steps_tells_the_rule_each_rounds_horizon(monkeypatch, p):
    """With probability p a round's truncations run with the rule's total_steps = the round's
    horizon, else None; the user's own total_steps is back on the rule afterwards."""
    from l2o import MLPRule
    from l2o.meta.schedules import epoch_horizon, told_total_steps

    rule = MLPRule(instance_dims=1, total_steps=7)
    seen: list[tuple[int, int | None]] = []
    original = MLPRule.update

    def spy(self, grads, state, params, *, step, **kw):
        seen.append((int(step), self.total_steps))
        return original(self, grads, state, params, step=step, **kw)

    monkeypatch.setattr(MLPRule, "update", spy)
    config = MetaTrainConfig(epochs=12, horizon=30, truncation=10, horizon_schedule="log_uniform", min_horizon=10,
                             tell_total_steps=p, validate_every=0)
    meta_train(rule, QuadraticFamily(dim=3, num_functions=4), config, progress=False)
    assert rule.total_steps == 7
    told = [told_total_steps(config, e) for e in range(config.epochs)]
    expected: list[int | None] = []
    for epoch, t in enumerate(told):
        h = epoch_horizon(config, epoch)
        expected += [h if t else (7 if p == 0 else None)] * h
    assert [total for _, total in seen] == expected
    if p == 0.5:
        assert 0 < sum(told) < len(told)
    else:
        assert sum(told) == (len(told) if p == 1 else 0)


def _golden_run():
    torch.manual_seed(0)
    rule = LSTMRule(hidden_size=8).double()
    family = _f64_family(dim=5, num_functions=16)
    config = MetaTrainConfig(epochs=1, horizon=40, truncation=20, meta_lr=1e-2, meta_lr_final=None, validate_every=0)
    losses = []
    result = meta_train(rule, family, config, progress=False, callback=lambda m: losses.append(m["loss"]))
    return result, losses


def test_golden_numbers_of_a_seeded_two_meta_step_run():
    """Regression guard: these numbers were recorded from this seeded float64 run (two meta-steps).

    They change only when the math of the rule, the engine, the quadratic family or the trainer
    changes; if you change any of those on purpose, re-record them and say why in the commit.
    """
    result, losses = _golden_run()
    assert result.meta_steps == 2 and result.skipped_steps == 0
    weights_sum = sum(float(p.detach().sum()) for p in result.rule.parameters())
    assert losses[0] == pytest.approx(GOLDEN_EPOCH_LOSS, rel=1e-9)
    assert weights_sum == pytest.approx(GOLDEN_WEIGHTS_SUM, rel=1e-9)
    again, losses_again = _golden_run()
    assert losses_again == losses  # bitwise repeatable in-process


GOLDEN_EPOCH_LOSS = 771.5599919626527
GOLDEN_WEIGHTS_SUM = 14.783156699975791


def test_non_finite_tasks_are_skipped_and_never_reach_the_meta_params():
    torch.manual_seed(0)
    rule = LSTMRule(hidden_size=6).double()
    family = SometimesNaNFamily(_f64_family(dim=3, num_functions=8), every=2)
    seen = []
    result = meta_train(rule, family, MetaTrainConfig(epochs=6, horizon=10, truncation=5, validate_every=0),
                        progress=False, callback=lambda m: seen.append(m["skipped"]))
    assert result.skipped_steps >= 3
    assert seen[-1] == result.skipped_steps
    assert all(torch.isfinite(p).all() for p in result.rule.parameters())


def test_too_many_consecutive_skips_stop_the_run():
    torch.manual_seed(0)
    rule = LSTMRule(hidden_size=6).double()
    before = [p.detach().clone() for p in rule.parameters()]
    family = SometimesNaNFamily(_f64_family(dim=3, num_functions=8), every=1)
    with pytest.raises(MetaTrainingError, match="consecutive"):
        meta_train(rule, family, MetaTrainConfig(epochs=10, horizon=10, truncation=5, max_consecutive_skips=3,
                                                 validate_every=0), progress=False)
    for a, b in zip(before, rule.parameters()):
        assert torch.equal(a, b), "a skipped meta-step changed the meta-params"


def test_best_validated_weights_are_returned():
    torch.manual_seed(0)
    rule = LSTMRule(hidden_size=6).double()
    result = meta_train(rule, _f64_family(dim=3, num_functions=8),
                        MetaTrainConfig(epochs=6, horizon=10, truncation=5, validate_every=2), progress=False)
    vals = result.history["val_loss"]
    assert len(vals) == 3 and result.best_val_loss == min(vals)
    assert result.best_epoch == result.history["val_epoch"][vals.index(min(vals))]


def test_validation_weighs_the_steps_like_the_meta_loss():
    """validation_loss with weights is the weighted mean of the per-step losses; the trainer's
    validation with step_weights="linear" reads exactly that (not the unweighted mean)."""
    from l2o.meta import validation_loss
    from l2o.meta.schedules import step_weights

    torch.manual_seed(0)
    rule = LSTMRule(hidden_size=6).double()
    family = _f64_family(dim=3, num_functions=8)
    tasks = sample_tasks(family, 2, seed=3)
    per_step = [validation_loss(rule, tasks, 10, 100, weights=[float(k == t) for k in range(10)]) for t in range(10)]
    assert sum(per_step) / 10 == pytest.approx(validation_loss(rule, tasks, 10, 100), rel=1e-12)
    w = [0.2 * t for t in range(1, 11)]
    got = validation_loss(rule, tasks, 10, 100, weights=w)
    assert got == pytest.approx(sum(a * b for a, b in zip(w, per_step)) / sum(w), rel=1e-12)
    assert got != pytest.approx(validation_loss(rule, tasks, 10, 100), rel=1e-6)
    for bad, match in (([1.0] * 9, "one entry per inner step"), ([0.0] * 10, "not all zero"),
                       ([-1.0] + [1.0] * 9, ">= 0")):
        with pytest.raises(ValueError, match=match):
            validation_loss(rule, tasks, 10, 100, weights=bad)
    config = MetaTrainConfig(epochs=2, horizon=10, truncation=5, validate_every=1, step_weights="linear")
    seen = []
    result = meta_train(rule, family, config, progress=False, callback=seen.append)
    assert step_weights(config, 10, 0, 10) == pytest.approx([0.2 * t for t in range(1, 11)])
    assert result.history["val_loss"] == [m["val_loss"] for m in seen if "val_loss" in m]


def test_convergence_on_a_trivial_problem():
    """The paper's code's convergence test: a short meta-training solves ||θ - y||² to 1e-5."""
    torch.manual_seed(0)
    rule = LSTMRule(hidden_size=8).double()
    family = TrivialFamily()
    result = meta_train(rule, family, MetaTrainConfig(epochs=80, horizon=20, truncation=10, meta_lr=3e-2,
                                                      meta_lr_final=1e-3, validate_every=5), progress=False)
    curves = loss_curves(result.rule, sample_tasks(family, 256, seed=5), steps=20, seed=5)
    assert curves[0].mean() > 0.5
    assert curves[-1].max() < 1e-5


def test_lr_grid_and_tuning_pick_the_best():
    grid = lr_grid()
    assert grid[0] == pytest.approx(1e-4) and grid[-1] == pytest.approx(1.0) and len(grid) == 17
    assert all(b / a == pytest.approx(10 ** 0.25) for a, b in zip(grid, grid[1:]))
    tasks = sample_tasks(_f64_family(dim=4, num_functions=16), 16, seed=1)
    best, scores = tune_lr(lambda lr: Adam(lr=lr), tasks, steps=20, lrs=[1e-4, 1e-2, 1.0, 1e3], seed=1)
    assert scores[best] == min(scores.values()) and best != 1e-4
    assert math.isinf(scores[1e3]) or scores[1e3] > scores[best]


def test_compare_report_schema_and_held_out_tasks():
    torch.manual_seed(0)
    rule = LSTMRule(hidden_size=6)
    report = compare(rule, QuadraticFamily(num_functions=8), horizon=5, num_tasks=12, num_tuning_tasks=8,
                     lrs=[1e-3, 1e-2, 1e-1])
    assert report["task"] == "quadratic" and report["horizon"] == 5 and report["num_tasks"] == 12
    assert set(report["results"]) == {"learned", "sgd", "nag", "rmsprop", "adam"}
    assert report["results"]["learned"]["lr"] is None
    for name, r in report["results"].items():
        assert len(r["curve"]) == 6 and r["final_loss_mean"] == pytest.approx(r["curve"][-1])
        assert name == "learned" or r["lr"] in (1e-3, 1e-2, 1e-1)
        if name != "adam":
            assert r["vs_adam"] == pytest.approx(r["final_loss_mean"] / report["results"]["adam"]["final_loss_mean"])
            lo, hi = r["vs_adam_ci90"]
            assert lo <= hi and lo < r["vs_adam"] * 1.2 and hi > r["vs_adam"] / 1.2
    assert "vs_adam" not in report["results"]["adam"]
    with pytest.raises(ValueError, match="differ"):
        compare(rule, QuadraticFamily(), tuning_seed=1, eval_seed=1)


def test_ratio_interval_is_a_paired_bootstrap():
    """Identical losses give exactly 1; a uniform factor survives every resample (pairing); a heavy
    tail widens the interval around the ratio; bad input is refused."""
    from l2o.meta.evaluate import ratio_interval

    gen = torch.Generator().manual_seed(0)
    ref = torch.rand(500, generator=gen) + 0.1
    assert ratio_interval(ref, ref.clone()) == pytest.approx((1.0, 1.0))
    assert ratio_interval(0.5 * ref, ref) == pytest.approx((0.5, 0.5))
    noisy = ref * (0.5 + 0.2 * torch.randn(500, generator=gen)).abs()
    lo, hi = ratio_interval(noisy, ref)
    point = float(noisy.mean() / ref.mean())
    assert lo < point < hi and hi - lo < 0.1
    tail = noisy.clone()
    tail[:3] *= 200.0  # a few instances far out: an unstable mean
    lo_t, hi_t = ratio_interval(tail, ref)
    assert hi_t - lo_t > 5 * (hi - lo)
    assert ratio_interval(tail, ref, seed=1) != (lo_t, hi_t)  # a different bootstrap draw
    with pytest.raises(ValueError, match="same length"):
        ratio_interval(ref, ref[:10])
    with pytest.raises(ValueError, match="level"):
        ratio_interval(ref, ref, level=1.5)


@pytest.mark.slow
def test_short_meta_training_beats_tuned_adam_on_held_out_quadratics():
    torch.manual_seed(0)
    rule = LSTMRule()
    result = meta_train(rule, QuadraticFamily(), MetaTrainConfig(epochs=300), progress=False)
    report = compare(result.rule, QuadraticFamily(), horizon=100, num_tasks=1000, baselines=("adam",))
    assert report["results"]["learned"]["final_loss_mean"] < report["results"]["adam"]["final_loss_mean"]
