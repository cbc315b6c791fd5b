"""Small task families shared by the tests."""

from __future__ import annotations

import torch

from optimizees.quadratic import QuadraticTask


class TrivialFamily:
    """Well-conditioned quadratics f(θ) = ||θ - y||² (identity W): the convergence-test problem."""

    name = "trivial"

    def __init__(self, num_functions: int = 32, dim: int = 2) -> None:
        self.num_functions, self.dim = num_functions, dim

    def sample(self, generator: torch.Generator) -> QuadraticTask:
        y = torch.randn(self.num_functions, self.dim, generator=generator, dtype=torch.float64)
        eye = torch.eye(self.dim, dtype=torch.float64).expand(self.num_functions, self.dim, self.dim).contiguous()
        return QuadraticTask(eye, y)


class NaNTask(QuadraticTask):
    """A quadratic whose loss becomes NaN (an exploding optimizee) once |θ| grows past ``limit``."""

    def __init__(self, W, y, limit: float) -> None:
        super().__init__(W, y)
        self.limit = limit

    def loss(self, params, batch=None):
        out = super().loss(params, batch)
        return out * torch.where(params["theta"].abs().amax(-1) > self.limit, float("nan"), 1.0)


class SometimesNaNFamily:
    """Every ``every``-th sampled task turns NaN after a few inner steps."""

    name = "sometimes-nan"

    def __init__(self, base, every: int) -> None:
        self.base, self.every, self.count = base, every, 0

    def sample(self, generator: torch.Generator) -> QuadraticTask:
        task = self.base.sample(generator)
        self.count += 1
        if self.count % self.every == 0:
            return NaNTask(task.W, task.y, limit=1e-3)
        return task
