"""``python -m l2o``: the same as the ``l2o`` command."""

import sys

from .cli import main

sys.exit(main())
