r"""The task distribution a generalist learned optimizer is meta-trained on (``l2o meta-train --task
generalist``): a :class:`~l2o.families.TaskMixture` of small models, each task with its own
architecture, batch size and initialisation scale, all drawn from the task's generator.

======================  ========================================================================
component               tasks
======================  ========================================================================
``mnist-mlp``           MLPs on MNIST: 1-3 hidden layers of 16-128 units, ReLU / tanh / GELU /
                        sigmoid / ELU, batches of 32 or 128
``mnist-conv``          convnets on MNIST: 1-2 stride-2 3x3 conv layers of 4-16 channels, a
                        linear read-out, batches of 32 or 64
``omniglot-conv``       the same convnets classifying 5, 10 or 20 Omniglot characters of the
                        meta-training split (15 drawings each to train on, 5 held out)
``markov-gru``          a GRU language model on a random Markov chain per task
                        (:mod:`optimizees.sequence`)
``quadratic``           a random 20-d least-squares problem (:mod:`optimizees.quadratic`)
======================  ========================================================================

Not in the default mixture, chosen with ``components=`` (``l2o meta-train --components``):

======================  ========================================================================
``mnist-mlp-deep``      deeper MLPs on MNIST: 4-6 hidden layers of 32 or 64 units, ReLU / GELU /
                        tanh, PyTorch's initialisation, batches of 32 or 128
``markov-transformer``  a 1-2 block decoder-only Transformer (width 32, 2 heads, GPT-2's
                        initialisation, :mod:`optimizees.transformer`) on a random Markov chain
                        over 32 tokens per task, 32-token sequences
``zipf-transformer``    a 1-block Transformer (width 64, 4 heads) on a Zipf-skewed Markov chain
                        over 64 or 128 tokens per task (a text-like unigram distribution: a few
                        frequent tokens, many rare ones), 32-token sequences, batches of 8
``omniglot-normconv``   ``omniglot-conv``'s convnets with a normalisation layer after every conv,
                        BatchNorm (batch statistics in training) or LayerNorm over channels and
                        positions (``GroupNorm(1, C)``), drawn per task; Omniglot only, so that no
                        MNIST model with normalisation layers is in the mixture
======================  ========================================================================

Every image model's initial weights are its module's own initialisation times a log-uniform
scale in [0.5, 2], except the deeper MLPs', which keep PyTorch's (a factor of 2 over 7 layers would
blow up their outputs). Every task has held-out data, which its ``meta`` split samples minibatches of
(so a meta-loss can reward what generalises). Data: the first 50,000 MNIST training images
(minibatches; the held-out set is 1000 of the other 10,000 training images) and the Omniglot characters of the
meta-training split (:func:`optimizees.omniglot.split_characters`, ``"train"``). No test image
(MNIST's test set, Omniglot's held-out characters) is in any task.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from l2o.families import ModuleFamily, TaskMixture
from l2o.tasks import META, TRAIN

from .mlp import MNISTData
from .omniglot import split_characters
from .omniglot_files import load_omniglot
from .quadratic import QuadraticFamily
from .sequence import sequence_family

__all__ = ["generalist_family", "COMPONENTS", "OPTIONAL_COMPONENTS", "random_mlp", "random_convnet"]

#: The components of the default mixture and their weights.
COMPONENTS: dict[str, float] = {"mnist-mlp": 3.0, "mnist-conv": 2.0, "omniglot-conv": 2.0, "markov-gru": 2.0,
                                "quadratic": 1.0}
#: Components that ``components=`` may add to the default ones.
OPTIONAL_COMPONENTS: tuple[str, ...] = ("mnist-mlp-deep", "markov-transformer", "zipf-transformer",
                                        "omniglot-normconv")
#: The normalisation layers ``random_convnet(norm="draw")`` draws from, by name.
_NORMS: dict[str, Callable[[int], nn.Module]] = {"batch": nn.BatchNorm2d, "layer": lambda c: nn.GroupNorm(1, c)}

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU,
                                                    "sigmoid": nn.Sigmoid, "elu": nn.ELU}
_INIT_SCALE = (0.5, 2.0)
#: Held-out examples per ``meta`` minibatch.
META_BATCH = 128
_HELD_OUT_IMAGES = 1000


def _choice(options: tuple[Any, ...], generator: torch.Generator) -> Any:
    return options[int(torch.randint(len(options), (), generator=generator))]


def random_mlp(inputs: int, classes: int, generator: torch.Generator, *, depths: tuple[int, ...] = (1, 2, 3),
               widths: tuple[int, ...] = (16, 32, 64, 128),
               activations: tuple[str, ...] = tuple(_ACTIVATIONS)) -> nn.Module:
    """An MLP whose number of hidden layers, their width and the activation are drawn from
    ``generator`` (by default 1-3 layers of 16-128 units, any of :data:`_ACTIVATIONS`)."""
    for name, options in (("depths", depths), ("widths", widths), ("activations", activations)):
        if not options:
            raise ValueError(f"{name} is empty; give at least one choice")
    unknown = sorted(set(activations) - set(_ACTIVATIONS))
    if unknown:
        raise ValueError(f"unknown activations {unknown}; choose from {', '.join(_ACTIVATIONS)}")
    depth = _choice(depths, generator)
    width = _choice(widths, generator)
    act = _ACTIVATIONS[_choice(activations, generator)]
    layers: list[nn.Module] = [nn.Flatten()]
    n = inputs
    for _ in range(depth):
        layers += [nn.Linear(n, width), act()]
        n = width
    layers.append(nn.Linear(n, classes))
    return nn.Sequential(*layers)


def random_convnet(classes: int, generator: torch.Generator, *, norm: str | None = None) -> nn.Module:
    """1-2 stride-2 3x3 conv layers of 4-16 channels (activation drawn too) and a linear read-out,
    on ``(B, 1, 28, 28)`` images. ``norm``: ``None`` (no normalisation), ``"batch"``, ``"layer"``
    (``GroupNorm(1, C)``) after every conv, or ``"draw"`` (one of the two, drawn after the rest)."""
    if norm is not None and norm != "draw" and norm not in _NORMS:
        raise ValueError(f"norm must be None, 'draw' or one of {', '.join(map(repr, _NORMS))}; got {norm!r}")
    depth = _choice((1, 2), generator)
    channels = _choice((4, 8, 16), generator)
    act = _ACTIVATIONS[_choice(("relu", "tanh", "gelu", "elu"), generator)]
    if norm == "draw":
        norm = _choice(tuple(_NORMS), generator)
    layers: list[nn.Module] = []
    c, size = 1, 28
    for _ in range(depth):
        layers += [nn.Conv2d(c, channels, 3, stride=2, padding=1), *([_NORMS[norm](channels)] if norm else []), act()]
        c, size = channels, (size + 1) // 2
    layers += [nn.Flatten(), nn.Linear(c * size * size, classes)]
    return nn.Sequential(*layers)


class _ImageBatches:
    """Minibatches of ``batch_size`` from ``(x, y)`` for ``train``, and for ``meta`` minibatches of
    at most :data:`META_BATCH` from the held-out set ``held_out`` (what a meta-loss on held-out
    data reads at every inner step; ``held_out`` is the whole set, for evaluations)."""

    def __init__(self, x: Tensor, y: Tensor, held_out: tuple[Tensor, Tensor], batch_size: int) -> None:
        self.x, self.y, self.held_out, self.batch_size = x, y, held_out, batch_size

    def __call__(self, split: str, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        if split == TRAIN:
            idx = torch.randint(len(self.x), (self.batch_size,), generator=generator)
            return self.x[idx], self.y[idx]
        if split == META:
            n = len(self.held_out[0])
            if n <= META_BATCH:
                return self.held_out
            idx = torch.randint(n, (META_BATCH,), generator=generator)
            return self.held_out[0][idx], self.held_out[1][idx]
        raise ValueError(f"split must be {TRAIN!r} or {META!r}, got {split!r}")


class _OmniglotCharacters(ModuleFamily):
    """Convnets classifying ``ways`` characters of the meta-training split, drawn per task (with
    ``norm``, :func:`random_convnet`'s normalisation layers)."""

    def __init__(self, images: Tensor, ways: int, batch_size: int, norm: str | None = None) -> None:
        super().__init__(lambda g: random_convnet(ways, g, norm=norm), _no_shared_batches, F.cross_entropy,
                         name=f"omniglot-{'norm' if norm else ''}conv-{ways}way", init_scale=_INIT_SCALE)
        self.images, self.ways, self.batch_size, self.norm = images, ways, batch_size, norm

    def task_batches(self, generator: torch.Generator) -> _ImageBatches:
        chars = torch.randperm(len(self.images), generator=generator)[:self.ways]
        x = self.images[chars].float().div_(255.0).unsqueeze(2)  # (ways, 20, 1, 28, 28)
        y = torch.arange(self.ways).unsqueeze(1).expand(self.ways, x.shape[1])
        train = (x[:, :15].reshape(-1, 1, 28, 28), y[:, :15].reshape(-1))
        held_out = (x[:, 15:].reshape(-1, 1, 28, 28), y[:, 15:].reshape(-1))
        return _ImageBatches(*train, held_out, self.batch_size)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "ways": self.ways, "batch_size": self.batch_size,
                **({"norm": self.norm} if self.norm else {})}


