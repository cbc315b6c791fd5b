r"""Sine-wave regression (Finn et al. 2017, §5.1): the few-shot task family of MAML.

A task is :math:`y = A \sin(x - \varphi)` with amplitude :math:`A \sim U[0.1, 5]`, phase
:math:`\varphi \sim U[0, \pi]` and inputs :math:`x \sim U[-5, 5]`; it gives ``shots`` (K) support
points to adapt on (split :data:`~l2o.tasks.TRAIN`) and ``query_shots`` separate query points for
the meta-loss (split :data:`~l2o.tasks.META`). The regressor is the paper's 1→40→40→1 ReLU MLP
(:class:`SineMLP`) and the loss of task :math:`b` is the mean squared error on its points,

.. math:: f_b(\theta_b) = \frac1K \sum_{i=1}^K \big(h_{\theta_b}(x_{b,i}) - y_{b,i}\big)^2 .

A :class:`SineTask` holds a whole meta-batch of ``B`` tasks as one batched task (as
:class:`~optimizees.quadratic.QuadraticTask` holds many quadratics): its params carry a leading task
dimension ``(B, *shape)`` and ``loss`` returns the ``(B,)`` vector of per-task MSEs, computed with
``torch.func.vmap`` over ``torch.func.functional_call`` of one shared :class:`SineMLP` (no Python
loop over tasks). The data is fixed per task (few-shot): every inner step sees the same K points.

MAML on a family (the trainer does this)::

    init = l2o.MAMLInit(family.model())                  # θ0, shared by all tasks
    task = family.sample(gen)                            # 25 sine tasks
    inner = l2o.init_inner(rule, task, gen, params=init.expand(task.num_tasks))
    res = l2o.unroll(rule, task, inner, steps=1, generator=gen, weights=[1.0], meta_split=META,
                     second_order=True)
    res.meta_loss.backward()                             # mean query MSE after one step

The paper's baseline, a network pretrained on all tasks jointly and then fine-tuned on the K
support points, is :func:`pretrain_jointly` + :func:`l2o.adaptation.adaptation_curve`.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from l2o.adaptation import adaptation_curve
from l2o.rules.hand import SGD
from l2o.tasks import support_or_query
from l2o.tree import Params
from l2o.validation import check_float_dtype, check_hyperparameter, check_positive_int, is_number

__all__ = [
    "SineMLP",
    "SineTask",
    "SineFamily",
    "EVAL_SEED",
    "pretrain_jointly",
    "fine_tune_curve",
]

#: Seed of the fixed held-out evaluation tasks (:meth:`SineFamily.evaluation_tasks`).
EVAL_SEED = 20170703


class SineMLP(nn.Module):
    r"""The paper's regressor: 1 → 40 → 40 → 1 with ReLU (``hidden`` sets the widths).

    Params are keyed ``net.0.weight``, ``net.0.bias``, ``net.2.weight``, ... (``named_parameters``).
    Input ``(..., 1)``, output ``(..., 1)``.
    """

    def __init__(self, hidden: Sequence[int] = (40, 40), dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.hidden = _check_widths("hidden", hidden)
        check_float_dtype("dtype", dtype)
        layers: list[nn.Module] = []
        n_in = 1
        for h in self.hidden:
            layers += [nn.Linear(n_in, h, dtype=dtype), nn.ReLU()]
            n_in = h
        layers.append(nn.Linear(n_in, 1, dtype=dtype))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def params(self) -> Params:
        """The module's parameters as a params dict (the live ``nn.Parameter`` objects, not copies)."""
        return dict(self.named_parameters())

    def forward_batched(self, params: Params, x: Tensor) -> Tensor:
        r"""``B`` networks at once: params ``(B, *shape)`` (keys as :meth:`params`), ``x (B, P, 1)``
        → ``(B, P, 1)``. Each layer is one batched product,
        :math:`h \leftarrow \operatorname{relu}(h W_b^\top + b_b)`, which is what
        ``vmap(functional_call)`` computes, without its per-call overhead (2x faster MAML
        meta-iterations on sine, ``benchmarks/maml_sine.py --speed``)."""
        h = x
        for i, layer in enumerate(self.net):
            if isinstance(layer, nn.Linear):
                h = torch.baddbmm(params[f"net.{i}.bias"].unsqueeze(1), h, params[f"net.{i}.weight"].transpose(1, 2))
            else:
                h = torch.relu(h)
        return h

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        r"""Re-initialise the module's own parameters as a starting θ0 for MAML: Glorot-normal
        weights, :math:`\mathcal N(0, 2/(fan_{in} + fan_{out}))`, and zero biases.

        (Measured on sine regression, 2000 meta-iterations: 0.68 held-out MSE after one step from
        this start, 0.86 from ``nn.Linear``'s default and 1.37 from the MAML code's N(0, 0.01²).)
        """
        with torch.no_grad():
            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    std = math.sqrt(2.0 / (layer.in_features + layer.out_features))
                    layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator, dtype=layer.weight.dtype) * std)
                    layer.bias.zero_()

    def init_params(self, generator: torch.Generator, batch_size: int | None = None) -> Params:
        r"""Fresh params drawn from ``generator`` like ``nn.Linear``'s default initialisation.

        Every weight and bias of a layer with ``fan_in`` inputs is :math:`U[-1/\sqrt{fan_{in}},
        1/\sqrt{fan_{in}}]`. With ``batch_size`` ``B`` each tensor is ``(B, *shape)`` and the ``B``
        networks are drawn independently.
        """
        lead = () if batch_size is None else (check_positive_int("batch_size", batch_size),)
        out: Params = {}
        for name, p in self.named_parameters():
            layer = self.net[int(name.split(".")[1])]
            bound = 1.0 / math.sqrt(layer.in_features)
            u = torch.rand(lead + tuple(p.shape), generator=generator, dtype=p.dtype)
            out[name] = (u * 2.0 - 1.0) * bound
        return out


