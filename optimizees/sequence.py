r"""Small sequence models on synthetic Markov-chain text (next-token prediction): a GRU, or a
Transformer (:mod:`optimizees.transformer`).

Each task draws its own language, a first-order Markov chain over ``vocab`` tokens whose
transition rows are :math:`\operatorname{softmax}(z / \tau - s \log \pi)` with :math:`z \sim
\mathcal N(0, I)` (temperature :math:`\tau` = ``temperature``: lower is more predictable) and
:math:`\pi` a random permutation of the ranks :math:`1, \dots, V`; with the Zipf exponent
:math:`s` = ``zipf`` above 0 a few tokens are frequent in every context and most are rare, as in
text (:math:`s = 1` and :math:`\tau = 1` over 64-128 tokens: the unigram entropy is 0.7-0.9 nats
below :math:`\log V`, and the chain's entropy rate about 0.4 below that), and with :math:`s = 0`
(the default) every token is about as frequent as any other. Then a language model,
a GRU :math:`\text{embed} \to \text{GRU}(d) \to \text{linear}` or a small decoder-only
Transformer (:class:`~optimizees.transformer.TransformerLanguageModel`), trained with the mean
next-token cross-entropy

.. math:: f(\theta; b) = \frac{1}{|b|(L-1)} \sum_{s \in b} \sum_{t=1}^{L-1} -\log p_\theta(s_{t+1} \mid s_{\le t}).

The GRU is written with ``nn.Linear`` layers (so ``torch.func.functional_call`` swaps its params
like any module's). Training batches are fresh sequences from the task's chain; the
:data:`~l2o.tasks.META` split draws minibatches from a held-out set of 256 sequences drawn once per
task (``task.batch_fn.held_out``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from l2o.families import ModuleFamily
from l2o.tasks import META, TRAIN
from l2o.validation import check_hyperparameter, check_positive_int

from .transformer import TransformerLanguageModel

__all__ = ["GRULanguageModel", "MarkovChain", "sequence_family", "MODELS"]

#: The language models :func:`sequence_family` can build.
MODELS = ("gru", "transformer")


class GRULanguageModel(nn.Module):
    r"""Embedding, one GRU layer of ``hidden`` units, and a linear read-out to the vocabulary.

    Inputs ``(B, L)`` token ids; outputs logits ``(B, L, vocab)``. The gates are
    :math:`r, z = \sigma(W x + U h)`, :math:`\tilde h = \tanh(W_n x + r \odot U_n h)`,
    :math:`h' = (1 - z)\tilde h + z h`.
    """

    def __init__(self, vocab: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.inp = nn.Linear(hidden, 3 * hidden)
        self.rec = nn.Linear(hidden, 3 * hidden, bias=False)
        self.out = nn.Linear(hidden, vocab)
        self.hidden = hidden

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.inp(self.embed(tokens))  # (B, L, 3H)
        h = x.new_zeros(tokens.shape[0], self.hidden)
        outs = []
        for t in range(tokens.shape[1]):
            xr, xz, xn = x[:, t].chunk(3, -1)
            hr, hz, hn = self.rec(h).chunk(3, -1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            h = (1 - z) * torch.tanh(xn + r * hn) + z * h
            outs.append(h)
        return self.out(torch.stack(outs, 1))


class MarkovChain:
    """A random first-order Markov chain over ``vocab`` tokens (see the module docstring)."""

    def __init__(self, vocab: int, temperature: float, generator: torch.Generator, zipf: float = 0.0) -> None:
        self.vocab = vocab
        logits = torch.randn(vocab, vocab, generator=generator) / temperature
        if zipf > 0:
            ranks = torch.randperm(vocab, generator=generator).to(logits.dtype) + 1.0
            logits = logits - zipf * ranks.log()
        self.transitions = logits.softmax(-1)

    def sample(self, batch: int, length: int, generator: torch.Generator) -> Tensor:
        """``(batch, length)`` token ids: a uniform first token, then the chain."""
        tokens = [torch.randint(self.vocab, (batch,), generator=generator)]
        for _ in range(length - 1):
            tokens.append(torch.multinomial(self.transitions[tokens[-1]], 1, generator=generator).squeeze(1))
        return torch.stack(tokens, 1)


def _next_token_loss(logits: Tensor, tokens: Tensor) -> Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


class _ChainBatches:
    """The batch sampler of one task: its chain, its batch size, and its fixed held-out set."""

    def __init__(self, chain: MarkovChain, batch_size: int, length: int, generator: torch.Generator) -> None:
        self.chain, self.batch_size, self.length = chain, batch_size, length
        held_out = chain.sample(256, length, generator)
        self.held_out = (held_out, held_out)

    def __call__(self, split: str, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        if split == TRAIN:
            tokens = self.chain.sample(self.batch_size, self.length, generator)
            return tokens, tokens
        if split == META:  # a minibatch of the held-out set
            idx = torch.randint(len(self.held_out[0]), (self.batch_size,), generator=generator)
            return self.held_out[0][idx], self.held_out[1][idx]
        raise ValueError(f"split must be {TRAIN!r} or {META!r}, got {split!r}")


def _no_shared_batches(split: str, generator: torch.Generator) -> Any:  # pragma: no cover - never called
    raise RuntimeError("every sequence task samples its batches from its own chain")


class _SequenceFamily(ModuleFamily):
    """:func:`sequence_family`'s family: every task draws its chain, then its model."""

    def __init__(self, vocab: int, hidden: int, length: int, batch_size: int, temperature: float,
                 init_scale: Any, name: str, model: str = "gru", layers: int = 1, heads: int = 2,
                 zipf: float = 0.0) -> None:
        def make(g: torch.Generator) -> nn.Module:
            if model == "gru":
                return GRULanguageModel(vocab, hidden)
            return TransformerLanguageModel(vocab, hidden, length, layers=layers, heads=heads)

        super().__init__(make, _no_shared_batches, _next_token_loss, name=name, init_scale=init_scale)
        self.vocab, self.hidden, self.length, self.batch_size, self.temperature = vocab, hidden, length, batch_size, temperature
        self.architecture, self.layers, self.heads, self.zipf = model, layers, heads, zipf

    def task_batches(self, generator: torch.Generator) -> _ChainBatches:
        """A new task's language (its chain) and held-out set, drawn before its model."""
        return _ChainBatches(MarkovChain(self.vocab, self.temperature, generator, self.zipf), self.batch_size,
                             self.length, generator)

    def config(self) -> dict[str, Any]:
        out = {**super().config(), "model": self.architecture, "vocab": self.vocab, "hidden": self.hidden,
               "length": self.length, "batch_size": self.batch_size, "temperature": self.temperature}
        if self.architecture == "transformer":
            out.update(layers=self.layers, heads=self.heads)
        if self.zipf:
            out["zipf"] = self.zipf
        return out


