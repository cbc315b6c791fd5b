"""The quadratic task family (paper §3.1)."""

from __future__ import annotations

import pytest
import torch

from l2o.unroll import loss_and_grads
from optimizees.quadratic import QuadraticFamily, QuadraticTask
from tests.conformance import check_task


def test_conformance():
    check_task(QuadraticFamily().sample(torch.Generator().manual_seed(0)))


def test_loss_and_per_function_gradients():
    task = QuadraticFamily(dim=4, num_functions=3, dtype=torch.float64).sample(torch.Generator().manual_seed(1))
    theta = torch.randn(3, 4, dtype=torch.float64)
    loss, grads = loss_and_grads(task, {"theta": theta}, None)
    for b in range(3):
        r = task.W[b] @ theta[b] - task.y[b]
        assert loss[b].item() == pytest.approx(float(r @ r), rel=1e-12)
        torch.testing.assert_close(grads["theta"][b], 2 * task.W[b].T @ r)


def test_seeded_sampling_is_reproducible_and_gaussian():
    fam = QuadraticFamily(num_functions=4000)
    a, b = fam.sample(torch.Generator().manual_seed(3)), fam.sample(torch.Generator().manual_seed(3))
    assert torch.equal(a.W, b.W) and torch.equal(a.y, b.y)
    assert a.W.shape == (4000, 10, 10) and a.y.shape == (4000, 10)
    assert abs(a.W.mean().item()) < 0.01 and abs(a.W.std().item() - 1) < 0.01
    theta = a.init(torch.Generator().manual_seed(0))["theta"]
    assert theta.shape == (4000, 10) and abs(theta.std().item() - 0.01) < 0.001


@pytest.mark.parametrize("kw", [dict(dim=0), dict(num_functions=-1), dict(dim=2.5), dict(init_std=-1.0)])
def test_bad_arguments(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        QuadraticFamily(**kw)


def test_bad_shapes():
    with pytest.raises(ValueError, match="shape"):
        QuadraticTask(torch.zeros(2, 3, 4), torch.zeros(2, 3))