class SineTask:
    r"""``B`` sine-regression tasks with fixed support and query points (one batched task).

    Args:
        model: the shared regressor architecture (its own parameters are never used: params are
            passed functionally).
        support: ``(x, y)``, each ``(B, K, 1)``: the data of every inner step (split ``TRAIN``).
        query: ``(x, y)``, each ``(B, Q, 1)``: the meta-loss data (split ``META``).
        amplitude, phase: ``(B,)``, kept for plotting and inspection.
    """

    def __init__(self, model: SineMLP, support: tuple[Tensor, Tensor], query: tuple[Tensor, Tensor],
                 amplitude: Tensor, phase: Tensor) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module (a SineMLP), got {type(model).__name__}")
        for what, pair in (("support", support), ("query", query)):
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(t, Tensor) for t in pair)):
                raise TypeError(f"{what} must be a pair of tensors (x, y), got {type(pair).__name__}")
            if not (pair[0].is_floating_point() and pair[1].is_floating_point()):
                raise TypeError(f"{what} x and y must be floating-point tensors, got {pair[0].dtype} and {pair[1].dtype}")
        for what, (x, y) in (("support", support), ("query", query)):
            if x.dim() != 3 or x.shape[-1] != 1 or y.shape != x.shape:
                raise ValueError(f"{what} x and y must both be (B, points, 1), got {tuple(x.shape)} and {tuple(y.shape)}")
        if query[0].shape[0] != support[0].shape[0]:
            raise ValueError(f"support and query hold different numbers of tasks: {support[0].shape[0]} vs {query[0].shape[0]}")
        if support[0].shape[0] == 0 or support[0].shape[1] == 0 or query[0].shape[1] == 0:
            raise ValueError(f"support and query must hold at least one task with at least one point each, got "
                             f"{tuple(support[0].shape)} and {tuple(query[0].shape)}")
        for what, t in (("amplitude", amplitude), ("phase", phase)):
            if not isinstance(t, Tensor) or t.shape != (support[0].shape[0],):
                found = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"{what} must be a tensor of shape ({support[0].shape[0]},) (one per task), got {found}")
        self.model = model
        self.support = support
        self.query = query
        self.amplitude = amplitude
        self.phase = phase

    @property
    def num_tasks(self) -> int:
        """``B``, the number of sine tasks held."""
        return self.support[0].shape[0]

    def init(self, generator: torch.Generator) -> Params:
        """Independent default-initialised networks, one per task: ``(B, *shape)`` each."""
        return self.model.init_params(generator, self.num_tasks)

    def sample_batch(self, split: str, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """The fixed support (``TRAIN``) or query (``META``) points; ``generator`` is not used."""
        return support_or_query(split, self.support, self.query)

    def _mse(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        pred = functional_call(self.model, params, (x,), strict=True)
        return ((pred - y) ** 2).mean()

    def loss(self, params: Params, batch: tuple[Tensor, Tensor]) -> Tensor:
        """Per-task mean squared error, shape ``(B,)``; params are ``(B, *shape)``."""
        x, y = batch
        if type(self.model) is SineMLP:  # a SineMLP is a chain of batched matrix products: no vmap needed
            return (self.model.forward_batched(params, x) - y).square().mean((1, 2))
        return vmap(self._mse)(params, x, y)  # built per call: a stored wrapper would be a reference cycle

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "SineTask":
        """A copy of the task's data on another device and/or dtype (the model is cast too)."""
        cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        model = self.model if device is None and dtype is None else _copy_model(self.model).to(device=device, dtype=dtype)
        return SineTask(model, (cast(self.support[0]), cast(self.support[1])), (cast(self.query[0]), cast(self.query[1])),
                        cast(self.amplitude), cast(self.phase))


def _copy_model(model: SineMLP) -> SineMLP:
    twin = SineMLP(model.hidden, dtype=next(model.parameters()).dtype)
    twin.load_state_dict(model.state_dict())
    return twin


def _check_widths(name: str, value: Any) -> tuple[int, ...]:
    """Hidden-layer widths: a sequence of positive ints (``()`` for none)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a sequence of layer widths such as (40, 40), got {value!r}")
    return tuple(check_positive_int(name, h) for h in value)


def _check_range(name: str, value: Sequence[float]) -> tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name} must be a pair (low, high), got {value!r}")
    if not all(is_number(v) for v in value):
        raise TypeError(f"{name} must be a pair of numbers (low, high), got {value!r}")
    lo, hi = float(value[0]), float(value[1])
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise ValueError(f"{name} must be a finite pair with low <= high, got {value!r}")
    return lo, hi


class SineFamily:
    r"""Samples meta-batches of sine-regression tasks (:class:`SineTask`), the paper's setup.

    Args:
        shots: K, support points per task (paper: 5 or 10).
        query_shots: query points per task, drawn separately (the meta-loss reads them).
        meta_batch_size: ``B``, tasks per sampled :class:`SineTask` (paper: 25).
        amplitude, phase, x_range: the uniform ranges of :math:`A`, :math:`\varphi` and :math:`x`.
        hidden: hidden widths of the MLP (paper: 40, 40).
        dtype: dtype of the data and of the networks.
    """

    name = "sine"

    def __init__(self, shots: int = 10, query_shots: int = 10, meta_batch_size: int = 25,
                 amplitude: Sequence[float] = (0.1, 5.0), phase: Sequence[float] = (0.0, math.pi),
                 x_range: Sequence[float] = (-5.0, 5.0), hidden: Sequence[int] = (40, 40),
                 dtype: torch.dtype = torch.float32) -> None:
        self.shots = check_positive_int("shots", shots)
        self.query_shots = check_positive_int("query_shots", query_shots)
        self.meta_batch_size = check_positive_int("meta_batch_size", meta_batch_size)
        self.amplitude = _check_range("amplitude", amplitude)
        self.phase = _check_range("phase", phase)
        self.x_range = _check_range("x_range", x_range)
        self.hidden = _check_widths("hidden", hidden)
        self.dtype = check_float_dtype("dtype", dtype)
        self._model = SineMLP(self.hidden, dtype=dtype)

    def model(self) -> SineMLP:
        """A fresh :class:`SineMLP` of this family's architecture (e.g. to hold MAML's θ0)."""
        return SineMLP(self.hidden, dtype=self.dtype)

    def _uniform(self, shape: tuple[int, ...], bounds: tuple[float, float], generator: torch.Generator) -> Tensor:
        lo, hi = bounds
        return torch.rand(shape, generator=generator, dtype=self.dtype) * (hi - lo) + lo

    def sample(self, generator: torch.Generator, num_tasks: int | None = None,
               shots: int | None = None, query_shots: int | None = None) -> SineTask:
        """Draw ``num_tasks`` (default ``meta_batch_size``) tasks with their support and query points."""
        b = self.meta_batch_size if num_tasks is None else check_positive_int("num_tasks", num_tasks)
        k = self.shots if shots is None else check_positive_int("shots", shots)
        q = self.query_shots if query_shots is None else check_positive_int("query_shots", query_shots)
        amp = self._uniform((b,), self.amplitude, generator)
        phase = self._uniform((b,), self.phase, generator)
        x = self._uniform((b, k + q, 1), self.x_range, generator)
        y = amp[:, None, None] * torch.sin(x - phase[:, None, None])
        return SineTask(self._model, (x[:, :k], y[:, :k]), (x[:, k:], y[:, k:]), amp, phase)

    def evaluation_tasks(self, num_tasks: int = 600, seed: int = EVAL_SEED, shots: int | None = None,
                         query_shots: int = 100) -> SineTask:
        """The fixed held-out evaluation set: ``num_tasks`` tasks drawn from their own ``seed``.

        Every call with the same arguments returns the same tasks (a generator of its own, never the
        training stream). ``query_shots`` defaults to 100 points per task, so the reported MSE is
        close to the expected MSE over the whole input range (the paper plots 600 tasks).
        """
        return self.sample(torch.Generator().manual_seed(seed), num_tasks, shots, query_shots)

    def config(self) -> dict[str, Any]:
        return {
            "shots": self.shots,
            "query_shots": self.query_shots,
            "meta_batch_size": self.meta_batch_size,
            "amplitude": list(self.amplitude),
            "phase": list(self.phase),
            "x_range": list(self.x_range),
            "hidden": list(self.hidden),
        }


def _expand(params: Params, batch_size: int) -> Params:
    return {k: v.expand(batch_size, *v.shape) for k, v in params.items()}


def pretrain_jointly(family: SineFamily, iterations: int, generator: torch.Generator, *, lr: float = 1e-3,
                     model: SineMLP | None = None) -> Params:
    r"""The paper's baseline: one network trained to regress all tasks jointly (no adaptation).

    Each iteration draws a meta-batch of tasks and takes an Adam step (learning rate ``lr``) on
    :math:`\frac1B\sum_b f_b(\theta)` over their support and query points, with one shared
    :math:`\theta`. It converges to the average sine (close to 0), which is why fine-tuning it on
    K points barely helps. Returns the trained params (detached, unbatched); fine-tune them with
    :func:`fine_tune_curve`. ``model`` (default ``family.model()``) gives the starting weights.
    """
    if not isinstance(family, SineFamily):
        raise TypeError(f"family must be a SineFamily, got {type(family).__name__}")
    check_positive_int("iterations", iterations)
    check_hyperparameter("lr", lr, low=0.0, low_inclusive=False)
    net = family.model() if model is None else model
    theta = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}
    opt = torch.optim.Adam(list(theta.values()), lr=lr)
    for _ in range(iterations):
        task = family.sample(generator)
        params = _expand(theta, task.num_tasks)
        loss = task.loss(params, task.support).mean() + task.loss(params, task.query).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {k: v.detach() for k, v in theta.items()}


def fine_tune_curve(task: SineTask, params: Params, *, lr: float = 0.01, steps: int = 10) -> Tensor:
    r"""Query MSE of every task after ``0..steps`` SGD steps on its support points, ``(steps + 1, B)``.

    ``params`` are unbatched (one network, e.g. from :func:`pretrain_jointly` or MAML's θ0) and are
    copied to every task. The paper tunes ``lr`` for the pretrained baseline; pass the best one.
    """
    return adaptation_curve(SGD(lr=lr), task, _expand(params, task.num_tasks), steps=steps)
