"""Task families built from a user's nn.Module factory and a batch sampler, and task mixtures."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import l2o
from l2o.families import ModuleFamily, TaskMixture
from l2o.meta import MetaTrainConfig, meta_train
from l2o.tasks import META, TRAIN
from tests.conformance import check_task
from tests.helpers import record_training_states


def _model(g: torch.Generator) -> nn.Module:
    width = int(torch.randint(4, 9, (), generator=g))  # the architecture drawn from the generator
    return nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, 1))


def _batches(split: str, g: torch.Generator):
    x = torch.randn(16 if split == TRAIN else 64, 3, generator=g)
    return x, x.sum(1, keepdim=True) ** 2


def _family(**kw) -> ModuleFamily:
    return ModuleFamily(_model, _batches, F.mse_loss, name="toy", **kw)


def test_tasks_are_reproducible_from_the_generator_alone():
    a = _family().sample(torch.Generator().manual_seed(3))
    b = _family().sample(torch.Generator().manual_seed(3))
    c = _family().sample(torch.Generator().manual_seed(4))
    pa, pb = a.init(torch.Generator()), b.init(torch.Generator())
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    assert any(pa[k].shape != v.shape or not torch.equal(pa[k], v) for k, v in c.init(torch.Generator()).items())
    state = torch.get_rng_state()
    _family().sample(torch.Generator().manual_seed(3))
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is left as it was


def test_loss_is_the_modules_loss_and_the_task_conforms():
    task = _family().sample(torch.Generator().manual_seed(0))
    x, y = _batches(TRAIN, torch.Generator().manual_seed(1))
    params = task.init(torch.Generator())
    model = task.model
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(params[name])
    assert torch.equal(task.loss(params, (x, y)), F.mse_loss(model(x), y))
    check_task(task)


def test_init_scale_multiplies_the_initial_params_and_can_be_drawn_per_task():
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    base = _family().sample(g()).init(torch.Generator())
    scaled = _family(init_scale=3.0).sample(g()).init(torch.Generator())
    assert all(torch.allclose(scaled[k], 3.0 * base[k]) for k in base)
    ratios = set()
    for seed in range(20):
        one = _family().sample(torch.Generator().manual_seed(seed)).init(torch.Generator())
        drawn = _family(init_scale=(0.1, 10.0)).sample(torch.Generator().manual_seed(seed)).init(torch.Generator())
        k = next(iter(one))
        r = float(drawn[k].flatten()[0] / one[k].flatten()[0])
        assert 0.1 <= r <= 10.0
        ratios.add(round(r, 6))
    assert len(ratios) > 10


def test_meta_train_on_a_module_family_resumes_bitwise(tmp_path, monkeypatch):
    config = MetaTrainConfig(epochs=3, horizon=6, truncation=3, validate_every=0, seed=1)

    def rule():
        torch.manual_seed(0)
        return l2o.LSTMRule(hidden_size=4, output_scale=0.01)

    states = record_training_states(monkeypatch, tmp_path)
    full = meta_train(rule(), _family(), config, progress=False, checkpoint_path=tmp_path / "s.pt", checkpoint_every=1)
    assert full.skipped_steps == 0 and len(full.history["epoch_loss"]) == 3 and len(states) == 6
    for k in (1, 3):  # mid-horizon and at a round's end
        resumed = meta_train(rule(), _family(), config, progress=False, resume=states[k])
        assert resumed.history == full.history
        assert all(torch.equal(a, b) for a, b in zip(full.rule.state_dict().values(), resumed.rule.state_dict().values()))


def test_a_mixture_draws_every_family_by_weight_and_reproducibly():
    quad = l2o.families.ModuleFamily(lambda g: nn.Linear(2, 1), lambda s, g: (torch.randn(4, 2, generator=g),
                                                                             torch.zeros(4, 1)), F.mse_loss,
                                     name="linear")
    mix = TaskMixture({"toy": _family(), "linear": quad}, weights=[3.0, 1.0])
    kinds = [len(mix.sample(torch.Generator().manual_seed(s)).init(torch.Generator())) for s in range(400)]
    share = kinds.count(4) / len(kinds)  # the toy MLP has 4 tensors, the linear model 2
    assert 0.68 < share < 0.82
    again = [len(mix.sample(torch.Generator().manual_seed(s)).init(torch.Generator())) for s in range(400)]
    assert kinds == again
    assert [f["name"] for f in mix.config()["families"]] == ["toy", "linear"] and mix.config()["weights"] == [3.0, 1.0]


@pytest.mark.parametrize("make, error, match", [
    (lambda: ModuleFamily(3, _batches), TypeError, "model_fn must be callable"),
    (lambda: ModuleFamily(_model, _batches, init_scale=0.0), ValueError, "init_scale"),
    (lambda: ModuleFamily(_model, _batches, init_scale=(1.0, 2.0, 3.0)), ValueError, "a pair"),
    (lambda: ModuleFamily(lambda g: 5, _batches).sample(torch.Generator()), TypeError, "must return an nn.Module"),
    (lambda: ModuleFamily(lambda g: nn.ReLU(), _batches).sample(torch.Generator()), ValueError, "no parameters"),
    (lambda: TaskMixture([]), ValueError, "at least one family"),
    (lambda: TaskMixture([object()]), TypeError, r"families\[0\] must be a task family"),
    (lambda: TaskMixture([_family()], weights=[1.0, 2.0]), ValueError, "weights must be 1 numbers"),
])
def test_bad_arguments_are_named(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_a_scalar_loss_is_required():
    fam = ModuleFamily(_model, _batches, lambda out, y: (out - y) ** 2)
    task = fam.sample(torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="loss_fn must return a scalar tensor"):
        task.loss(task.init(torch.Generator()), _batches(META, torch.Generator()))
