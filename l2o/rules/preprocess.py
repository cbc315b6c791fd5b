r"""Gradient preprocessing for coordinate-wise learned rules (Andrychowicz et al. 2016, App. A).

Each preprocessor maps a flat gradient :math:`g \in \mathbb{R}^N` to input features of shape
``(F, N)`` (feature-major: one column per coordinate), the layout the LSTM rule computes in.

``none``
    :math:`x = g` (``F = 1``). The paper's choice on quadratics.
``log_sign``
    with :math:`p > 0` (paper: 10), ``F = 2``:

    .. math::
        x = \begin{cases}
            \left(\frac{\log |g|}{p},\ \operatorname{sign}(g)\right) & |g| \ge e^{-p} \\
            \left(-1,\ e^{p} g\right) & \text{otherwise}
        \end{cases}

    which keeps every input in a bounded range for gradients from 1e-30 to 1e30.
``rnnprop``
    Adam-normalised inputs in the spirit of RNNprop (Lv et al. 2017), ``F = 2``. With running
    moments :math:`m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t`, :math:`v_t = \beta_2 v_{t-1} +
    (1-\beta_2) g_t^2` and their bias-corrected :math:`\hat m_t, \hat v_t`:

    .. math:: x = \left(\frac{\hat m_t}{\sqrt{\hat v_t} + \epsilon},\ \frac{g_t}{\sqrt{\hat v_t} + \epsilon}\right)

    Both features are invariant to rescaling the gradient (they lie in about [-1/√(1-β2), +1/√(1-β2)]),
    so the rule sees the same inputs whatever the optimizee's gradient scale. The moments are
    rule state (see :func:`rnnprop_inputs`), so :func:`preprocess` does not compute this one.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["PREPROCESSORS", "RNNPROP_BETAS", "RNNPROP_EPS", "num_features", "preprocess", "rnnprop_inputs"]

PREPROCESSORS = ("none", "log_sign", "rnnprop")
#: Moment decay rates and epsilon of the ``rnnprop`` inputs (RNNprop: beta1 = beta2 = 0.95).
RNNPROP_BETAS = (0.95, 0.95)
RNNPROP_EPS = 1e-8


def num_features(name: str) -> int:
    """Number of input features ``F`` that preprocessor ``name`` produces per coordinate."""
    if name == "none":
        return 1
    if name in ("log_sign", "rnnprop"):
        return 2
    raise ValueError(f"unknown preprocessing {name!r}; choose one of {', '.join(PREPROCESSORS)}")


def preprocess(grad: Tensor, name: str, p: float = 10.0) -> Tensor:
    """Return the ``(F, N)`` input features for the flat gradient ``grad`` of shape ``(N,)``."""
    if name == "none":
        return grad.unsqueeze(0)
    if name == "log_sign":
        threshold = math.exp(-p)
        mag = grad.abs()
        big = mag >= threshold
        # clamp before log so the unused branch never produces inf/NaN gradients
        log_part = torch.where(big, torch.log(mag.clamp_min(threshold)) / p, torch.full_like(grad, -1.0))
        sign_part = torch.where(big, torch.sign(grad), grad * math.exp(p))
        return torch.stack((log_part, sign_part))
    if name == "rnnprop":
        raise ValueError("rnnprop inputs need running moments: use rnnprop_inputs(grad, m, v, step)")
    raise ValueError(f"unknown preprocessing {name!r}; choose one of {', '.join(PREPROCESSORS)}")


def rnnprop_inputs(grad: Tensor, m: Tensor, r: Tensor, step: int, betas: tuple[float, float] = RNNPROP_BETAS,
                   eps: float = RNNPROP_EPS) -> tuple[Tensor, Tensor, Tensor]:
    """The ``rnnprop`` features ``(2, N)`` of the flat ``grad`` and the updated moments ``(m, r)``.

    ``r`` is :math:`\\sqrt{v}`, kept instead of :math:`v` and updated with ``hypot`` so that
    gradients up to the dtype's maximum never overflow :math:`g^2`. ``step`` counts the inner
    steps taken before this one (0 at the first), for the bias correction.
    """
    b1, b2 = betas
    m = m * b1 + grad * (1.0 - b1)
    a, b = r * math.sqrt(b2), grad * math.sqrt(1.0 - b2)
    # hypot's derivative at (0, 0) is 0/0: where both are zero (a coordinate whose gradient has
    # always been 0, e.g. a weight of an always-black MNIST pixel) take hypot(1, 0) instead and
    # select 0, so a second-order meta-gradient stays finite; the values are unchanged
    origin = (a == 0) & (b == 0)
    r = torch.where(origin, torch.zeros_like(a), torch.hypot(torch.where(origin, torch.ones_like(a), a), b))
    t = step + 1
    denom = r / math.sqrt(1.0 - b2 ** t) + eps
    x = torch.stack((m / (1.0 - b1 ** t) / denom, grad / denom))
    return x, m, r
