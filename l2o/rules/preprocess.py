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
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["PREPROCESSORS", "num_features", "preprocess"]

PREPROCESSORS = ("none", "log_sign")


def num_features(name: str) -> int:
    """Number of input features ``F`` that preprocessor ``name`` produces per coordinate."""
    if name == "none":
        return 1
    if name == "log_sign":
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
    raise ValueError(f"unknown preprocessing {name!r}; choose one of {', '.join(PREPROCESSORS)}")
