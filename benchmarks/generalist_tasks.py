r"""The held-out tasks of the generalist suite (``benchmarks/generalist.py``): data, models, losses.

Each task is a model a user might write, trained with an ordinary ``torch.optim`` loop on real data:

=====================  ====================================================================  ===============
task                   model                                                                 data
=====================  ====================================================================  ===============
``mnist-convnet``      PyTorch's MNIST example, narrowed: 2 conv (3x3, 8/16 channels, each    MNIST
                       followed by 2x2 max-pooling) + 2 fully connected layers, dropout 0.25
                       and 0.5, batch 64
``char-gpt``           GPT-2-style decoder: 2 pre-LayerNorm blocks, n_embd 64, 4 heads,       Python's reference
                       causal self-attention, GELU MLP (4x), tied embeddings, context 64      docs (stdlib
                                                                                             ``pydoc_data``)
``mnist-deep-mlp``     8 linear layers (784-48x7-10), ReLU, PyTorch's default init            MNIST
``fashion-bn-convnet`` 3 conv blocks (conv 3x3 with stride 2, BatchNorm, ReLU) + linear        Fashion-MNIST
``fashion-resmlp``     residual MLP: 784 -> 48, 2 pre-LayerNorm blocks (48-96-48, GELU),      Fashion-MNIST
                       LayerNorm, -> 10
``mnist-autoencoder``  784-48-16-48-784 ReLU autoencoder, sigmoid output, binary cross-       MNIST
                       entropy per pixel (a regression-style loss, not a classifier)
``mnist-row-lstm``     one-layer LSTM (hidden 64) reading an image as 28 rows of 28 pixels,   MNIST
                       linear head on the last hidden state
=====================  ====================================================================  ===============

Two further tasks run only when named (``--tasks``): ``mnist-bn-convnet`` and ``mnist-resmlp``, the
two Fashion-MNIST models on MNIST, so that a machine without Fashion-MNIST can still measure the
BatchNorm convnet and the LayerNorm residual MLP (MNIST is the easier data set, so their ratios are
not the Fashion tasks' ratios).

Splits. Image tasks train on minibatches of the first 50,000 training images, tune baselines on the
other 10,000 (``val``) and report the official 10,000 test images (``test``), as
:class:`optimizees.mlp.MNISTData` splits them. The text task takes the topics of
``pydoc_data.topics`` (the help texts of Python's language reference, shipped with every CPython) in
sorted order: every 10th topic is ``test``, every 10th shifted by 5 is ``val``, the rest is
training text. Characters are mapped to a fixed 97-symbol vocabulary (newline, the 95 printable ASCII
characters, one "other"), so the vocabulary does not depend on the corpus.

Nothing is downloaded: MNIST comes from the data directory (``--data`` / ``$L2O_DATA``), Fashion-MNIST
from it or from Debian's ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``). A task
whose data is missing raises :class:`MissingData` with what is missing and how to get it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from optimizees.data import DataError
from optimizees.mlp import MNISTData

__all__ = ["MissingData", "Splits", "Task", "TASKS", "EXTRA_TASKS", "ALL_TASKS", "DEBIAN_FASHION_DIR", "load_text",
           "VOCAB_SIZE", "task_names_error"]

#: Where Debian's ``dataset-fashion-mnist`` package installs the Fashion-MNIST files.
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # the normalisation of PyTorch's MNIST example
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530
BLOCK = 64  # the character model's context length
_TEXT_VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))
VOCAB_SIZE = len(_TEXT_VOCAB) + 1  # + "other"
_CHAR_INDEX = {c: i for i, c in enumerate(_TEXT_VOCAB)}


class MissingData(RuntimeError):
    """The data a task needs is not on this machine (the message says what is missing and how to get it)."""


@dataclass
class Splits:
    """One task's data: a training sampler and fixed evaluation sets.

    Attributes:
        batch: ``batch(generator) -> (inputs, targets)``, one training minibatch.
        val: evaluation chunks ``[(inputs, targets)]`` from held-out training data (tuning only).
        test: evaluation chunks from the test split (the reported held-out loss).
        test_curve: a fixed subset of ``test`` evaluated along the run (the held-out curve).
        train_eval: evaluation chunks from the training data (the reported final training loss).
        source: where the data came from (recorded in the JSON).
    """

    batch: Callable[[torch.Generator], tuple[Tensor, Tensor]]
    val: list[tuple[Tensor, Tensor]]
    test: list[tuple[Tensor, Tensor]]
    test_curve: list[tuple[Tensor, Tensor]]
    train_eval: list[tuple[Tensor, Tensor]]
    source: str


@dataclass(frozen=True)
class Task:
    """A held-out task.

    Attributes:
        name: the task's name (``--tasks``).
        title: one line for tables and figures.
        model: what it trains, in words.
        data: the data set, in words.
        held_out: why no meta-training task resembles it.
        steps: training steps of a full run (every task: at least 2000).
        batch_size: examples (or sequences) per minibatch.
        make_model: builds a freshly initialised model (under the caller's ``torch.manual_seed``).
        loss: ``loss(model, inputs, targets) -> scalar``.
        load: ``load(data_dir, fast, batch_size) -> Splits``; raises :class:`MissingData`.
        log_y: whether its loss curves read better on a log scale.
    """

    name: str
    title: str
    model: str
    data: str
    held_out: str
    steps: int
    batch_size: int
    make_model: Callable[[], nn.Module]
    loss: Callable[[nn.Module, Tensor, Tensor], Tensor]
    load: Callable[[Path | None, bool, int], Splits]
    log_y: bool = True


# -- data -----------------------------------------------------------------------------------------------------------

def _chunks(x: Tensor, y: Tensor, size: int = 1000) -> list[tuple[Tensor, Tensor]]:
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


_IMAGE_CACHE: dict[tuple[str, str], MNISTData] = {}
_PREPARED: dict[tuple[Any, ...], tuple[Tensor, Tensor, Tensor]] = {}


def _image_data(data_dir: Path | None, dataset: str) -> MNISTData:
    """MNIST or Fashion-MNIST (:class:`MNISTData`: 50k train, 10k val, 10k test, flattened in [0, 1])."""
    candidates = [data_dir] if data_dir is not None else []
    if dataset == "fashion-mnist":
        candidates.append(DEBIAN_FASHION_DIR)
    errors = []
    for d in candidates:
        key = (str(d), dataset)
        if key in _IMAGE_CACHE:
            return _IMAGE_CACHE[key]
        try:
            data = MNISTData(d, dataset=dataset)
        except DataError as exc:
            errors.append(str(exc).splitlines()[0])
            continue
        _IMAGE_CACHE[key] = data
        return data
    where = ", ".join(str(d) for d in candidates) or "no data directory (give --data DIR or set L2O_DATA)"
    if dataset == "fashion-mnist":
        how = ("Fashion-MNIST is not on this machine: `apt-get install dataset-fashion-mnist` installs it to "
               f"{DEBIAN_FASHION_DIR}, or put its four IDX files in DIR/fashion-mnist/")
    else:
        how = "MNIST is not on this machine: put its four IDX files in DIR/mnist/ and give --data DIR (or L2O_DATA)"
    raise MissingData(f"{how} (searched {where}: {'; '.join(errors) or 'nothing to search'})")


def _image_splits(dataset: str, shape: tuple[int, ...], mean: float, std: float, normalise: bool = True,
                  autoencoder: bool = False) -> Callable[[Path | None, bool, int], Splits]:
    def load(data_dir: Path | None, fast: bool, batch_size: int) -> Splits:
        d = _image_data(data_dir, dataset)
        key = (id(d), mean, std, normalise)
        if key not in _PREPARED:  # normalised once per data set and normalisation, shared by the tasks
            _PREPARED[key] = tuple((x - mean) / std if normalise else x for x in (d.train_x, d.val_x, d.test_x))
        train_x, val_x, test_x = (x.reshape(len(x), *shape) for x in _PREPARED[key])
        train_y, val_y, test_y = d.train_y, d.val_y, d.test_y
        if autoencoder:  # targets are the (unnormalised) pixels themselves
            train_y, val_y, test_y = d.train_x, d.val_x, d.test_x
        n_val, n_test, n_curve, n_train = (128, 256, 128, 128) if fast else (10_000, 10_000, 2000, 5000)
        n = len(train_x)

        def batch(gen: torch.Generator) -> tuple[Tensor, Tensor]:
            idx = torch.randint(n, (batch_size,), generator=gen)
            return train_x[idx], train_y[idx]

        return Splits(batch=batch, val=_chunks(val_x[:n_val], val_y[:n_val]),
                      test=_chunks(test_x[:n_test], test_y[:n_test]),
                      test_curve=_chunks(test_x[:n_curve], test_y[:n_curve]),
                      train_eval=_chunks(train_x[:n_train], train_y[:n_train]),
                      source=f"{d.dataset} via optimizees.mlp.MNISTData")
    return load


def load_text() -> tuple[dict[str, str], str]:
    """The train/val/test texts of the character task and the file they come from.

    The topics of ``pydoc_data.topics`` (Python's language-reference help texts), sorted by key;
    topic ``i`` goes to ``test`` when ``i % 10 == 0``, to ``val`` when ``i % 10 == 5``, else to
    ``train``; topics are joined with blank lines.
    """
    try:
        import pydoc_data.topics as topics
    except ImportError as exc:  # pragma: no cover - stripped Python builds
        raise MissingData(f"this Python has no pydoc_data.topics (its reference docs) to read text from ({exc})")
    keys = sorted(topics.topics)
    parts: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for i, key in enumerate(keys):
        parts["test" if i % 10 == 0 else "val" if i % 10 == 5 else "train"].append(topics.topics[key])
    return {k: "\n\n".join(v) for k, v in parts.items()}, str(Path(topics.__file__).resolve())


def encode(text: str) -> Tensor:
    """Character ids in the fixed vocabulary (unknown characters map to the last id)."""
    other = VOCAB_SIZE - 1
    return torch.tensor([_CHAR_INDEX.get(c, other) for c in text], dtype=torch.long)


def _text_splits(data_dir: Path | None, fast: bool, batch_size: int) -> Splits:
    texts, source = load_text()
    ids = {k: encode(v) for k, v in texts.items()}
    train = ids["train"]
    n = len(train) - BLOCK - 1

    def windows(seq: Tensor, count: int) -> tuple[Tensor, Tensor]:
        count = min(count, (len(seq) - 1) // BLOCK)
        x = seq[:count * BLOCK].reshape(count, BLOCK)
        y = seq[1:count * BLOCK + 1].reshape(count, BLOCK)
        return x, y

    def batch(gen: torch.Generator) -> tuple[Tensor, Tensor]:
        start = torch.randint(n, (batch_size, 1), generator=gen)
        idx = start + torch.arange(BLOCK + 1)
        seq = train[idx]
        return seq[:, :-1], seq[:, 1:]

    n_val, n_test, n_curve, n_train = (8, 16, 8, 8) if fast else (10**9, 10**9, 128, 256)
    test_x, test_y = windows(ids["test"], n_test)
    return Splits(batch=batch, val=_chunks(*windows(ids["val"], n_val), size=128),
                  test=_chunks(test_x, test_y, size=128), test_curve=_chunks(*windows(ids["test"], n_curve), size=128),
                  train_eval=_chunks(*windows(train, n_train), size=128),
                  source=f"{source} ({len(texts['train'])}/{len(texts['val'])}/{len(texts['test'])} characters "
                         "train/val/test)")


# -- models ---------------------------------------------------------------------------------------------------------

class ConvNet(nn.Module):
    """PyTorch's MNIST example (2 conv + 2 fully connected layers with dropout 0.25 and 0.5), narrowed to
    8/16 channels and 64 hidden units with a max-pool after each convolution (28k parameters, not 1.2M)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3)
        self.conv2 = nn.Conv2d(8, 16, 3)
        self.dropout1 = nn.Dropout(0.25)
        self.fc1 = nn.Linear(16 * 5 * 5, 64)
        self.dropout2 = nn.Dropout(0.5)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # 28 -> 26 -> 13
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # 13 -> 11 -> 5
        x = self.dropout1(torch.flatten(x, 1))
        x = self.dropout2(F.relu(self.fc1(x)))
        return self.fc2(x)


def bn_convnet() -> nn.Module:
    """Three blocks of a 3x3 convolution with stride 2, BatchNorm and ReLU (8, 16, 32 channels;
    28 -> 14 -> 7 -> 4), then a linear layer: an all-convolutional net without pooling."""
    layers: list[nn.Module] = []
    for c_in, c_out in ((1, 8), (8, 16), (16, 32)):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(32 * 4 * 4, 10))


