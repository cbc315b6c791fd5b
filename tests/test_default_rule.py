"""The shipped ``"generalist-bounded"`` rule as the default of ``l2o.LearnedOptimizer(params)``: what it is,
its state size, ``total_steps=``, and that it trains an ordinary model."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import l2o
from l2o.optim import DEFAULT_PRETRAINED


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.LayerNorm(32), nn.Linear(32, 3))


def _data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 12, generator=gen)
    y = (x[:, :3] * 2 - x[:, 3:6]).argmax(1)
    return x, y


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> list[float]:
    x, y = _data()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_the_default_is_the_shipped_generalist_with_its_step_bound():
    assert DEFAULT_PRETRAINED == "generalist-bounded"
    assert DEFAULT_PRETRAINED in [e["name"] for e in l2o.list_pretrained()]
    opt = l2o.LearnedOptimizer(_model().parameters())
    shipped = l2o.load_pretrained(DEFAULT_PRETRAINED)
    assert isinstance(opt.rule, l2o.MLPRule) and opt.rule.instance_dims == 0 and opt.rule.total_steps is None
    assert opt.rule.max_step_ratio == 2.0
    for a, b in zip(opt.rule.state_dict().values(), shipped.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    entry = next(e for e in l2o.list_pretrained() if e["name"] == DEFAULT_PRETRAINED)
    assert entry["task"] == "generalist"


def test_the_default_is_the_meta_trained_generalist_plus_the_bound_as_its_index_says(tmp_path):
    """The default holds "generalist"'s meta-params unchanged; only the bound is added, and the
    recipe its index entry records rebuilds it exactly."""
    bounded, plain = l2o.load_pretrained("generalist-bounded"), l2o.load_pretrained("generalist")
    assert bounded.config() == {**plain.config(), "max_step_ratio": 2.0}
    for (ka, a), (kb, b) in zip(bounded.state_dict().items(), plain.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(a, b)
    entries = {e["name"]: e for e in l2o.list_pretrained()}
    assert entries["generalist"]["command"].startswith("l2o meta-train --task generalist")
    recipe = entries["generalist-bounded"]["command"]
    assert recipe.startswith('python -c "') and entries["generalist"]["sha256"] in recipe
    code = recipe[len('python -c "'):recipe.index('"   (')]
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, timeout=120)
    rebuilt = l2o.load_rule(tmp_path / entries["generalist-bounded"]["file"])
    assert rebuilt.config() == entries["generalist-bounded"]["config"]
    for a, b in zip(rebuilt.state_dict().values(), bounded.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_the_default_keeps_four_floats_per_parameter_plus_factored_vectors():
    model = _model()
    opt = l2o.LearnedOptimizer(model.parameters())
    _train(model, opt, 1)
    numel = sum(p.numel() for p in model.parameters())
    factored = sum(p.shape[0] + p[0].numel() for p in model.parameters() if p.dim() >= 2)
    floats = sum(t.numel() for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
    assert floats == 4 * numel + factored


def test_the_default_trains_a_model_better_than_its_start_and_writes_no_nan():
    model = _model()
    losses = _train(model, l2o.LearnedOptimizer(model.parameters()), 150)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < 0.5 * losses[0]


def test_total_steps_reaches_the_rule_and_changes_its_steps():
    runs = {}
    for total in (None, 150):
        model = _model()
        opt = l2o.LearnedOptimizer(model.parameters(), total_steps=total)
        assert opt.rule.total_steps == total
        _train(model, opt, 20)
        runs[total] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert not torch.equal(runs[None], runs[150])  # the meta-trained rule reads the fraction done
    # the state dict round trip keeps the rule's setting (it is the optimizer's, not the state's)
    model = _model()
    opt = l2o.LearnedOptimizer(model.parameters(), total_steps=150)
    _train(model, opt, 3)
    again = l2o.LearnedOptimizer(model.parameters(), total_steps=150)
    again.load_state_dict(opt.state_dict())
    assert again.rule.total_steps == 150


@pytest.mark.parametrize("bad", [0, -5, 2.5, True, "100"])
def test_bad_total_steps_is_refused(bad):
    with pytest.raises(ValueError, match="total_steps must be a positive integer"):
        l2o.LearnedOptimizer(_model().parameters(), total_steps=bad)


def test_total_steps_is_refused_by_rules_without_progress_inputs():
    with pytest.raises(TypeError, match="total_steps.*Adam has none"):
        l2o.LearnedOptimizer(_model().parameters(), rule=l2o.Adam(), total_steps=100)
