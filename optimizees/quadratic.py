r"""Random quadratics (Andrychowicz et al. 2016, §3.1).

.. math:: f(\theta) = \lVert W\theta - y \rVert_2^2,\qquad W_{ij}, y_i \sim \mathcal N(0, 1)

with :math:`W \in \mathbb R^{d\times d}`, :math:`y \in \mathbb R^d` (paper: :math:`d = 10`). A
:class:`QuadraticTask` holds ``num_functions`` independent quadratics as one batched task: params
``{"theta": (num_functions, d)}`` and a loss vector with one entry per function.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from l2o.tree import Params
from l2o.validation import check_float_dtype, check_hyperparameter, check_positive_int

__all__ = ["QuadraticTask", "QuadraticFamily"]


class QuadraticTask:
    """A batch of quadratics :math:`f_b(\\theta_b) = \\lVert W_b\\theta_b - y_b\\rVert^2`.

    Args:
        W: ``(B, d, d)`` matrices.
        y: ``(B, d)`` targets.
        init_std: standard deviation of the Gaussian initial θ (paper's code: 0.01).
    """

    def __init__(self, W: Tensor, y: Tensor, init_std: float = 0.01) -> None:
        for name, t in (("W", W), ("y", y)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
        if W.dim() != 3 or W.shape[1] != W.shape[2] or y.shape != W.shape[:2]:
            raise ValueError(f"expected W of shape (B, d, d) and y of shape (B, d), got {tuple(W.shape)} and {tuple(y.shape)}")
        if W.numel() == 0:
            raise ValueError(f"W and y must hold at least one quadratic of dimension >= 1, got W of shape {tuple(W.shape)}")
        if not W.is_floating_point() or W.dtype != y.dtype or W.device != y.device:
            raise TypeError(f"W and y must be floating-point tensors of the same dtype and device, got {W.dtype} on "
                            f"{W.device} and {y.dtype} on {y.device}")
        self.W = W
        self.y = y
        self.init_std = check_hyperparameter("init_std", init_std)

    @property
    def num_functions(self) -> int:
        return self.W.shape[0]

    @property
    def dim(self) -> int:
        return self.W.shape[1]

    def init(self, generator: torch.Generator) -> Params:
        theta = torch.randn(self.y.shape, generator=generator, dtype=self.y.dtype) * self.init_std
        return {"theta": theta.to(self.y.device)}

    def sample_batch(self, split: str, generator: torch.Generator) -> None:
        return None  # deterministic: no data to sample

    def loss(self, params: Params, batch: Any = None) -> Tensor:
        """One loss per function, shape ``(B,)``."""
        r = torch.bmm(self.W, params["theta"].unsqueeze(-1)).squeeze(-1) - self.y
        return (r * r).sum(-1)

    def loss_and_grads(self, params: Params, batch: Any = None) -> tuple[Tensor, Params]:
        r"""The losses and their sum's gradient in closed form, :math:`\nabla f_b = 2 W_b^\top (W_b\theta_b - y_b)`
        (what the unroll engine uses instead of autograd in first order)."""
        r = torch.bmm(self.W, params["theta"].unsqueeze(-1)).squeeze(-1) - self.y
        grad = torch.bmm(r.unsqueeze(1), self.W).squeeze(1).mul_(2.0)
        return (r * r).sum(-1), {"theta": grad}

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "QuadraticTask":
        """A copy of the task on another device and/or dtype."""
        return QuadraticTask(self.W.to(device=device, dtype=dtype), self.y.to(device=device, dtype=dtype), self.init_std)


class QuadraticFamily:
    """Samples :class:`QuadraticTask` batches of ``num_functions`` random ``dim``-dimensional quadratics."""

    name = "quadratic"

    def __init__(self, dim: int = 10, num_functions: int = 128, init_std: float = 0.01,
                 dtype: torch.dtype = torch.float32) -> None:
        self.dim = check_positive_int("dim", dim)
        self.num_functions = check_positive_int("num_functions", num_functions)
        self.init_std = check_hyperparameter("init_std", init_std)
        self.dtype = check_float_dtype("dtype", dtype)

    def sample(self, generator: torch.Generator, num_functions: int | None = None) -> QuadraticTask:
        """Draw a task; ``num_functions`` overrides the family's default batch size."""
        b = self.num_functions if num_functions is None else check_positive_int("num_functions", num_functions)
        W = torch.randn(b, self.dim, self.dim, generator=generator, dtype=self.dtype)
        y = torch.randn(b, self.dim, generator=generator, dtype=self.dtype)
        return QuadraticTask(W, y, self.init_std)

    def config(self) -> dict[str, Any]:
        return {"dim": self.dim, "num_functions": self.num_functions, "init_std": self.init_std}
