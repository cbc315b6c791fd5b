r"""A small decoder-only Transformer language model (the sequence model of
:func:`optimizees.sequence.sequence_family` with ``model="transformer"``).

GPT-2's layout at a tiny size: token and position embeddings, ``layers`` pre-LayerNorm blocks

.. math:: x \leftarrow x + \operatorname{Attn}(\operatorname{LN}_1(x)), \qquad
          x \leftarrow x + W_2\,\operatorname{gelu}(W_1 \operatorname{LN}_2(x) + b_1) + b_2,

with causal multi-head self-attention :math:`\operatorname{softmax}(QK^\top/\sqrt{d_h} + M)V`
(:math:`M` masks the future), a final LayerNorm and a linear read-out to the vocabulary (not tied
to the embedding). Weights are initialised :math:`\mathcal N(0, 0.02^2)`, the two projections into
the residual stream with :math:`0.02/\sqrt{2\,\text{layers}}`, biases at zero, LayerNorm gains at 1
(GPT-2's scheme): the small initial scale, the normalisation layers and the attention are what a
learned optimizer meets in a Transformer and not in an MLP or a GRU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from l2o.validation import check_positive_int

__all__ = ["TransformerLanguageModel"]

_INIT_STD = 0.02


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln_2 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 4 * dim)
        self.out = nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, length, dim = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(dim, dim=-1)
        q, k, v = (t.view(b, length, self.heads, dim // self.heads).transpose(1, 2) for t in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, length, dim))
        return x + self.out(F.gelu(self.fc(self.ln_2(x))))


class TransformerLanguageModel(nn.Module):
    """The decoder of the module docstring: inputs ``(B, L)`` token ids (``L <= length``), outputs
    logits ``(B, L, vocab)``.

    Args:
        vocab: tokens in the vocabulary.
        dim: the model width (``dim % heads == 0``).
        length: the longest sequence (rows of the position embedding).
        layers: Transformer blocks.
        heads: attention heads per block.
    """

    def __init__(self, vocab: int, dim: int, length: int, layers: int = 1, heads: int = 2) -> None:
        super().__init__()
        vocab, dim, length = (check_positive_int(n, v) for n, v in (("vocab", vocab), ("dim", dim), ("length", length)))
        layers, heads = check_positive_int("layers", layers), check_positive_int("heads", heads)
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads})")
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(length, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)
        residual_std = _INIT_STD / math.sqrt(2 * layers)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, 0.0, residual_std if name.endswith(("proj.weight", "out.weight")) else _INIT_STD)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.dim() != 2 or tokens.shape[1] > self.pos.num_embeddings:
            raise ValueError(f"tokens must have shape (B, L) with L <= {self.pos.num_embeddings}, "
                             f"got {tuple(tokens.shape)}")
        x = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))
