r"""Omniglot few-shot classification for MAML (Lake et al. 2015; Finn et al. 2017, §5.2).

**Data.** The two official zips, 1623 characters of 50 alphabets with 20 drawings each, read,
checked and cached by :mod:`optimizees.omniglot_files` (:func:`load_omniglot`) as uint8 ink
intensities, 0 (paper) .. 255 (ink), resized to 28×28; the network sees them as floats in [0, 1]
(MAML's loader also feeds ``1 - image``).

**Classes and splits.** Every character is a class, and each rotation by a multiple of 90° is a
further class (Santoro et al. 2016; Finn et al. 2017). Characters are ordered by path, background
zip first (``images_background/<Alphabet>/characterNN`` sorted, then ``images_evaluation/...``
sorted), and split by position, deterministically and class-disjointly:

- ``"train"``: the first ``1200 - val_characters`` characters (default 1100),
- ``"val"``: the next ``val_characters`` (default 100), for model selection during meta-training,
- ``"test"``: the remaining 423 characters, held out.

So the 1200 meta-training characters (train + val) are all of background plus the first 236
evaluation characters (Angelic .. Gurmukhi ``character41``), as "the first 1200 characters" of
MAML's split; MAML itself shuffled the character folders (in file-system order, with Python's
``random.seed(1)``), which cannot be reproduced portably. The split is class-disjoint but not
alphabet-disjoint (Gurmukhi is cut in two), as in MAML. Rotations apply to every split.

**Episodes.** :class:`OmniglotFamily` samples an :class:`OmniglotTask` holding a meta-batch of
``B`` N-way K-shot episodes: per episode, N distinct (character, rotation) classes in random order
(so labels 0..N-1 are permuted per episode) and ``shots + query_shots`` distinct drawings of each,
split into a support set (split :data:`~l2o.tasks.TRAIN`, what the inner loop adapts on) and a
query set (split :data:`~l2o.tasks.META`, what the meta-loss reads).

**Network.** :class:`ConvNet` (:mod:`optimizees.convnet`) is the paper's 4-block network. A
task's params are its parameters with a leading episode dimension ``B`` (each episode adapts its
own copy), and ``loss`` evaluates all episodes in one call, without a Python loop: by default with
:func:`grouped_logits` (grouped convolutions), or (``forward="vmap"``) with :func:`vmap_logits`;
both give the same numbers (tested).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from l2o.cache import CACHE_ENV_VAR, default_cache_dir
from l2o.tasks import support_or_query
from l2o.tree import Params
from l2o.validation import check_positive_int

from .convnet import ConvNet, episode_accuracy, grouped_logits, vmap_logits
from .omniglot_files import (OMNIGLOT_FILES, OMNIGLOT_SHA256, OMNIGLOT_UPSTREAM_MD5, OmniglotData, load_omniglot,
                             read_omniglot_zip)
from .omniglot_files import _clear_cache  # noqa: F401 - forgets the in-process copies (tests, long-lived processes)
from .png import decode_png

__all__ = [
    "OMNIGLOT_FILES",
    "OMNIGLOT_SHA256",
    "OMNIGLOT_UPSTREAM_MD5",
    "META_TRAIN_CHARACTERS",
    "ROTATIONS",
    "CACHE_ENV_VAR",
    "OmniglotData",
    "EpisodeBatch",
    "EpisodeInfo",
    "ConvNet",
    "OmniglotTask",
    "OmniglotFamily",
    "decode_png",
    "read_omniglot_zip",
    "load_omniglot",
    "default_cache_dir",
    "split_characters",
    "grouped_logits",
    "vmap_logits",
    "episode_accuracy",
]

#: Characters (before rotation) meta-training may see: train + val; the rest are held out.
META_TRAIN_CHARACTERS = 1200

#: Rotations (degrees, counter-clockwise) that make new classes.
ROTATIONS: tuple[int, ...] = (0, 90, 180, 270)

_FORWARDS = ("grouped", "vmap")


def split_characters(num_characters: int, split: str, val_characters: int = 100) -> range:
    """Positions of the characters in ``split`` (see the module doc).

    ``"train"``: ``[0, 1200 - val_characters)``, ``"val"``: ``[1200 - val_characters, 1200)``,
    ``"test"``: ``[1200, num_characters)``. The boundary shrinks to ``num_characters`` when
    there are fewer characters (small test data).
    """
    if not isinstance(split, str) or split not in ("train", "val", "test"):
        raise ValueError(f"split must be one of 'train', 'val', 'test', got {split!r}")
    if isinstance(num_characters, bool) or not isinstance(num_characters, int) or num_characters < 0:
        raise ValueError(f"num_characters must be an int >= 0, got {num_characters!r}")
    if (isinstance(val_characters, bool) or not isinstance(val_characters, int)
            or not 0 <= val_characters < META_TRAIN_CHARACTERS):
        raise ValueError(f"val_characters must be an int in [0, {META_TRAIN_CHARACTERS}), got {val_characters!r}")
    meta = min(META_TRAIN_CHARACTERS, num_characters)
    train = max(0, meta - val_characters)
    return {"train": range(0, train), "val": range(train, meta), "test": range(meta, num_characters)}[split]


# --------------------------------------------------------------------------------------------
# Tasks


class EpisodeBatch(NamedTuple):
    """Images ``(B, M, 1, S, S)`` (float, ink 1) and labels ``(B, M)`` (int64 in 0..ways-1)."""

    inputs: Tensor
    labels: Tensor


class EpisodeInfo(NamedTuple):
    """Where a task's images came from (for checks and debugging).

    Attributes:
        characters: ``(B, ways)`` indices into the family's :attr:`OmniglotFamily.characters`;
            column ``n`` is the class labelled ``n``.
        quarter_turns: ``(B, ways)`` counter-clockwise rotations of each class, in quarter turns.
        drawings: ``(B, ways, shots + query_shots)`` drawing indices; the first ``shots`` make
            the support set.
    """

    characters: Tensor
    quarter_turns: Tensor
    drawings: Tensor


class OmniglotTask:
    """A meta-batch of ``B`` N-way episodes with per-episode params (see the module doc).

    ``sample_batch(TRAIN, g)`` is the support set and ``sample_batch(META, g)`` the query set
    (fixed per task; the generator is not used). Params carry a leading episode dimension.

    Args:
        support: the support set (what the inner loop adapts on).
        query: the query set (what the meta-loss and accuracy read).
        model: the single-episode network whose structure the params follow (its own parameters
            are never used: params are passed functionally).
        forward: ``"grouped"`` (:func:`grouped_logits`, the default) or ``"vmap"``
            (:func:`vmap_logits`); the same numbers either way.
        info: where the episodes came from, when sampled by :class:`OmniglotFamily`.
    """

    def __init__(self, support: EpisodeBatch, query: EpisodeBatch, model: ConvNet,
                 forward: str = "grouped", info: EpisodeInfo | None = None) -> None:
        if forward not in _FORWARDS:
            raise ValueError(f"forward must be one of {_FORWARDS}, got {forward!r}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module (a ConvNet), got {type(model).__name__}")
        for name, batch in (("support", support), ("query", query)):
            if not (isinstance(getattr(batch, "inputs", None), Tensor) and isinstance(getattr(batch, "labels", None), Tensor)):
                raise TypeError(f"{name} must be an EpisodeBatch(inputs, labels) of tensors, got {type(batch).__name__}")
            if batch.inputs.dim() != 5 or batch.labels.shape != batch.inputs.shape[:2]:
                raise ValueError(
                    f"{name} must hold inputs (B, M, C, H, W) and labels (B, M), got "
                    f"{tuple(batch.inputs.shape)} and {tuple(batch.labels.shape)}"
                )
            if not batch.inputs.is_floating_point() or batch.labels.dtype != torch.int64:
                raise TypeError(f"{name} must hold floating-point inputs and int64 labels, got {batch.inputs.dtype} "
                                f"and {batch.labels.dtype}")
            if batch.labels.numel() == 0:
                raise ValueError(f"{name} must hold at least one episode with at least one image, got inputs of "
                                 f"shape {tuple(batch.inputs.shape)}")
        if support.inputs.shape[0] != query.inputs.shape[0]:
            raise ValueError(f"support and query have different episode counts: "
                             f"{support.inputs.shape[0]} vs {query.inputs.shape[0]}")
        self.support = support
        self.query = query
        self.model = model
        self.forward = forward
        self.info = info

    @property
    def num_tasks(self) -> int:
        """``B``, the number of episodes held (named like ``SineTask.num_tasks``)."""
        return self.support.inputs.shape[0]

    @property
    def ways(self) -> int:
        return self.model.ways

    def init(self, generator: torch.Generator) -> Params:
        """Independent networks initialised as in MAML's code, one per episode: ``(B, *shape)``.

        See :meth:`ConvNet.init_params`; params take the images' dtype and device.
        """
        params = self.model.init_params(generator, self.num_tasks, dtype=self.support.inputs.dtype)
        return {k: v.to(self.support.inputs.device) for k, v in params.items()}

    def sample_batch(self, split: str, generator: torch.Generator | None = None) -> EpisodeBatch:
        """The support set for :data:`~l2o.tasks.TRAIN`, the query set for :data:`~l2o.tasks.META`."""
        return support_or_query(split, self.support, self.query)

    def logits(self, params: Params, inputs: Tensor) -> Tensor:
        """Per-episode logits ``(B, M, ways)``."""
        if self.forward == "vmap":
            return vmap_logits(self.model, params, inputs)
        return grouped_logits(params, inputs)

    def loss(self, params: Params, batch: EpisodeBatch) -> Tensor:
        """Mean cross-entropy of each episode, shape ``(B,)`` (all episodes in one call, no loop)."""
        logits = self.logits(params, batch.inputs)
        return F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), reduction="none").view(
            batch.labels.shape).mean(-1)

    def accuracy(self, params: Params, batch: EpisodeBatch | None = None) -> Tensor:
        """Per-episode accuracy ``(B,)`` on ``batch`` (default: the query set), without grad."""
        batch = self.query if batch is None else batch
        with torch.no_grad():
            return episode_accuracy(self.logits(params, batch.inputs), batch.labels)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "OmniglotTask":
        """A copy of the task's data (and its model) on another device and/or floating dtype."""
        def cast(b: EpisodeBatch) -> EpisodeBatch:
            return EpisodeBatch(b.inputs.to(device=device, dtype=dtype), b.labels.to(device=device))

        model = copy.deepcopy(self.model).to(device=device, dtype=dtype)
        info = None if self.info is None else EpisodeInfo(*(t.to(device=device) for t in self.info))
        return OmniglotTask(cast(self.support), cast(self.query), model, self.forward, info)


