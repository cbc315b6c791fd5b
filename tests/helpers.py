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


class RandomNaNFamily:
    """Like :class:`SometimesNaNFamily`, but whether a task turns NaN is drawn from the generator
    (with probability ``p``), so ``sample`` depends on the generator alone: a resumed run redraws
    exactly the same tasks."""

    name = "random-nan"

    def __init__(self, base, p: float, limit: float = 1e-3) -> None:
        self.base, self.p, self.limit = base, p, limit

    def sample(self, generator: torch.Generator) -> QuadraticTask:
        task = self.base.sample(generator)
        if float(torch.rand((), generator=generator)) < self.p:
            return NaNTask(task.W, task.y, limit=self.limit)
        return task


class NaNAfterFamily:
    """The first ``good`` tasks are ordinary; every later one turns NaN after a few inner steps."""

    name = "nan-after"

    def __init__(self, base, good: int) -> None:
        self.base, self.good, self.count = base, good, 0

    def sample(self, generator: torch.Generator) -> QuadraticTask:
        task = self.base.sample(generator)
        self.count += 1
        return task if self.count <= self.good else NaNTask(task.W, task.y, limit=1e-3)


def hand_maml_query_loss(model, task, steps: int, lr: float, first_order: bool = False):
    """MAML written out for a batched sine task: each task adapted alone with ``steps`` SGD steps
    on its support points (``torch.autograd.grad``), then the mean of the tasks' query MSEs."""
    from torch.func import functional_call

    names = [n for n, _ in model.named_parameters()]
    total = 0.0
    for b in range(task.num_tasks):
        (xs, ys), (xq, yq) = (task.support[0][b], task.support[1][b]), (task.query[0][b], task.query[1][b])
        params = dict(model.named_parameters())
        for _ in range(steps):
            loss = ((functional_call(model, params, (xs,)) - ys) ** 2).mean()
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=not first_order)
            params = {n: p - lr * (g.detach() if first_order else g) for n, p, g in zip(names, params.values(), grads)}
        total = total + ((functional_call(model, params, (xq,)) - yq) ** 2).mean()
    return total / task.num_tasks


def record_training_states(monkeypatch, directory):
    """Keep a copy of every training state meta_train writes, by meta-step: ``{meta_step: path}``."""
    import shutil

    from l2o.meta import trainer as trainer_module

    states = {}
    real = trainer_module.save_training_state

    def spy(path, state):
        out = real(path, state)
        step = state["counters"]["meta_step"]
        states[step] = shutil.copy(path, directory / f"step{step}.pt")
        return out

    monkeypatch.setattr(trainer_module, "save_training_state", spy)
    return states


def trained_mlp_rule(seed: int = 0, **kw):
    """An ``l2o.MLPRule`` whose output layer is not zero (as after meta-training), so every weight
    matters; biases off zero too, so no ReLU sits exactly at its kink for an all-zero input."""
    from l2o import MLPRule

    torch.manual_seed(seed)
    rule = MLPRule(**kw)
    with torch.no_grad():
        rule.input_bias.normal_(0.0, 0.1)
        for bias in rule.hidden_biases:
            bias.normal_(0.0, 0.1)
        rule.out_weight.normal_(0.0, 0.5)
        rule.out_bias.normal_(0.0, 0.3)
        rule.log_lr_offset.fill_(0.2)
    return rule
