r"""A memory-light learned rule: a small per-coordinate MLP over accumulator features.

After small_fc_lopt / AdafacMLPLOpt (Metz et al. 2022) and the per-parameter MLP of VeLO (Metz et
al. 2022), with an Adam residual. Every coordinate :math:`i` of a tensor keeps four numbers of
state, the momenta :math:`m^{(k)}` at three decays :math:`\beta_k` and one second moment
:math:`v`; a tensor with at least two dimensions (rows :math:`R` = its first dimension, columns
:math:`C` = the product of the others, so a conv weight ``(out, in, kh, kw)`` is an ``out x
in*kh*kw`` matrix) also keeps Adafactor's factored second moments, a row vector :math:`r` and a
column vector :math:`c` (:math:`R + C` numbers). With :math:`g` the gradient clipped to
:math:`\pm` :data:`GRAD_CLIP`, at step :math:`t` (``step``, 0 for the first update):

.. math::
    m^{(k)}_t &= \beta_k m^{(k)}_{t-1} + (1 - \beta_k) g_t, \qquad
    v_t = \beta_v v_{t-1} + (1 - \beta_v) g_t^2 \\
    r_{t,a} &= \beta_f r_{t-1,a} + (1 - \beta_f)\tfrac1C \textstyle\sum_b g_{t,ab}^2, \qquad
    c_{t,b} = \beta_f c_{t-1,b} + (1 - \beta_f)\tfrac1R \textstyle\sum_a g_{t,ab}^2

with bias corrections :math:`\hat m^{(k)} = m^{(k)} / (1 - \beta_k^{t+1})` and so on, the
per-coordinate scale :math:`\sigma = \sqrt{\hat v + \delta}` (:math:`\delta` = :data:`TINY`) and
Adafactor's factored inverse scale, an outer product of a row and a column vector,

.. math:: \rho_{ab} = \alpha_a \gamma_b, \qquad \alpha_a = (r_a / \bar r + \delta)^{-1/2}, \qquad
          \gamma_b = 1 / (\sqrt{\hat c_b + \delta} + \epsilon) \qquad
          \big(\approx 1/\sqrt{\hat V_{ab}},\ \hat V_{ab} = r_a \hat c_b / \bar r\big)

(:math:`\bar r` the mean of :math:`r`, up to :math:`\delta`; a tensor with fewer than two dimensions
uses :math:`\rho = 1/(\sigma + \epsilon)`).

**Features** (12 per coordinate). Six carry the tensor's scale and are divided by their root mean
square over the tensor, :math:`\operatorname{n}(x) = x / \sqrt{\overline{x^2} + \delta}`, so that
one rule serves tensors of any scale:

.. math:: \operatorname{n}(g),\ \operatorname{n}(\theta),\ \operatorname{n}(m^{(1)}),\
          \operatorname{n}(m^{(2)}),\ \operatorname{n}(m^{(3)}),\ \sigma / \sqrt{\overline{\hat v} + \delta};

six are ratios, already free of the scale, and are kept as they are (normalising them too would
erase what they say about the tensor's gradient noise, e.g. how small Adam's direction
:math:`\hat m / \sigma` has become):

.. math:: \frac{\hat m^{(1)}}{\sigma + \epsilon},\ \frac{\hat m^{(2)}}{\sigma + \epsilon},\
          \frac{\hat m^{(3)}}{\sigma + \epsilon},\ \frac{g}{\sigma + \epsilon},\ g\rho,\
          \hat m^{(1)}\rho.

Every feature is clipped to :math:`\pm` :data:`FEATURE_CLIP`. With ``instance_dims = k`` the first
``k`` dimensions of every tensor index independent instances (l2o's batched tasks: 128 quadratics
as one ``(128, d)`` tensor) and every statistic over "the tensor" is taken per instance.

**Context** (the same for every coordinate of a tensor, so it enters as a per-tensor bias of the
first layer, :math:`W_c\,\kappa`, computed once per tensor and step, never as :math:`N` copies):
training progress :math:`\tanh(t/\tau - 1)` for :math:`\tau \in \{1, 3, 10, \dots, 10^5\}` (11);
when the run's length :math:`T` is known (``total_steps``), an indicator 1, the fraction done
:math:`\phi = \min(t/T, 2)` and :math:`\tanh(10(\phi - c))` for :math:`c \in` :data:`FRACTION_CENTRES`
(else these 8 are 0); and the tensor's rank, one-hot over {0 or 1, 2, 3 or more} dimensions.

**Network**: :math:`h = \operatorname{relu}(W_1 x + b_1 + W_c\kappa)`, ``hidden_layers - 1`` more
layers :math:`h \leftarrow \operatorname{relu}(W_l h + b_l)`, then two outputs
:math:`(a, b) = W_o h + b_o`: a direction and a log-magnitude.

**Update**, with the base step size :math:`\eta = \text{lr}\cdot e^{\lambda}` (:math:`\lambda` a
meta-param, initially 0, so that :math:`\eta` is ``lr`` exactly in any dtype) and the magnitude
clipped to :math:`\pm` :data:`MAGNITUDE_CLIP`:

.. math::
    u = -\eta\, \exp\!\big(\operatorname{clip}(\mu\, b)\big) \cdot
        \begin{cases} \hat m^{(1)} / (\sigma + \epsilon) + a & \text{residual (default)} \\
                      a & \text{otherwise} \end{cases}

with :math:`\mu` = ``exp_mult``. With ``max_step_ratio`` :math:`= \kappa`, each tensor's step (each
instance's) is then held to at most :math:`\kappa` times the root mean square of Adam's step at
:math:`\eta`, :math:`\eta\,\hat m^{(1)} / (\sigma + \epsilon)`:

.. math:: u \leftarrow u \cdot \min\!\Big(1,\ \frac{\kappa\,\eta\,\operatorname{rms}\big(\hat m^{(1)} /
          (\sigma + \epsilon)\big)}{\operatorname{rms}(u)}\Big), \qquad
          \operatorname{rms}(x) = \sqrt{\overline{x^2}},

which keeps the direction and the relative sizes the network chose within the tensor and bounds
only its overall step (a tensor whose gradient is consistent, such as a bias that writes into a
Transformer's residual stream, can otherwise be given many times Adam's step).

In the residual design the output layer starts at zero, so the untrained rule is exactly Adam at
learning rate ``lr`` (betas :math:`(\beta_1, \beta_v)`, the first momentum and the second moment
above; with a bound, when :math:`\kappa \ge 1`), and meta-training learns corrections to its
direction and log step size (and :math:`\lambda`); it starts at least as good as Adam at its
defaults. Otherwise (small_fc_lopt's design) the output layer is initialised like the others and the
untrained rule takes small, random steps of size about ``lr``.

Separable per tensor and equivariant to permuting the coordinates of a tensor (every statistic
over a tensor is symmetric in its coordinates; the factored ones in its rows and in its columns).

:meth:`MLPRule.update` computes a step on whole tensors, differentiably (meta-training);
:meth:`MLPRule.update_` (what :class:`l2o.LearnedOptimizer` calls) is the same math without
autograd, the accumulators updated in place. On float32 CPU tensors it runs the compiled kernel
:func:`l2o.kernels.mlp_update` (``mlp_rule.c``: one call for all tensors of the call, two passes
over each tensor, the features and the network of every coordinate in registers); elsewhere (other
dtypes or devices, ``L2O_KERNELS=0``, no C compiler, inside :func:`torch.compile`) torch ops on
blocks of at most :data:`BLOCK_COORDINATES` coordinates, so no ``features x N`` matrix of a large
tensor is ever allocated. Both agree up to float rounding, and both trace with
``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from .. import kernels
from ..kernels.mlp_constants import FEATURE_CLIP, GRAD_CLIP, MAGNITUDE_CLIP, NUM_FEATURES, TINY
from ..tree import Params
from .base import Rule, check_bool, check_hyperparameter, check_params, check_positive_int, check_update_args

__all__ = ["MLPRule", "MLPState", "BLOCK_COORDINATES", "GRAD_CLIP", "FEATURE_CLIP", "MAGNITUDE_CLIP", "TINY",
           "PROGRESS_TIMESCALES", "FRACTION_CENTRES", "NUM_FEATURES", "NUM_CONTEXT"]

#: :math:`\tau` of the training-progress features :math:`\tanh(t/\tau - 1)`.
PROGRESS_TIMESCALES = (1, 3, 10, 30, 100, 300, 1000, 3000, 10_000, 30_000, 100_000)
#: :math:`c` of the fraction-done features :math:`\tanh(10(\phi - c))`.
FRACTION_CENTRES = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
_NUM_PROGRESS = len(PROGRESS_TIMESCALES) + 2 + len(FRACTION_CENTRES)
_NUM_RANKS = 3
#: Per-tensor context features: training progress, fraction done, rank.
NUM_CONTEXT = _NUM_PROGRESS + _NUM_RANKS
#: Coordinates per block of :meth:`MLPRule.update_`.
BLOCK_COORDINATES = 1 << 16


class MLPState(NamedTuple):
    """State of :class:`MLPRule`, keyed like the params: ``momentum`` (three dicts, one per decay)
    and ``second_moment`` hold one tensor shaped like each param; ``row`` and ``col`` the factored
    second moments, shaped ``(*instances, R)`` and ``(*instances, C)`` for tensors with at least two
    (non-instance) dimensions and ``(0,)`` for the others."""

    momentum: tuple[dict[str, Tensor], ...]
    second_moment: dict[str, Tensor]
    row: dict[str, Tensor]
    col: dict[str, Tensor]


class _Layout(NamedTuple):
    """How a tensor is seen: ``instances`` independent slices of ``n`` coordinates each; factored
    tensors are ``rows x cols`` per instance (``rows * cols == n``)."""

    instances: int
    n: int
    factored: bool
    rows: int
    cols: int
    rank: int  # 0: a scalar or vector, 1: a matrix, 2: three or more dimensions


@functools.lru_cache(maxsize=4096)
def _layout(shape: tuple[int, ...], instance_dims: int) -> _Layout:
    inst, rest = tuple(shape[:instance_dims]), tuple(shape[instance_dims:])
    instances, n = math.prod(inst), math.prod(rest)
    if len(rest) >= 2:
        return _Layout(instances, n, True, rest[0], math.prod(rest[1:]), min(len(rest) - 1, 2))
    return _Layout(instances, n, False, 1, n, 0)


@functools.lru_cache(maxsize=4096)
def _factored_shapes(shape: tuple[int, ...], instance_dims: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of a tensor's factored row and column statistics (``(0,)`` each if it has none)."""
    lay = _layout(shape, instance_dims)
    if not lay.factored:
        return (0,), (0,)
    inst = shape[:instance_dims]
    return inst + (lay.rows,), inst + (lay.cols,)