def deep_mlp(width: int = 48, layers: int = 8) -> nn.Module:
    """``layers`` linear layers 784 -> width x (layers - 1) -> 10 with ReLU between them."""
    sizes = [784] + [width] * (layers - 1) + [10]
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        mods.append(nn.Linear(a, b))
        if i < layers - 1:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)


class ResBlock(nn.Module):
    """``x + W2 GELU(W1 LayerNorm(x))`` (a pre-norm residual MLP block)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


def res_mlp(dim: int = 48, hidden: int = 96, blocks: int = 2) -> nn.Module:
    """784 -> dim, ``blocks`` residual blocks, LayerNorm, -> 10."""
    return nn.Sequential(nn.Linear(784, dim), *[ResBlock(dim, hidden) for _ in range(blocks)], nn.LayerNorm(dim),
                         nn.Linear(dim, 10))


def autoencoder() -> nn.Module:
    """784-48-16-48-784 with ReLU; outputs logits of the pixel intensities."""
    return nn.Sequential(nn.Linear(784, 48), nn.ReLU(), nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, 48), nn.ReLU(),
                         nn.Linear(48, 784))


class RowLSTM(nn.Module):
    """An LSTM (hidden 64) over the 28 rows of an image; a linear head on its last hidden state."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.lstm = nn.LSTM(28, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(dim, 3 * dim)
        self.c_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, c))


class GPTBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class CharGPT(nn.Module):
    """A GPT-2-style decoder (nanoGPT's layout and initialisation): token + position embeddings,
    ``layers`` pre-LayerNorm blocks, a final LayerNorm, the output layer tied to the token embedding."""

    def __init__(self, vocab: int = VOCAB_SIZE, block: int = BLOCK, dim: int = 64, layers: int = 2,
                 heads: int = 4) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(block, dim)
        self.blocks = nn.ModuleList(GPTBlock(dim, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith("c_proj.weight") or name.endswith("mlp.2.weight") \
                    else 0.02
                nn.init.normal_(p, mean=0.0, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.lm_head(self.ln_f(x))


# -- losses ---------------------------------------------------------------------------------------------------------

def _cross_entropy(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(model(x), y)


def _lm_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _bce(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(model(x), y)


# -- the suite ------------------------------------------------------------------------------------------------------

_MNIST_HELD = "MNIST digits, but"
TASKS: dict[str, Task] = {t.name: t for t in (
    Task("mnist-convnet", "MNIST convnet (2 conv + 2 FC, dropout), batch 64",
         "2 conv + 2 fully connected layers with max-pooling and dropout (PyTorch's MNIST example, 8/16 channels)",
         "MNIST", f"{_MNIST_HELD} with dropout (a noisy loss), max-pooling, 2 fully connected layers and 2000 steps",
         2000, 64, ConvNet, _cross_entropy, _image_splits("mnist", (1, 28, 28), MNIST_MEAN, MNIST_STD)),
    Task("char-gpt", "character-level GPT (2 layers, n_embd 64), 8 x 64 characters",
         "GPT-2-style decoder: 2 pre-LayerNorm blocks, n_embd 64, 4 heads, causal self-attention, tied embeddings",
         "Python's language-reference help texts (stdlib pydoc_data.topics)",
         "a Transformer (attention, LayerNorm, embeddings) on real English/code text; meta-training's sequence "
         "model sees only synthetic data", 2000, 8, CharGPT, _lm_loss, _text_splits, log_y=False),
    Task("mnist-deep-mlp", "8-layer ReLU MLP (width 48), batch 128",
         "8 linear layers 784-48x7-10 with ReLU, PyTorch's default initialisation", "MNIST",
         f"{_MNIST_HELD} 8 layers deep (meta-training's MLPs are shallow) and 2000 steps",
         2000, 128, deep_mlp, _cross_entropy, _image_splits("mnist", (784,), MNIST_MEAN, MNIST_STD)),
    Task("fashion-bn-convnet", "Fashion-MNIST BatchNorm convnet, batch 64",
         "3 blocks of conv 3x3 with stride 2 (8/16/32 channels), BatchNorm, ReLU; linear head", "Fashion-MNIST",
         "another data set, and BatchNorm (batch statistics in training, running statistics in evaluation)",
         2000, 64, bn_convnet, _cross_entropy, _image_splits("fashion-mnist", (1, 28, 28), FASHION_MEAN, FASHION_STD)),
    Task("fashion-resmlp", "Fashion-MNIST residual MLP with LayerNorm, batch 128",
         "784 -> 48, 2 pre-LayerNorm residual blocks (48-96-48, GELU), LayerNorm, -> 10", "Fashion-MNIST",
         "another data set, residual connections and LayerNorm",
         2000, 128, res_mlp, _cross_entropy, _image_splits("fashion-mnist", (784,), FASHION_MEAN, FASHION_STD)),
    Task("mnist-autoencoder", "MNIST autoencoder 784-48-16-48-784, batch 128",
         "784-48-16-48-784 ReLU autoencoder, binary cross-entropy on the pixels", "MNIST images (no labels)",
         "an unsupervised reconstruction loss with a 784-wide output layer, not a classifier",
         2000, 128, autoencoder, _bce, _image_splits("mnist", (784,), 0.0, 1.0, normalise=False, autoencoder=True)),
    Task("mnist-row-lstm", "MNIST row-by-row LSTM classifier (hidden 64), batch 64",
         "one-layer LSTM (hidden 64) over 28 rows of 28 pixels, linear head on the last hidden state", "MNIST",
         f"{_MNIST_HELD} read by a recurrent network (gates, long backpropagation through time)",
         2000, 64, RowLSTM, _cross_entropy, _image_splits("mnist", (28, 28), MNIST_MEAN, MNIST_STD)),
)}


def _on_mnist(fashion: str, shape: tuple[int, ...], why: str) -> Task:
    """The Fashion-MNIST task ``fashion`` with its model, loss and length, trained on MNIST instead."""
    task = TASKS[fashion]
    return replace(task, name=fashion.replace("fashion", "mnist", 1), data="MNIST", held_out=f"{_MNIST_HELD} {why}",
                   title=task.title.replace("Fashion-MNIST", "MNIST"),
                   load=_image_splits("mnist", shape, MNIST_MEAN, MNIST_STD))


#: Tasks that run only when named: the Fashion-MNIST models on MNIST (for machines without Fashion-MNIST).
EXTRA_TASKS: dict[str, Task] = {t.name: t for t in (
    _on_mnist("fashion-bn-convnet", (1, 28, 28), "with BatchNorm (batch statistics in training, running statistics "
              "in evaluation) and no pooling"),
    _on_mnist("fashion-resmlp", (784,), "with residual connections and LayerNorm"),
)}

#: Every task ``--tasks`` accepts: the suite's, then the extra ones.
ALL_TASKS: dict[str, Task] = {**TASKS, **EXTRA_TASKS}


def task_names_error(names: list[str]) -> str | None:
    """What is wrong with the ``--tasks`` names ``names`` (none given, or some not in :data:`ALL_TASKS`),
    or None when every name is a task."""
    unknown = [n for n in names if n not in ALL_TASKS]
    if names and not unknown:
        return None
    return (f"unknown task(s) {', '.join(unknown) or '(none given)'}; the suite's tasks are {', '.join(TASKS)} "
            f"(and, when named, {', '.join(EXTRA_TASKS)})")


def iter_tasks(names: list[str] | None) -> Iterator[Task]:
    """The tasks named (the suite's, in suite order, for None); ``ValueError`` for an unknown name."""
    if names is None:
        yield from TASKS.values()
        return
    error = task_names_error(names)
    if error:
        raise ValueError(error)
    for n in names:
        yield ALL_TASKS[n]


def default_data_dir(repo: Path) -> Path | None:
    """``$L2O_DATA`` if set, else ``<repo>/../shared/data`` if it exists, else None."""
    env = os.environ.get("L2O_DATA")
    if env:
        return Path(env).expanduser()
    shared = repo.parent / "shared" / "data"
    return shared if shared.is_dir() else None