def sequence_family(*, vocab: int = 16, hidden: int = 32, length: int = 16, batch_size: int = 32,
                    temperature: float = 0.5, init_scale: float | tuple[float, float] = 1.0,
                    name: str | None = None, model: str = "gru", layers: int = 1, heads: int = 2,
                    zipf: float = 0.0) -> ModuleFamily:
    """Tasks of a language model on a random :class:`MarkovChain` each (module docstring).

    ``model`` is ``"gru"`` (a :class:`GRULanguageModel` of ``hidden`` units) or ``"transformer"`` (a
    :class:`~optimizees.transformer.TransformerLanguageModel` of width ``hidden``, ``layers``
    blocks and ``heads`` heads, its position embedding ``length`` long). ``zipf`` is the chain's
    Zipf exponent :math:`s` (0: no skew).
    """
    if model not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, got {model!r}")
    vocab, hidden = check_positive_int("vocab", vocab), check_positive_int("hidden", hidden)
    layers, heads = check_positive_int("layers", layers), check_positive_int("heads", heads)
    if model == "transformer" and hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads}) for a transformer")
    length, batch_size = check_positive_int("length", length), check_positive_int("batch_size", batch_size)
    if length < 2:
        raise ValueError(f"length must be at least 2 (next-token prediction), got {length}")
    temperature = check_hyperparameter("temperature", temperature, low=0.0, low_inclusive=False)
    zipf = check_hyperparameter("zipf", zipf, low=0.0)
    default_name = f"{'zipf' if zipf else 'markov'}-{model}{hidden}-v{vocab}"
    return _SequenceFamily(vocab, hidden, length, batch_size, temperature, init_scale, name or default_name,
                           model, layers, heads, zipf)
