r"""Small MLPs on MNIST (Andrychowicz et al. 2016, §3.2).

The paper's optimizee is a 784 → 20 (sigmoid) → 10 network trained with cross-entropy on
minibatches of 128 MNIST images, each task starting from fresh random weights:

.. math:: f(\theta; b) = \frac{1}{|b|}\sum_{(x, y) \in b} -\log \operatorname{softmax}(\mathrm{MLP}_\theta(x))_y

An :class:`MLPTask` holds ``num_networks`` independent networks as one batched task (a leading
dimension on every param, like :class:`~optimizees.quadratic.QuadraticTask`), each with its own
minibatches, so evaluating many runs costs one batched forward per step. Variants by argument:
hidden widths (``(40,)``, two layers ``(20, 20)``), activation (sigmoid, ReLU, tanh).

Splits. The :data:`~l2o.tasks.TRAIN` batches are minibatches from the first 50,000 MNIST training
images. The :data:`~l2o.tasks.META` split is a fixed *evaluation set* that no minibatch ever
contains: ``eval_split="val"`` is the last 10,000 training images (for tuning baselines and model
selection), ``eval_split="test"`` is the official 10,000-image test set (for reported numbers).
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from l2o.tasks import META, TRAIN
from l2o.tree import Params
from l2o.validation import check_positive_int

from .data import load_mnist

__all__ = ["ACTIVATIONS", "EVAL_SPLITS", "MNISTData", "MLPTask", "MLPFamily", "NUM_TRAIN"]

ACTIVATIONS = {"sigmoid": torch.sigmoid, "relu": torch.relu, "tanh": torch.tanh}
EVAL_SPLITS = ("val", "test")
#: Training images that minibatches are drawn from; the remaining 10,000 form the "val" split.
NUM_TRAIN = 50_000


def _check_activation(activation: Any) -> None:
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")


def _check_widths(hidden: Any) -> tuple[int, ...]:
    """Hidden-layer widths: a sequence of positive ints."""
    if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Sequence):
        raise TypeError(f"hidden must be a sequence of layer widths such as (20,), got {hidden!r}")
    return tuple(check_positive_int("hidden width", h) for h in hidden)


class MNISTData:
    """MNIST as float tensors in [0, 1], flattened to 784 features, split for l2o.

    ``train_x/train_y`` (50,000, minibatches come from here), ``val_x/val_y`` (the other 10,000
    training images) and ``test_x/test_y`` (the official test set). Load once and share between
    families: the tensors are never modified.
    """

    def __init__(self, data_dir: str | os.PathLike[str] | None = None, *, dataset: str = "mnist",
                 verify: bool = True) -> None:
        images, labels = load_mnist(data_dir, split="train", dataset=dataset, verify=verify)
        test_images, test_labels = load_mnist(data_dir, split="test", dataset=dataset, verify=verify)
        x = images.reshape(len(images), -1).float().div_(255.0)
        self.dataset = dataset
        self.train_x, self.train_y = x[:NUM_TRAIN], labels[:NUM_TRAIN]
        self.val_x, self.val_y = x[NUM_TRAIN:], labels[NUM_TRAIN:]
        self.test_x = test_images.reshape(len(test_images), -1).float().div_(255.0)
        self.test_y = test_labels

    def eval_set(self, split: str) -> tuple[Tensor, Tensor]:
        """The evaluation images and labels of ``split`` (``"val"`` or ``"test"``)."""
        if split == "val":
            return self.val_x, self.val_y
        if split == "test":
            return self.test_x, self.test_y
        raise ValueError(f"eval_split must be one of {', '.join(EVAL_SPLITS)}, got {split!r}")


class MLPTask:
    r"""``num_networks`` independent MLPs :math:`784 \to h_1 \to \dots \to 10` with cross-entropy.

    Params are ``{"w0": (B, 784, h1), "b0": (B, h1), ..., "w{L}": (B, h_L, 10), "b{L}": (B, 10)}``
    with ``B = num_networks``; :meth:`loss` returns one mean cross-entropy per network, ``(B,)``.
    Initial weights are :math:`\mathcal N(0, 1/\text{fan\_in})`, biases zero, drawn per network.

    Args:
        train_x, train_y: the pool minibatches are drawn from (``(N, 784)`` float, ``(N,)`` int64).
        eval_x, eval_y: the fixed evaluation set returned for the :data:`~l2o.tasks.META` split.
        hidden: widths of the hidden layers (paper: ``(20,)``).
        activation: ``"sigmoid"`` (paper), ``"relu"`` or ``"tanh"``.
        batch_size: examples per minibatch (paper: 128).
        num_networks: networks optimised side by side (each with its own init and minibatches).
    """

    def __init__(self, train_x: Tensor, train_y: Tensor, eval_x: Tensor, eval_y: Tensor, *,
                 hidden: Sequence[int] = (20,), activation: str = "sigmoid", batch_size: int = 128,
                 num_networks: int = 1) -> None:
        _check_activation(activation)
        for name, t in (("train_x", train_x), ("train_y", train_y), ("eval_x", eval_x), ("eval_y", eval_y)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
        for name, t in (("train_x", train_x), ("eval_x", eval_x)):
            if not t.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor (images in [0, 1]), got {t.dtype}")
        for name, t in (("train_y", train_y), ("eval_y", eval_y)):
            if t.dtype != torch.int64:
                raise TypeError(f"{name} must be an int64 tensor of class labels 0..9, got {t.dtype}")
        if train_x.dim() != 2 or train_y.shape != train_x.shape[:1]:
            raise ValueError(f"expected train_x (N, features) and train_y (N,), got {tuple(train_x.shape)} "
                             f"and {tuple(train_y.shape)}")
        if eval_x.dim() != 2 or eval_y.shape != eval_x.shape[:1] or eval_x.shape[1] != train_x.shape[1]:
            raise ValueError(f"expected eval_x (M, {train_x.shape[1]}) and eval_y (M,), got {tuple(eval_x.shape)} "
                             f"and {tuple(eval_y.shape)}")
        if len(train_x) == 0 or len(eval_x) == 0:
            raise ValueError(f"train_x and eval_x must hold at least one example each, got {len(train_x)} and "
                             f"{len(eval_x)}")
        for name, t in (("train_y", train_y), ("eval_y", eval_y)):
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi >= 10:
                raise ValueError(f"{name} must hold class labels in 0..9, found values in {lo}..{hi}")
        self.hidden = _check_widths(hidden)
        self.activation = activation
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.num_networks = check_positive_int("num_networks", num_networks)
        self.train_x, self.train_y, self.eval_x, self.eval_y = train_x, train_y, eval_x, eval_y
        self.widths = (train_x.shape[1], *self.hidden, 10)

    def init(self, generator: torch.Generator) -> Params:
        params: Params = {}
        B, dtype = self.num_networks, self.train_x.dtype
        for k, (n_in, n_out) in enumerate(zip(self.widths[:-1], self.widths[1:])):
            w = torch.randn(B, n_in, n_out, generator=generator, dtype=dtype) / math.sqrt(n_in)
            params[f"w{k}"] = w.to(self.train_x.device)
            params[f"b{k}"] = torch.zeros(B, n_out, dtype=dtype, device=self.train_x.device)
        return params

    def sample_batch(self, split: str, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``TRAIN``: a minibatch per network, ``(B, batch_size, 784)``; ``META``: the evaluation set."""
        if split == TRAIN:
            idx = torch.randint(len(self.train_x), (self.num_networks, self.batch_size), generator=generator)
            idx = idx.to(self.train_x.device)
            return self.train_x[idx], self.train_y[idx]
        if split == META:
            return self.eval_x, self.eval_y
        raise ValueError(f"split must be {TRAIN!r} or {META!r}, got {split!r}")

    def logits(self, params: Params, x: Tensor) -> Tensor:
        """Logits ``(B, n, 10)`` for inputs ``(B, n, 784)`` (per-network) or ``(n, 784)`` (shared)."""
        act = ACTIVATIONS[self.activation]
        h = x
        last = len(self.widths) - 2
        for k in range(last + 1):
            h = torch.matmul(h, params[f"w{k}"]) + params[f"b{k}"].unsqueeze(-2)
            if k < last:
                h = act(h)
        return h

    def loss(self, params: Params, batch: tuple[Tensor, Tensor]) -> Tensor:
        """Mean cross-entropy of each network on its batch, shape ``(B,)``."""
        x, y = batch
        logits = self.logits(params, x)
        B, n = logits.shape[0], logits.shape[1]
        target = y.expand(B, n) if y.dim() == 1 else y
        return F.cross_entropy(logits.reshape(B * n, -1), target.reshape(-1), reduction="none").reshape(B, n).mean(1)

    @torch.no_grad()
    def accuracy(self, params: Params, batch: tuple[Tensor, Tensor]) -> Tensor:
        """Fraction of correct predictions of each network on ``batch``, shape ``(B,)``."""
        x, y = batch
        pred = self.logits(params, x).argmax(-1)
        return (pred == y).float().mean(-1)