def _bias_correction(beta: float, step: int) -> float:
    return 1.0 - beta ** (step + 1)


class MLPRule(Rule):
    r"""The per-coordinate MLP rule (see the module docstring for the math).

    Args:
        hidden_size: width :math:`H` of the hidden layers.
        hidden_layers: number of hidden layers (>= 1).
        residual: add the network's output to Adam's step (output layer zero-initialised: the
            untrained rule is Adam at ``lr``); ``False``: the network's output alone
            (small_fc_lopt's design).
        lr: the initial base step size :math:`\eta = \text{lr}\cdot e^\lambda` (:math:`\lambda` a
            meta-param, initially 0); the Adam residual's learning rate.
        exp_mult: :math:`\mu`, the scale of the log-magnitude output.
        momentum_decays: the three momentum decays :math:`\beta_1, \beta_2, \beta_3` (the first is
            Adam's :math:`\beta_1`), each in ``[0, 1)``.
        second_moment_decay: :math:`\beta_v` (Adam's :math:`\beta_2`), in ``[0, 1)``.
        factored_decay: :math:`\beta_f` of the row and column statistics, in ``[0, 1)``.
        eps: :math:`\epsilon > 0` of the ratio features and of the Adam residual (Adam's eps).
        instance_dims: leading dimensions of every tensor that index independent instances (1 for
            l2o's batched tasks, whose params are ``(B, ...)``; 0, the default, for a model's own
            parameters).
        total_steps: the run's length :math:`T`, used when :meth:`update` is not given one (``None``:
            unknown, the fraction-done features are 0).
        max_step_ratio: :math:`\kappa`, the largest ratio of a tensor's step to Adam's at
            :math:`\eta` (root mean squares over the tensor; see the module docstring), or ``None``
            (the default): no bound.

    Weights: the first layer ``input_weight (H, 12)`` with ``input_bias (H,)`` and
    ``context_weight (H, 22)`` (progress, fraction done and rank), ``hidden_weights``/``hidden_biases``
    for the further layers, ``out_weight (2, H)``, ``out_bias (2,)`` and the scalar
    ``log_lr_offset`` (:math:`\lambda`). Layers
    are initialised :math:`\mathcal N(0, 1/\text{fan\_in})` with zero biases; the output layer is
    zero in the residual design.

    :meth:`update_` (the drop-in optimizer's step) runs the compiled kernel of
    :func:`l2o.kernels.mlp_update` on float32 CPU tensors (``hidden_size`` up to
    :data:`l2o.kernels.MLP_MAX_HIDDEN`), and torch ops elsewhere; the two agree to float rounding.
    """

    name = "mlp"
    #: The optimizer adapter may call the rule once with all tensors of a param group.
    per_tensor_state = True

    def __init__(self, hidden_size: int = 8, hidden_layers: int = 1, residual: bool = True, lr: float = 1e-3,
                 exp_mult: float = 1.0, momentum_decays: Sequence[float] = (0.9, 0.99, 0.999),
                 second_moment_decay: float = 0.999, factored_decay: float = 0.999, eps: float = 1e-8,
                 instance_dims: int = 0, total_steps: int | None = None,
                 max_step_ratio: float | None = None) -> None:
        super().__init__()
        self.hidden_size = check_positive_int("hidden_size", hidden_size)
        self.hidden_layers = check_positive_int("hidden_layers", hidden_layers)
        self.residual = check_bool("residual", residual)
        self.lr = check_hyperparameter("lr", lr, low=0.0, low_inclusive=False)
        self.exp_mult = check_hyperparameter("exp_mult", exp_mult, high=1e3)
        if not isinstance(momentum_decays, (tuple, list)) or len(momentum_decays) != 3:
            raise TypeError(f"momentum_decays must be three decays (beta1, beta2, beta3), got {momentum_decays!r}")
        self.momentum_decays = tuple(check_hyperparameter(f"momentum_decays[{i}]", b, low=0.0, high=1.0,
                                                          high_inclusive=False) for i, b in enumerate(momentum_decays))
        self.second_moment_decay = check_hyperparameter("second_moment_decay", second_moment_decay, low=0.0, high=1.0,
                                                        high_inclusive=False)
        self.factored_decay = check_hyperparameter("factored_decay", factored_decay, low=0.0, high=1.0,
                                                   high_inclusive=False)
        self.eps = check_hyperparameter("eps", eps, low=0.0, high=1.0, low_inclusive=False)
        if isinstance(instance_dims, bool) or not isinstance(instance_dims, int) or instance_dims < 0:
            raise ValueError(f"instance_dims must be an integer >= 0, got {instance_dims!r}")
        self.instance_dims = instance_dims
        self.total_steps = self._check_total_steps(total_steps)
        self.max_step_ratio = self.check_max_step_ratio(max_step_ratio)
        H = hidden_size
        self.input_weight = nn.Parameter(torch.empty(H, NUM_FEATURES))
        self.input_bias = nn.Parameter(torch.empty(H))
        self.context_weight = nn.Parameter(torch.empty(H, NUM_CONTEXT))
        self.hidden_weights = nn.ParameterList(nn.Parameter(torch.empty(H, H)) for _ in range(hidden_layers - 1))
        self.hidden_biases = nn.ParameterList(nn.Parameter(torch.empty(H)) for _ in range(hidden_layers - 1))
        self.out_weight = nn.Parameter(torch.empty(2, H))
        self.out_bias = nn.Parameter(torch.empty(2))
        self.log_lr_offset = nn.Parameter(torch.empty(()))
        self.reset_parameters()

    @staticmethod
    def _check_total_steps(total_steps: Any) -> int | None:
        if total_steps is None:
            return None
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be a positive integer (the run's length in steps) or None, got "
                             f"{total_steps!r}")
        return total_steps

    @staticmethod
    def check_max_step_ratio(max_step_ratio: Any) -> float | None:
        """``max_step_ratio`` as a float, or ``None``; ``ValueError``/``TypeError`` unless it is ``None``
        or a finite number > 0."""
        if max_step_ratio is None:
            return None
        return check_hyperparameter("max_step_ratio", max_step_ratio, low=0.0, low_inclusive=False)

    def reset_parameters(self) -> None:
        """Re-initialise the weights (normal with variance 1/fan_in, zero biases; in the residual
        design a zero output layer) and :math:`\\lambda = 0`."""
        with torch.no_grad():
            self.input_weight.normal_(0.0, 1.0 / math.sqrt(NUM_FEATURES + NUM_CONTEXT))
            self.context_weight.normal_(0.0, 1.0 / math.sqrt(NUM_FEATURES + NUM_CONTEXT))
            self.input_bias.zero_()
            for w, b in zip(self.hidden_weights, self.hidden_biases):
                w.normal_(0.0, 1.0 / math.sqrt(self.hidden_size))
                b.zero_()
            if self.residual:
                self.out_weight.zero_()
            else:
                self.out_weight.normal_(0.0, 1.0 / math.sqrt(self.hidden_size))
            self.out_bias.zero_()
            self.log_lr_offset.zero_()

    @property
    def nominal_lr(self) -> float:
        """The base step size :math:`\\eta = \\text{lr}\\cdot e^\\lambda` now (``lr`` until
        meta-trained): the step size decoupled weight decay should be scaled by."""
        return self.lr * float(self.log_lr_offset.detach().exp())

    def config(self) -> dict[str, Any]:
        return {
            "hidden_size": self.hidden_size,
            "hidden_layers": self.hidden_layers,
            "residual": self.residual,
            "lr": self.lr,
            "exp_mult": self.exp_mult,
            "momentum_decays": list(self.momentum_decays),
            "second_moment_decay": self.second_moment_decay,
            "factored_decay": self.factored_decay,
            "eps": self.eps,
            "instance_dims": self.instance_dims,
            "total_steps": self.total_steps,
            # listed only when set (the default, None, adds nothing to the config)
            **({} if self.max_step_ratio is None else {"max_step_ratio": self.max_step_ratio}),
        }

    # ------------------------------------------------------------------------------ state

    def _dtype(self) -> torch.dtype:
        return self.out_weight.dtype

    def _layout_of(self, key: str, shape: Sequence[int], where: str) -> _Layout:
        if len(shape) < self.instance_dims:
            raise ValueError(f"MLPRule.{where}: params[{key!r}] has {len(shape)} dimensions but the rule has "
                             f"instance_dims={self.instance_dims} (leading dimensions that index instances); "
                             "use a rule with fewer instance_dims for these params")
        return _layout(tuple(shape), self.instance_dims)

    def init(self, params: Params) -> MLPState:
        """Zero accumulators (in the rule's dtype, on each param's device; see :class:`MLPState`)."""
        check_params(params, rule="MLPRule")
        dtype = self._dtype()
        momentum = tuple({k: torch.zeros(p.shape, dtype=dtype, device=p.device) for k, p in params.items()}
                         for _ in self.momentum_decays)
        second = {k: torch.zeros(p.shape, dtype=dtype, device=p.device) for k, p in params.items()}
        row, col = {}, {}
        for k, p in params.items():
            self._layout_of(k, p.shape, "init")
            rows, cols = _factored_shapes(tuple(p.shape), self.instance_dims)
            row[k] = torch.zeros(rows, dtype=dtype, device=p.device)
            col[k] = torch.zeros(cols, dtype=dtype, device=p.device)
        return MLPState(momentum, second, row, col)

    def _check(self, grads: Params, state: Any, params: Params, step: Any, total_steps: Any,
               where: str) -> tuple[int | None, dict[str, _Layout]]:
        """Check ``update``'s arguments; return the total steps to use and each tensor's layout.
        ``update_`` also needs every state tensor contiguous in the rule's dtype (checked here too)."""
        check_update_args(grads, params, step, rule="MLPRule")
        total = self._check_total_steps(total_steps) if total_steps is not None else self.total_steps
        if not (isinstance(state, MLPState) and isinstance(state.momentum, tuple)
                and len(state.momentum) == len(self.momentum_decays)):
            raise TypeError(f"MLPRule.{where}: state must be the MLPState that MLPRule.init(params) returned, got "
                            f"{type(state).__name__}")
        fields = [f"momentum[{i}]" for i in range(len(state.momentum))] + ["second_moment", "row", "col"]
        trees = (*state.momentum, state.second_moment, state.row, state.col)
        in_place = where == "update_"
        dtype = self._dtype()
        layouts = {}
        for k, p in params.items():
            layouts[k] = self._layout_of(k, p.shape, where)
            shape = tuple(p.shape)
            shapes = (shape,) * (len(trees) - 2) + _factored_shapes(shape, self.instance_dims)
            for field, tree, want in zip(fields, trees, shapes):
                t = tree.get(k) if isinstance(tree, dict) else None
                if not isinstance(t, Tensor) or t.shape != want or not t.is_floating_point():
                    found = f"shape {tuple(t.shape)} ({t.dtype})" if isinstance(t, Tensor) else type(t).__name__
                    raise ValueError(f"MLPRule.{where}: state.{field}[{k!r}] is {found}, but params[{k!r}] of shape "
                                     f"{shape} needs a floating tensor of shape {want}: call "
                                     "rule.init(params) for these params")
                if in_place and (t.dtype != dtype or not t.is_contiguous()):
                    raise ValueError(f"MLPRule.update_: state tensors must be contiguous {dtype} tensors (the rule's "
                                     f"dtype, as init makes them), got a {'' if t.is_contiguous() else 'non-contiguous '}"
                                     f"{t.dtype} one for params[{k!r}]; convert the state (or use update)")
        return total, layouts

    # ------------------------------------------------------------------------------ the math

    def _context(self, step: int, total: int | None) -> Tensor:
        """The progress part of the context :math:`\\kappa` (the rank one-hot is added per tensor)."""
        values = [math.tanh(step / tau - 1.0) for tau in PROGRESS_TIMESCALES]
        if total is None:
            values += [0.0] * (2 + len(FRACTION_CENTRES))
        else:
            phi = min(step / total, 2.0)
            values += [1.0, phi] + [math.tanh(10.0 * (phi - c)) for c in FRACTION_CENTRES]
        return torch.tensor(values, dtype=self._dtype(), device=self.out_weight.device)

    def _biases(self, progress: Tensor) -> list[Tensor]:
        """The first layer's bias for each rank: :math:`b_1 + W_c \\kappa`, ``(H, 1)`` each."""
        base = self.input_bias + self.context_weight[:, :_NUM_PROGRESS] @ progress
        return [(base + self.context_weight[:, _NUM_PROGRESS + r]).unsqueeze(1) for r in range(_NUM_RANKS)]

    def _consts(self, step: int) -> tuple[float, ...]:
        """Bias corrections: the momenta's, the second moment's, the factored statistics'."""
        return (*(_bias_correction(b, step) for b in self.momentum_decays),
                _bias_correction(self.second_moment_decay, step), _bias_correction(self.factored_decay, step))

    def _step(self, g: Tensor, p: Tensor, ms: Sequence[Tensor], v: Tensor, rho: Tensor | None, scales: Tensor,
              bias: Tensor, consts: tuple[float, ...]) -> Tensor:
        r"""The update of coordinates given as ``(I, n)`` tensors (``I`` instances), differentiably.

        ``g`` is the clipped gradient; ``rho`` the factored scale :math:`\rho` (``None``: the tensor
        is not factored, use :math:`1/(\sigma + \epsilon)`); ``scales (I, 6)`` the per-instance
        normalisers of the six scale-carrying features; ``bias (H, 1)`` the first layer's bias with
        the context.
        """
        bc1, bc2, bc3, bcv, _ = consts
        sigma = torch.sqrt((v + TINY) * (1.0 / bcv))
        inv = torch.reciprocal(sigma + self.eps)
        adam = ms[0] * inv * (1.0 / bc1)
        s = scales.unsqueeze(-1)  # (I, 6, 1)
        if rho is None:
            fac_g, fac_m = g * inv, adam
        else:
            fac_g, fac_m = g * rho, ms[0] * rho * (1.0 / bc1)
        rows = [g * s[:, 0], p * s[:, 1], ms[0] * s[:, 2], ms[1] * s[:, 3], ms[2] * s[:, 4], sigma * s[:, 5],
                adam, ms[1] * inv * (1.0 / bc2), ms[2] * inv * (1.0 / bc3), g * inv, fac_g, fac_m]
        x = torch.stack(rows, dim=1).clamp(-FEATURE_CLIP, FEATURE_CLIP)  # (I, F, n)
        h = torch.relu(torch.matmul(self.input_weight, x) + bias)
        for w, b in zip(self.hidden_weights, self.hidden_biases):
            h = torch.relu(torch.matmul(w, h) + b.unsqueeze(1))
        out = torch.matmul(self.out_weight, h) + self.out_bias.unsqueeze(1)  # (I, 2, n)
        direction, magnitude = out[:, 0], out[:, 1]
        if self.residual:
            direction = direction + adam
        log_step = self.log_lr_offset + (magnitude * self.exp_mult).clamp(-MAGNITUDE_CLIP, MAGNITUDE_CLIP)
        u = (torch.exp(log_step) * -self.lr) * direction
        if self.max_step_ratio is None:
            return u
        return u * self._step_bound(adam.square().mean(-1, keepdim=True),
                                    u.square().mean(-1, keepdim=True))

    def _step_bound(self, adam_sq: Tensor, u_sq: Tensor) -> Tensor:
        r"""The factor :math:`\min(1, \kappa\eta\operatorname{rms}(\hat a) / \operatorname{rms}(u))`
        from the mean squares of Adam's direction :math:`\hat a` and of the step :math:`u` (any
        matching shapes), differentiable and finite in both branches (a zero step keeps factor 1; a
        non-finite one is left as it is, for the caller's non-finite check)."""
        limit = (self.max_step_ratio * self.lr) * torch.exp(self.log_lr_offset) * torch.sqrt(adam_sq + TINY)
        over = u_sq > limit * limit
        one = torch.ones_like(u_sq)
        return torch.where(over, limit * torch.rsqrt(torch.where(over, u_sq, one)), one)

    @staticmethod
    def _scales(sums: Tensor, n: int, bcv: float) -> Tensor:
        r"""Normalisers :math:`1/\sqrt{\overline{x^2} + \delta}` ``(I, 6)`` from ``(I, 6)`` sums: of the
        squares of g, the param and the momenta, and of :math:`v` (:math:`\sigma^2 = (v + \delta)/(1 - \beta_v^{t+1})`)."""
        mean = sums * (1.0 / max(n, 1))
        return torch.rsqrt(torch.cat((mean[:, :5], (mean[:, 5:] + TINY) * (1.0 / bcv)), dim=1) + TINY)

    def _factors(self, lay: _Layout, r: Tensor, c: Tensor, bcf: float) -> tuple[Tensor, Tensor]:
        """The row and column factors of :math:`\\rho_{ab} = \\alpha_a \\gamma_b`, ``(I, R)`` and ``(I, C)``."""
        r = r.reshape(lay.instances, lay.rows)
        mean = r.sum(-1, keepdim=True) * (1.0 / max(lay.rows, 1))
        alpha = torch.rsqrt(r / (mean + TINY) + TINY)
        gamma = torch.reciprocal(torch.sqrt(c.reshape(lay.instances, lay.cols) * (1.0 / bcf) + TINY) + self.eps)
        return alpha, gamma

    # ------------------------------------------------------------------------------ update

    def update(self, grads: Params, state: MLPState, params: Params, *, step: int, loss: Tensor | None = None,
               total_steps: int | None = None) -> tuple[Params, MLPState]:
        """One step on whole tensors, differentiable (see the module docstring); ``loss`` is ignored.

        ``total_steps`` is the run's length :math:`T` (default: the rule's ``total_steps``)."""
        total, layouts = self._check(grads, state, params, step, total_steps, "update")
        dtype = self._dtype()
        consts = self._consts(step)
        biases = self._biases(self._context(step, total))
        betas, beta_v, beta_f = self.momentum_decays, self.second_moment_decay, self.factored_decay
        updates: Params = {}
        new_m: tuple[dict[str, Tensor], ...] = tuple({} for _ in betas)
        new_v: dict[str, Tensor] = {}
        new_r: dict[str, Tensor] = {}
        new_c: dict[str, Tensor] = {}
        for k, param in params.items():
            lay = layouts[k]
            I, n = lay.instances, lay.n
            g = grads[k].to(dtype).clamp(-GRAD_CLIP, GRAD_CLIP)
            ms = [torch.lerp(state.momentum[i][k].to(dtype), g, 1.0 - b) for i, b in enumerate(betas)]
            v = torch.addcmul(state.second_moment[k].to(dtype) * beta_v, g, g, value=1.0 - beta_v)
            for i in range(len(betas)):
                new_m[i][k] = ms[i]
            new_v[k] = v
            r, c = state.row[k].to(dtype), state.col[k].to(dtype)
            rho = None
            if lay.factored:
                g2 = (g * g).reshape(I, lay.rows, lay.cols)
                r = torch.lerp(r, g2.sum(-1).reshape(r.shape) * (1.0 / max(lay.cols, 1)), 1.0 - beta_f)
                c = torch.lerp(c, g2.sum(-2).reshape(c.shape) * (1.0 / max(lay.rows, 1)), 1.0 - beta_f)
                alpha, gamma = self._factors(lay, r, c, consts[4])
                rho = (alpha.unsqueeze(-1) * gamma.unsqueeze(-2)).reshape(I, n)
            new_r[k], new_c[k] = r, c
            flat = [t.reshape(I, n) for t in (g, param.to(dtype), *ms, v)]
            sums = torch.stack([(x * x).sum(-1) for x in flat[:5]] + [flat[5].sum(-1)], dim=-1)
            u = self._step(flat[0], flat[1], flat[2:5], flat[5], rho, self._scales(sums, n, consts[3]),
                           biases[lay.rank], consts)
            updates[k] = u.reshape(param.shape).to(param.dtype)
        return updates, MLPState(new_m, new_v, new_r, new_c)

    @torch.no_grad()
    def update_(self, grads: Params, state: MLPState, params: Params, *, step: int, loss: Tensor | None = None,
                total_steps: int | None = None) -> tuple[Params, MLPState]:
        """:meth:`update` without autograd, overwriting ``state``'s tensors (equal up to float rounding).

        When the rule, every param, gradient and state tensor are float32 CPU tensors (contiguous)
        and the compiled kernels are available (:mod:`l2o.kernels`; not under
        :func:`torch.compile`), one call of :func:`l2o.kernels.mlp_update` does the whole step: per
        tensor a pass that updates the accumulators and sums the normalisers' squares, then a pass
        that computes each coordinate's features, network and update in registers. Otherwise each
        tensor is walked twice in blocks of at most :data:`BLOCK_COORDINATES` coordinates (whole
        rows of a factored tensor where they fit): the first pass updates its accumulators in place
        and sums the squares the normalisers need, the second computes the features, runs the network
        (one matrix product per layer and block) and writes the update. Every intermediate lives in
        buffers allocated once per call: nothing of the size of a tensor is allocated but its update.
        State tensors must have the rule's dtype (as ``init`` makes them)."""
        total, layouts = self._check(grads, state, params, step, total_steps, "update_")
        dtype = self._dtype()
        if not params:
            return {}, state
        consts = self._consts(step)
        biases = self._biases(self._context(step, total))
        compiled = self._compiled_kernel(grads, state, params)
        if compiled is not None:
            return self._update_compiled(compiled, grads, state, params, layouts, consts, biases), state
        device = next(iter(params.values())).device
        work = _Workspace(self, max(min(lay.n, BLOCK_COORDINATES) for lay in layouts.values()), biases, consts,
                          dtype, device)
        updates: Params = {}
        for k, param in params.items():
            lay = layouts[k]
            flat = [t.reshape(lay.instances, lay.n) for t in
                    (grads[k], param, *(m[k] for m in state.momentum), state.second_moment[k])]
            blocks = _blocks(lay)
            sums, rsum, csum = work.accumulate_(lay, blocks, flat)
            alpha = gamma = None
            if lay.factored:
                r, c = state.row[k], state.col[k]
                r.lerp_(rsum.reshape(r.shape).mul_(1.0 / max(lay.cols, 1)), 1.0 - self.factored_decay)
                c.lerp_(csum.reshape(c.shape).mul_(1.0 / max(lay.rows, 1)), 1.0 - self.factored_decay)
                alpha, gamma = self._factors(lay, r, c, consts[4])
            scales = [row.unbind() for row in self._scales(sums, lay.n, consts[3]).unbind()]  # [instance][feature]
            u = torch.empty(lay.instances, lay.n, dtype=dtype, device=param.device)
            adam_sq = None if self.max_step_ratio is None else torch.zeros(len(blocks), dtype=dtype,
                                                                           device=param.device)
            for b, (i, start, end, ra, rb, ca, cb) in enumerate(blocks):
                block = [t[i, start:end] for t in flat]
                factors = None if alpha is None else (alpha[i, ra:rb], gamma[i, ca:cb])
                work.step(*block, factors, scales[i], lay.rank, u[i, start:end],
                          None if adam_sq is None else adam_sq[b])
            if adam_sq is not None:
                mean = 1.0 / max(lay.n, 1)
                a_sq = adam_sq.view(lay.instances, -1).sum(1) * (mean / consts[0] ** 2)
                u_sq = torch.linalg.vector_norm(u, dim=1).square() * mean
                u.mul_(self._step_bound(a_sq, u_sq).unsqueeze(1))
            updates[k] = u.reshape(param.shape).to(param.dtype)
        return updates, state

    def _layer_matrices(self, biases: list[Tensor]) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """The network's layers with their biases as a last column, as :meth:`update_` multiplies
        them by a row of ones: the first layer per rank ``(H, F + 1)`` (its bias the rank's context
        bias from :meth:`_biases`), the further layers ``(H, H + 1)``, and the output layer
        ``(2, H + 1)`` with its magnitude row times ``exp_mult``."""
        first = [torch.cat((self.input_weight, b), dim=1) for b in biases]
        hidden = [torch.cat((w, b.unsqueeze(1)), dim=1) for w, b in zip(self.hidden_weights, self.hidden_biases)]
        mult = torch.tensor([[1.0], [self.exp_mult]], dtype=self.out_weight.dtype, device=self.out_weight.device)
        last = torch.cat((self.out_weight, self.out_bias.unsqueeze(1)), dim=1) * mult
        return first, hidden, last

    def _compiled_kernel(self, grads: Params, state: MLPState, params: Params) -> kernels.MLPKernel | None:
        """The compiled kernel, if it is available and every tensor of the step fits it (float32,
        CPU, contiguous), else ``None``."""
        if self._dtype() != torch.float32 or self.out_weight.device.type != "cpu":
            return None
        compiled = kernels.mlp_update(self.hidden_size)
        if compiled is None:
            return None
        cpu = torch.device("cpu")
        for k, p in params.items():  # (update_ has checked that the state is contiguous, in the rule's dtype)
            g = grads[k]
            if (p.dtype != torch.float32 or g.dtype != torch.float32 or p.device != cpu or g.device != cpu
                    or not (p.is_contiguous() and g.is_contiguous())):
                return None
            if any(t.device != cpu for t in (*(m[k] for m in state.momentum), state.second_moment[k], state.row[k],
                                             state.col[k])):
                return None
        return compiled

    def _update_compiled(self, compiled: kernels.MLPKernel, grads: Params, state: MLPState, params: Params,
                         layouts: dict[str, _Layout], consts: tuple[float, ...], biases: list[Tensor]) -> Params:
        """:meth:`update_`'s step in one call of the compiled kernel (see :meth:`l2o.kernels.MLPKernel.update`)."""
        H = self.hidden_size
        firsts, hiddens, last = self._layer_matrices(biases)
        first = torch.stack(firsts)  # (3, H, F + 1)
        hidden = torch.stack(hiddens) if hiddens else torch.empty(0, H, H + 1)
        bc1, bc2, bc3, bcv, bcf = consts
        b1, b2, b3 = self.momentum_decays
        bv = self.second_moment_decay
        coef = (1.0 - b1, 1.0 - b2, 1.0 - b3, bv, 1.0 - bv, 1.0 - self.factored_decay, 1.0 / bc1, 1.0 / bc2,
                1.0 / bc3, 1.0 / bcv, 1.0 / bcf, math.sqrt(1.0 / bcv), self.eps, self.lr, float(self.log_lr_offset),
                float(self.residual), self.max_step_ratio or 0.0)
        updates: Params = {}
        entries: list[kernels.MLPEntry] = []
        for k, param in params.items():
            lay = layouts[k]
            u = updates[k] = torch.empty(param.shape, dtype=torch.float32)
            entries.append(((lay.instances, lay.n, lay.rows, lay.cols, int(lay.factored), lay.rank),
                            (grads[k], param, *(m[k] for m in state.momentum), state.second_moment[k],
                             state.row[k], state.col[k], u)))
        compiled.update(entries, coef, first, hidden, last)
        return updates


