"""Task families (optimizees) for l2o: they implement the protocols in :mod:`l2o.tasks`."""

from .convnet import ConvNet
from .omniglot import OmniglotFamily, OmniglotTask
from .quadratic import QuadraticFamily, QuadraticTask
from .sine import SineFamily, SineMLP, SineTask

__all__ = ["ConvNet", "OmniglotFamily", "OmniglotTask", "QuadraticFamily", "QuadraticTask", "SineFamily", "SineMLP", "SineTask"]