class MLPFamily:
    """Samples :class:`MLPTask` batches of MNIST MLPs (see the module docstring for the splits).

    Args:
        data: an :class:`MNISTData`, or ``None`` to load one from ``data_dir`` / ``$L2O_DATA``.
        data_dir: where the MNIST files are (used when ``data`` is None).
        hidden, activation, batch_size: the network (paper: ``(20,)``, sigmoid, 128).
        num_networks: networks per task (1 in the paper's meta-training; more for evaluation).
        eval_split: what the :data:`~l2o.tasks.META` split evaluates on, ``"val"`` or ``"test"``.
    """

    def __init__(self, data: MNISTData | None = None, *, data_dir: str | os.PathLike[str] | None = None,
                 hidden: Sequence[int] = (20,), activation: str = "sigmoid", batch_size: int = 128,
                 num_networks: int = 1, eval_split: str = "val") -> None:
        _check_activation(activation)
        if not isinstance(eval_split, str) or eval_split not in EVAL_SPLITS:
            raise ValueError(f"eval_split must be one of {', '.join(EVAL_SPLITS)}, got {eval_split!r}")
        if isinstance(hidden, int):
            raise ValueError(f"hidden must be a non-empty sequence of widths such as (20,), got {hidden!r}")
        self.hidden = _check_widths(hidden)
        if not self.hidden:
            raise ValueError(f"hidden must be a non-empty sequence of widths such as (20,), got {hidden!r}")
        if data is not None and not isinstance(data, MNISTData):
            raise TypeError(f"data must be an MNISTData (or None to load one from data_dir), got {type(data).__name__}")
        self.activation = activation
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.num_networks = check_positive_int("num_networks", num_networks)
        self.eval_split = eval_split
        self.data = data if data is not None else MNISTData(data_dir)
        self.name = "mnist" if (self.hidden, activation) == ((20,), "sigmoid") else \
            f"mnist-{'x'.join(map(str, self.hidden))}-{activation}"

    def sample(self, generator: torch.Generator, num_networks: int | None = None) -> MLPTask:
        """A task of ``num_networks`` (default: the family's) fresh networks; draws nothing else."""
        b = self.num_networks if num_networks is None else check_positive_int("num_networks", num_networks)
        eval_x, eval_y = self.data.eval_set(self.eval_split)
        return MLPTask(self.data.train_x, self.data.train_y, eval_x, eval_y, hidden=self.hidden,
                       activation=self.activation, batch_size=self.batch_size, num_networks=b)

    def with_eval_split(self, eval_split: str) -> "MLPFamily":
        """The same family (same data, no reload) evaluating on another split."""
        return MLPFamily(self.data, hidden=self.hidden, activation=self.activation, batch_size=self.batch_size,
                         num_networks=self.num_networks, eval_split=eval_split)

    def config(self) -> dict[str, Any]:
        return {"dataset": self.data.dataset, "hidden": list(self.hidden), "activation": self.activation,
                "batch_size": self.batch_size, "num_networks": self.num_networks, "eval_split": self.eval_split}
