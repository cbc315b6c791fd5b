r"""The 4-block convolutional network of Finn et al. (2017, §5.2) for few-shot image classification.

Each block: 3×3 convolution (64 filters in the paper, padding 1), batch normalisation with the
batch's own statistics (no running statistics), ReLU, 2×2 max-pooling (28 → 14 → 7 → 3 → 1 for
Omniglot's images), then a linear layer to the N ways:

.. math:: h_{i+1} = \operatorname{maxpool}_{2\times2}\big(\operatorname{relu}(
          \operatorname{BN}_{\gamma_i,\beta_i}(W_i * h_i + b_i))\big),\qquad
          \text{logits} = V \operatorname{flatten}(h_4) + c .

One episode runs through :class:`ConvNet` (a module: ``net(x)``, or ``functional_call`` with
params); ``B`` episodes, each with its own params (a leading dimension ``B``), run at once through
:func:`grouped_logits` (the blocks as grouped convolutions, one call per layer) or
:func:`vmap_logits` (``vmap`` over ``functional_call`` of the module). The blocks are one function
for both (:func:`_blocks`); see :func:`grouped_logits` for why the classifier is written twice.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from l2o.tree import Params
from l2o.validation import check_positive_int

__all__ = ["ConvNet", "grouped_logits", "vmap_logits", "episode_accuracy"]

_BN_EPS = 1e-5


def _blocks(h: Tensor, layers: list[tuple[Tensor, Tensor, Tensor, Tensor]], groups: int) -> Tensor:
    """The convolutional blocks on ``h`` ``(M, groups * C, H, W)``: per block ``(conv weight, conv
    bias, norm weight, norm bias)``, flattened over the ``groups`` episodes (``groups=1``: one
    episode, exactly the ops of ``nn.Conv2d`` and ``nn.BatchNorm2d(track_running_stats=False)``)."""
    for conv_w, conv_b, norm_w, norm_b in layers:
        h = F.conv2d(h, conv_w, conv_b, padding=1, groups=groups)
        h = F.batch_norm(h, None, None, norm_w, norm_b, training=True, eps=_BN_EPS)
        h = F.max_pool2d(F.relu(h), 2)
    return h


class ConvNet(nn.Module):
    """The 4-block convolutional network of Finn et al. (2017) for one episode.

    Each block: 3×3 convolution (``channels`` filters, padding 1), batch normalisation using the
    batch's own statistics (``track_running_stats=False``: the same in train and eval mode, no
    buffers), ReLU, 2×2 max-pooling. Then the features are flattened and a linear layer maps them
    to ``ways`` logits. Input ``(M, in_channels, image_size, image_size)``, output ``(M, ways)``.

    Parameter names: ``blocks.{i}.conv.{weight,bias}``, ``blocks.{i}.norm.{weight,bias}``,
    ``classifier.{weight,bias}``.
    """

    def __init__(self, ways: int = 5, *, channels: int = 64, num_blocks: int = 4,
                 in_channels: int = 1, image_size: int = 28) -> None:
        super().__init__()
        self.ways = check_positive_int("ways", ways)
        check_positive_int("channels", channels)
        check_positive_int("num_blocks", num_blocks)
        check_positive_int("in_channels", in_channels)
        side = check_positive_int("image_size", image_size)
        blocks = []
        for i in range(num_blocks):
            blocks.append(nn.ModuleDict({
                "conv": nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1),
                "norm": nn.BatchNorm2d(channels, eps=_BN_EPS, track_running_stats=False),
            }))
            side //= 2
        if side < 1:
            raise ValueError(f"image_size {image_size} is too small for {num_blocks} 2x2 max-pools")
        self.blocks = nn.ModuleList(blocks)
        self.classifier = nn.Linear(channels * side * side, self.ways)
        self.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        layers = [(b["conv"].weight, b["conv"].bias, b["norm"].weight, b["norm"].bias) for b in self.blocks]
        return self.classifier(_blocks(x, layers, 1).flatten(1))

    def params(self) -> Params:
        """The module's parameters as a params dict (the live ``nn.Parameter`` objects, not copies:
        what a MAML module holds as θ0 and broadcasts to a meta-batch)."""
        return dict(self.named_parameters())

    def init_params(self, generator: torch.Generator | None = None, batch_size: int | None = None,
                    dtype: torch.dtype | None = None) -> Params:
        """Fresh params drawn as in MAML's code (on the module's device, in ``dtype`` or its own).

        Convolutions: Glorot-uniform weights (TF's ``xavier_initializer_conv2d``), zero biases;
        batch norm: weight 1, bias 0; classifier: standard-normal weights (MAML's ``w5`` for
        Omniglot), zero bias. With ``batch_size`` ``B`` every tensor is ``(B, *shape)`` and the
        ``B`` networks are drawn independently. Deterministic for a seeded ``generator``.
        """
        lead = () if batch_size is None else (check_positive_int("batch_size", batch_size),)
        out: Params = {}
        for name, p in self.named_parameters():
            shape, dt = lead + tuple(p.shape), dtype or p.dtype
            if name.endswith("conv.weight"):
                fan_in, fan_out = p.shape[1] * p[0, 0].numel(), p.shape[0] * p[0, 0].numel()
                bound = math.sqrt(6.0 / (fan_in + fan_out))
                value = (torch.rand(shape, generator=generator, dtype=dt) * 2 - 1) * bound
            elif name.endswith("norm.weight"):
                value = torch.ones(shape, dtype=dt)
            elif name == "classifier.weight":
                value = torch.randn(shape, generator=generator, dtype=dt)
            else:  # biases
                value = torch.zeros(shape, dtype=dt)
            out[name] = value.to(p.device)
        return out

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Re-initialise the module's own parameters with :meth:`init_params`."""
        with torch.no_grad():
            for name, value in self.init_params(generator).items():
                self.get_parameter(name).copy_(value)


def vmap_logits(net: nn.Module, params: Mapping[str, Tensor], inputs: Tensor) -> Tensor:
    """Logits ``(B, M, ways)`` of ``net`` run with per-episode ``params`` (leading dim ``B``) on
    ``inputs`` ``(B, M, C, H, W)``: :func:`torch.func.vmap` over ``functional_call``.

    Works for any module; for :class:`ConvNet` params, :func:`grouped_logits` computes the same
    thing faster.
    """
    def one(p: Params, x: Tensor) -> Tensor:
        return functional_call(net, p, (x,))

    return vmap(one)(dict(params), inputs)


def grouped_logits(params: Mapping[str, Tensor], inputs: Tensor) -> Tensor:
    """:class:`ConvNet`'s forward for ``B`` episodes at once, as a pure function.

    The ``B`` episodes' channels are stacked into one image batch ``(M, B*C, H, W)``: each
    convolution is a single grouped convolution (``groups=B``), batch norm over ``(M, H, W)`` per
    (episode, channel) is one ``F.batch_norm`` call (both in :func:`_blocks`, which
    :meth:`ConvNet.forward` runs with ``groups=1``), and the classifier an ``einsum``. Equal to
    :func:`vmap_logits` over :class:`ConvNet` (tested), with fewer copies (about 1.3x faster on a
    second-order MAML step on CPU).

    The classifier stays two lines: ``nn.Linear`` in the module (one ``addmm``) and a batched
    ``einsum`` here. Running one episode through this function gives the module's logits to the
    bit, but not its gradients (the two products' backwards round differently), and a batched
    ``addmm`` would change this function's; either way existing results would move.

    Args:
        params: :class:`ConvNet` params with a leading episode dimension ``B``.
        inputs: ``(B, M, C, H, W)``; every episode has the same number ``M`` of images.

    Returns:
        Logits ``(B, M, ways)``.
    """
    if inputs.dim() != 5:
        raise ValueError(f"inputs must have shape (B, M, C, H, W), got {tuple(inputs.shape)}")
    b, m = inputs.shape[:2]
    weight = params["classifier.weight"]
    if weight.dim() != 3 or weight.shape[0] != b:
        raise ValueError(f"params must have a leading episode dimension of {b} (the inputs'), "
                         f"got classifier.weight of shape {tuple(weight.shape)}")
    h = inputs.transpose(0, 1).reshape(m, b * inputs.shape[2], *inputs.shape[3:])
    layers = []
    while f"blocks.{len(layers)}.conv.weight" in params:
        i = len(layers)
        w = params[f"blocks.{i}.conv.weight"]
        layers.append((w.reshape(-1, *w.shape[2:]), params[f"blocks.{i}.conv.bias"].reshape(-1),
                       params[f"blocks.{i}.norm.weight"].reshape(-1), params[f"blocks.{i}.norm.bias"].reshape(-1)))
    features = _blocks(h, layers, b).reshape(m, b, -1)
    return torch.einsum("mbf,bnf->bmn", features, weight) + params["classifier.bias"].unsqueeze(1)


def episode_accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Fraction of correct predictions per episode: ``(B, M, ways)``, ``(B, M)`` -> ``(B,)``."""
    return (logits.argmax(-1) == labels).to(logits.dtype).mean(-1)