def _check_data(data: Any) -> None:
    """``data`` must look like :class:`OmniglotData`: uint8 images ``(characters, drawings, S, S)``, one name each."""
    images = getattr(data, "images", None)
    characters = getattr(data, "characters", None)
    if not isinstance(images, Tensor) or not isinstance(characters, (tuple, list)):
        raise TypeError(f"data must be an OmniglotData (images, characters), got {type(data).__name__}")
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[2] != images.shape[3]:
        raise ValueError(f"data.images must be uint8 ink intensities of shape (characters, drawings, size, size), "
                         f"got {images.dtype} of shape {tuple(images.shape)}")
    if len(characters) != images.shape[0]:
        raise ValueError(f"data.characters names {len(characters)} characters but data.images holds "
                         f"{images.shape[0]}")


class OmniglotFamily:
    """Samples :class:`OmniglotTask` meta-batches of N-way K-shot Omniglot episodes.

    Args:
        data_dir: directory holding the zips (or its ``omniglot/`` subfolder); None: ``$L2O_DATA``.
        ways: N, classes per episode.
        shots: K, support drawings per class.
        query_shots: query drawings per class (MAML: 15 for 5-way; needs shots + query_shots <= 20).
        meta_batch_size: episodes per task, B (MAML: 32 for 5-way 1-shot).
        split: ``"train"``, ``"val"`` or ``"test"`` (see the module doc for the characters).
        val_characters: characters of the 1200 meta-training ones kept for ``"val"`` (default 100).
        rotations: rotations (multiples of 90°) that each make a class of every character.
        channels: filters per convolution (MAML: 64).
        dtype, device: of the images and params.
        forward: how tasks evaluate all episodes at once, ``"grouped"`` or ``"vmap"`` (see
            :class:`OmniglotTask`).
        verify, cache_dir: see :func:`read_omniglot_zip`.
        data: already-loaded :class:`OmniglotData` (instead of reading ``data_dir``).

    Raises:
        ValueError: an argument out of range (named in the message), or a split with fewer
            classes than ``ways`` or characters with fewer drawings than ``shots + query_shots``.
        DataError: the data cannot be read (see :func:`load_omniglot`).
    """

    name = "omniglot"

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        ways: int = 5,
        shots: int = 1,
        query_shots: int = 15,
        meta_batch_size: int = 32,
        split: str = "train",
        *,
        val_characters: int = 100,
        rotations: Sequence[int] = ROTATIONS,
        channels: int = 64,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        forward: str = "grouped",
        verify: bool = True,
        cache_dir: str | os.PathLike[str] | None | bool = None,
        data: OmniglotData | None = None,
    ) -> None:
        self.ways = check_positive_int("ways", ways)
        self.shots = check_positive_int("shots", shots)
        self.query_shots = check_positive_int("query_shots", query_shots)
        self.meta_batch_size = check_positive_int("meta_batch_size", meta_batch_size)
        self.channels = check_positive_int("channels", channels)
        if isinstance(rotations, (str, bytes)) or not isinstance(rotations, Sequence):
            raise ValueError(f"rotations must be a sequence of distinct values from {ROTATIONS}, got {rotations!r}")
        rot = tuple(rotations)
        if not rot or len(set(rot)) != len(rot) or any(
                isinstance(r, bool) or not isinstance(r, int) or r not in ROTATIONS for r in rot):
            raise ValueError(f"rotations must be distinct values from {ROTATIONS}, got {rotations!r}")
        if forward not in _FORWARDS:
            raise ValueError(f"forward must be one of {_FORWARDS}, got {forward!r}")
        self.forward = forward
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        try:
            device = torch.device(device) if device is not None else torch.device("cpu")
            torch.empty(0, device=device)  # an unavailable device (CUDA in a CPU build) fails here, by name
        except (RuntimeError, TypeError, AssertionError) as exc:
            raise ValueError(f"device must be an available torch.device or a device string such as 'cpu', got "
                             f"{device!r} ({exc})") from None
        if data is None:
            data = load_omniglot(data_dir, verify=verify, cache_dir=cache_dir)
        _check_data(data)
        positions = split_characters(data.images.shape[0], split, val_characters)
        self.split = split
        self.val_characters = val_characters
        self.rotations = rot
        self.dtype = dtype
        self.device = device
        #: names of the characters this family draws from (before rotation), in order.
        self.characters: tuple[str, ...] = tuple(data.characters[i] for i in positions)
        self.images = data.images[positions.start:positions.stop].to(self.device)
        num_classes = len(self.characters) * len(rot)
        if num_classes < self.ways:
            raise ValueError(
                f"ways={ways} exceeds the {num_classes} classes of split {split!r} "
                f"({len(self.characters)} characters x {len(rot)} rotations)"
            )
        drawings = data.images.shape[1]
        if self.shots + self.query_shots > drawings:
            raise ValueError(
                f"shots + query_shots must be <= {drawings} (drawings per character), got "
                f"{shots} + {query_shots}"
            )
        self._model = self.model()

    def model(self) -> ConvNet:
        """A fresh :class:`ConvNet` of this family's architecture, dtype and device (e.g. to hold
        MAML's θ0)."""
        return ConvNet(self.ways, channels=self.channels, image_size=self.images.shape[-1]).to(
            device=self.device, dtype=self.dtype)

    @property
    def num_classes(self) -> int:
        """Classes in this split: characters × rotations."""
        return len(self.characters) * len(self.rotations)

    def sample_classes(self, generator: torch.Generator, episodes: int) -> tuple[Tensor, Tensor]:
        """``(characters, rotations)`` of ``(episodes, ways)`` distinct classes per episode.

        Characters are indices into :attr:`characters`; rotations are quarter turns (0..3).
        The order within an episode is random, so it defines a random labelling.
        """
        scores = torch.rand(episodes, self.num_classes, generator=generator)
        classes = scores.argsort(-1)[:, :self.ways]
        quarter = torch.tensor([r // 90 for r in self.rotations])
        return classes // len(self.rotations), quarter[classes % len(self.rotations)]

    def sample(self, generator: torch.Generator, num_tasks: int | None = None) -> OmniglotTask:
        """Draw a task of ``num_tasks`` episodes (default: ``meta_batch_size``)."""
        b = self.meta_batch_size if num_tasks is None else check_positive_int("num_tasks", num_tasks)
        chars, quarters = self.sample_classes(generator, b)
        n_draw = self.shots + self.query_shots
        draws = torch.rand(b, self.ways, self.images.shape[1], generator=generator).argsort(-1)[..., :n_draw]
        chars, quarters, draws = chars.to(self.device), quarters.to(self.device), draws.to(self.device)
        x = self.images[chars.unsqueeze(-1), draws]  # (B, N, K+Q, S, S) uint8
        for q in range(1, 4):
            mask = quarters == q
            if bool(mask.any()):
                x[mask] = torch.rot90(x[mask], q, dims=(-2, -1))
        x = x.to(self.dtype).div_(255.0).unsqueeze(-3)  # (B, N, K+Q, 1, S, S)
        labels = torch.arange(self.ways, device=self.device).view(1, self.ways, 1).expand(b, self.ways, n_draw)

        def part(sl: slice) -> EpisodeBatch:
            return EpisodeBatch(x[:, :, sl].flatten(1, 2).contiguous(), labels[:, :, sl].flatten(1, 2).contiguous())

        return OmniglotTask(part(slice(0, self.shots)), part(slice(self.shots, n_draw)), self._model,
                            self.forward, EpisodeInfo(chars, quarters, draws))

    def config(self) -> dict[str, Any]:
        """The family's settings as plain data (for checkpoints' provenance)."""
        return {"ways": self.ways, "shots": self.shots, "query_shots": self.query_shots,
                "meta_batch_size": self.meta_batch_size, "split": self.split,
                "val_characters": self.val_characters, "rotations": list(self.rotations),
                "channels": self.channels}
