"""Task families (optimizees) for l2o: they implement the protocols in :mod:`l2o.tasks`."""

from .quadratic import QuadraticFamily, QuadraticTask

__all__ = ["QuadraticFamily", "QuadraticTask"]