def _blocks(lay: _Layout) -> list[tuple[int, int, int, int, int, int, int]]:
    """The blocks of a tensor, in order: ``(instance, start, end, row0, row1, col0, col1)``, each a
    contiguous run ``start:end`` of one instance's coordinates (whole rows of a factored tensor, or
    part of one row when a row is longer than a block)."""
    B = BLOCK_COORDINATES
    out = []
    for i in range(lay.instances):
        if not lay.factored:
            out += [(i, s, min(s + B, lay.n), 0, 0, 0, 0) for s in range(0, lay.n, B)]
        elif lay.cols <= B:
            per = B // max(lay.cols, 1)
            out += [(i, r * lay.cols, min(r + per, lay.rows) * lay.cols, r, min(r + per, lay.rows), 0, lay.cols)
                    for r in range(0, lay.rows, per) if lay.cols]
        else:
            out += [(i, r * lay.cols + c, r * lay.cols + min(c + B, lay.cols), r, r + 1, c, min(c + B, lay.cols))
                    for r in range(lay.rows) for c in range(0, lay.cols, B)]
    return out


class _Workspace:
    """The two block passes of :meth:`MLPRule.update_` (:meth:`MLPRule._step`'s math on 1-d runs of
    coordinates), with every intermediate in buffers allocated once for blocks of up to ``size``.

    The network's biases ride in its matrix products: the feature matrix and each hidden layer's
    output get a row of ones, the weights a column with the bias (the first layer's holds the
    context bias of the tensor's rank; the output layer's magnitude row is scaled by ``exp_mult``).
    """

    def __init__(self, rule: MLPRule, size: int, biases: list[Tensor], consts: tuple[float, ...],
                 dtype: torch.dtype, device: torch.device) -> None:
        new = dict(dtype=dtype, device=device)
        H, F = rule.hidden_size, NUM_FEATURES
        self.rule, self.consts = rule, consts
        self.x = torch.empty((F + 1) * size, **new)
        self.h = [torch.empty((H + 1) * size, **new) for _ in range(min(rule.hidden_layers, 2))]
        self.out = torch.empty(2 * size, **new)
        self.g, self.p, self.sq, self.sigma, self.inv, self.adam, self.rho = (torch.empty(size, **new)
                                                                              for _ in range(7))
        self.first, self.hidden, self.last = rule._layer_matrices(biases)

    def _inputs(self, g: Tensor, p: Tensor) -> tuple[Tensor, Tensor]:
        """The clipped gradient and the param of a block, in the rule's dtype (in the buffers)."""
        n = g.numel()
        gc = self.g[:n]
        if g.dtype == gc.dtype:
            torch.clamp(g, -GRAD_CLIP, GRAD_CLIP, out=gc)
        else:
            gc.copy_(g).clamp_(-GRAD_CLIP, GRAD_CLIP)
        return gc, p if p.dtype == gc.dtype else self.p[:n].copy_(p)

    def accumulate_(self, lay: _Layout, blocks: list, flat: list[Tensor]) -> tuple[Tensor, Tensor | None,
                                                                                 Tensor | None]:
        """First pass: update the momenta and the second moment in place; return the ``(I, 6)`` sums
        the normalisers need and the row and column sums of :math:`g^2` (factored tensors)."""
        rule = self.rule
        new = dict(dtype=self.g.dtype, device=self.g.device)
        part = torch.zeros(len(blocks), 6, **new)
        rsum = torch.zeros(lay.instances, lay.rows, **new) if lay.factored else None
        csum = torch.zeros(lay.instances, lay.cols, **new) if lay.factored else None
        for b, (i, start, end, ra, rb, ca, cb) in enumerate(blocks):
            g, p, m1, m2, m3, v = (t[i, start:end] for t in flat)
            g, p = self._inputs(g, p)
            for m, beta in zip((m1, m2, m3), rule.momentum_decays):
                m.lerp_(g, 1.0 - beta)
            v.mul_(rule.second_moment_decay).addcmul_(g, g, value=1.0 - rule.second_moment_decay)
            sums = part[b].unbind()
            for j, t in enumerate((g, p, m1, m2, m3)):
                torch.dot(t, t, out=sums[j])
            torch.sum(v, dim=0, out=sums[5])
            if rsum is not None and csum is not None:
                sq = torch.mul(g, g, out=self.sq[:end - start]).view(rb - ra, cb - ca)
                rsum[i, ra:rb] += sq.sum(1)
                csum[i, ca:cb] += sq.sum(0)
        per = len(blocks) // max(lay.instances, 1)
        return part.view(lay.instances, per, 6).sum(1), rsum, csum

    def step(self, g: Tensor, p: Tensor, m1: Tensor, m2: Tensor, m3: Tensor, v: Tensor,
             factors: tuple[Tensor, Tensor] | None, s: Sequence[Tensor], rank: int, out: Tensor,
             adam_sq: Tensor | None = None) -> None:
        r"""Second pass, one block: write its update into ``out`` (before any ``max_step_ratio``
        bound) and, given ``adam_sq`` (a 0-d tensor), the sum of the squares of
        :math:`m^{(1)} / (\sigma + \epsilon)` (the momentum before its bias correction) into it."""
        rule = self.rule
        n = g.numel()
        bc1, bc2, bc3, bcv, _ = self.consts
        F, H = NUM_FEATURES, rule.hidden_size
        g, p = self._inputs(g, p)
        x = self.x[:(F + 1) * n].view(F + 1, n)
        rows = x.unbind()
        sigma, inv, adam = self.sigma[:n], self.inv[:n], self.adam[:n]
        torch.add(v, TINY, out=sigma).sqrt_().mul_(math.sqrt(1.0 / bcv))
        torch.add(sigma, rule.eps, out=inv).reciprocal_()
        torch.mul(m1, inv, out=adam)  # times 1/bc1: Adam's direction
        if adam_sq is not None:
            torch.dot(adam, adam, out=adam_sq)
        for row, t, scale in zip(rows, (g, p, m1, m2, m3, sigma), s):
            torch.mul(t, scale, out=row)
        torch.mul(adam, 1.0 / bc1, out=rows[6])
        torch.mul(m2, inv, out=rows[7]).mul_(1.0 / bc2)
        torch.mul(m3, inv, out=rows[8]).mul_(1.0 / bc3)
        torch.mul(g, inv, out=rows[9])
        if factors is None:
            rows[10].copy_(rows[9])
            rows[11].copy_(rows[6])
        else:
            alpha, gamma = factors
            rho = torch.mul(alpha.unsqueeze(1), gamma.unsqueeze(0), out=self.rho[:n].view(alpha.numel(), -1))
            rho = rho.view(-1)
            torch.mul(g, rho, out=rows[10])
            torch.mul(m1, rho, out=rows[11]).mul_(1.0 / bc1)
        x[:F].clamp_(-FEATURE_CLIP, FEATURE_CLIP)
        rows[F].fill_(1.0)
        h = x
        for layer, w in enumerate([self.first[rank], *self.hidden]):
            buf = self.h[layer % len(self.h)][:(H + 1) * n].view(H + 1, n)
            torch.mm(w, h, out=buf[:H])
            buf[H].fill_(1.0)
            h = buf.relu_()
        o = torch.mm(self.last, h, out=self.out[:2 * n].view(2, n))
        direction, magnitude = o.unbind()
        magnitude.clamp_(-MAGNITUDE_CLIP, MAGNITUDE_CLIP).add_(rule.log_lr_offset).exp_()
        if rule.residual:
            direction.add_(adam, alpha=1.0 / bc1)
        torch.mul(magnitude, direction, out=out).mul_(-rule.lr)