def _no_shared_batches(split: str, generator: torch.Generator) -> Any:  # pragma: no cover - never called
    raise RuntimeError("every task of this family samples its batches from its own data")


def generalist_family(data_dir: str | os.PathLike[str] | None = None, *,
                      components: dict[str, float] | None = None) -> TaskMixture:
    """The mixture of the module docstring (weights :data:`COMPONENTS`, or ``components``: names
    from :data:`COMPONENTS` and :data:`OPTIONAL_COMPONENTS` with their weights).

    Reads MNIST and (for ``omniglot-conv`` and ``omniglot-normconv``) Omniglot from ``data_dir`` or ``$L2O_DATA``.
    """
    weights = dict(COMPONENTS if components is None else components)
    known = (*COMPONENTS, *OPTIONAL_COMPONENTS)
    unknown = sorted(set(weights) - set(known))
    if unknown:
        raise ValueError(f"unknown components {unknown}; choose from {', '.join(known)}")
    if not weights:
        raise ValueError(f"components is empty; name at least one of {', '.join(known)}")
    families, w = [], []

    def add(family: Any, weight: float) -> None:
        families.append(family)
        w.append(weight)

    if {"mnist-mlp", "mnist-mlp-deep", "mnist-conv"} & set(weights):
        mnist = MNISTData(data_dir)
        images = mnist.train_x.reshape(-1, 1, 28, 28)
        held_out = (mnist.val_x[:_HELD_OUT_IMAGES].reshape(-1, 1, 28, 28), mnist.val_y[:_HELD_OUT_IMAGES])
        for b in (32, 128):
            if "mnist-mlp" in weights:
                add(ModuleFamily(lambda g: random_mlp(784, 10, g), _ImageBatches(images, mnist.train_y, held_out, b),
                                 F.cross_entropy, name=f"mnist-mlp-b{b}", init_scale=_INIT_SCALE),
                    weights["mnist-mlp"] / 2)
            if "mnist-mlp-deep" in weights:
                add(ModuleFamily(lambda g: random_mlp(784, 10, g, depths=(4, 5, 6), widths=(32, 64),
                                                      activations=("relu", "gelu", "tanh")),
                                 _ImageBatches(images, mnist.train_y, held_out, b), F.cross_entropy,
                                 name=f"mnist-mlp-deep-b{b}"), weights["mnist-mlp-deep"] / 2)
        for b in (32, 64):
            if "mnist-conv" in weights:
                add(ModuleFamily(lambda g: random_convnet(10, g), _ImageBatches(images, mnist.train_y, held_out, b),
                                 F.cross_entropy, name=f"mnist-conv-b{b}", init_scale=_INIT_SCALE),
                    weights["mnist-conv"] / 2)
    if "omniglot-conv" in weights or "omniglot-normconv" in weights:
        omniglot = load_omniglot(data_dir)
        train_chars = split_characters(len(omniglot.characters), "train")
        images = omniglot.images[train_chars.start:train_chars.stop]
        for name, norm in (("omniglot-conv", None), ("omniglot-normconv", "draw")):
            if name in weights:
                for ways in (5, 10, 20):
                    add(_OmniglotCharacters(images, ways, 32, norm), weights[name] / 3)
    if "markov-gru" in weights:
        for hidden in (16, 32):
            add(sequence_family(hidden=hidden, init_scale=_INIT_SCALE), weights["markov-gru"] / 2)
    if "markov-transformer" in weights:
        for layers in (1, 2):
            add(sequence_family(model="transformer", vocab=32, hidden=32, length=32, layers=layers, heads=2,
                                init_scale=_INIT_SCALE), weights["markov-transformer"] / 2)
    if "zipf-transformer" in weights:
        for vocab in (64, 128):
            add(sequence_family(model="transformer", vocab=vocab, hidden=64, length=32, layers=1, heads=4,
                                batch_size=8, temperature=1.0, zipf=1.0, init_scale=_INIT_SCALE),
                weights["zipf-transformer"] / 2)
    if "quadratic" in weights:
        add(QuadraticFamily(dim=20, num_functions=1), weights["quadratic"])
    return TaskMixture(families, w, name="generalist")
