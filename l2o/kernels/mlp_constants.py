r"""The numbers of :class:`l2o.MLPRule`'s math that ``mlp_rule.c`` compiles in (its ``MLP_*``
defines), defined once for Python: :mod:`l2o.rules.mlp` and the kernel's torch twin read them, and
``tests/test_mlp_kernel.py`` checks the C defines against them."""

__all__ = ["GRAD_CLIP", "FEATURE_CLIP", "MAGNITUDE_CLIP", "TINY", "NUM_FEATURES"]

#: Gradients are clipped to this magnitude before anything else (their squares and sums stay
#: finite in float32 for tensors of up to 1e14 coordinates).
GRAD_CLIP = 1e12
#: Every feature is clipped to this magnitude.
FEATURE_CLIP = 10.0
#: :math:`\mu b` (the log-magnitude the network adds to the base step size) is clipped to this.
MAGNITUDE_CLIP = 10.0
#: Added under every square root and reciprocal square root (keeps them finite and differentiable at 0).
TINY = 1e-30
#: Per-coordinate features (see :mod:`l2o.rules.mlp`).
NUM_FEATURES = 12
