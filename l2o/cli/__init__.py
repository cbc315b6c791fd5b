"""The ``l2o`` command line (also ``python -m l2o``): the only part of l2o that imports optimizees.

Commands: ``meta-train``, ``compare``, ``evaluate``, ``list-pretrained``, ``maml``. Exit codes: 0
success, 2 bad usage or bad input (unknown task, bad value, missing or malformed file, CUDA asked
for but unavailable), 1 a failure while running (e.g. meta-training diverged, a runtime or I/O
error), 130 interrupted. Errors are one line on stderr; ``L2O_DEBUG=1`` shows the traceback of a
failure instead.
"""

from __future__ import annotations

import argparse
import os
from typing import Sequence

from .. import __version__
from .common import Parser, UsageError, default_threads, leave_distributed, say
from .evaluate import add_evaluate_parser, add_list_pretrained_parser, cmd_evaluate, cmd_list_pretrained
from .learned import add_compare_parser, add_meta_train_parser, cmd_compare, cmd_meta_train, plot_report
from .maml import add_maml_parser, cmd_maml

__all__ = ["main", "build_parser", "UsageError", "cmd_meta_train", "cmd_compare", "cmd_evaluate", "cmd_list_pretrained",
           "cmd_maml", "plot_report"]

EXAMPLES = """examples:
  l2o meta-train --task quadratic --out runs/quadratic.pt
  l2o compare --task quadratic --rule runs/quadratic.pt --json runs/quadratic.json --plot runs/quadratic.png
  l2o compare --task quadratic --rule runs/quadratic.pt --horizon 200
  l2o evaluate --task quadratic --pretrained quadratic --plot runs/pretrained.png
  l2o list-pretrained
  l2o maml --task sine --out runs/sine.pt --json runs/sine.json --plot runs/sine.png

Every command takes --help (with examples); most take --seed, --device, --json, --plot and
--no-progress. Exit codes: 0 ok, 2 bad usage or input, 1 failure while running.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="l2o", description="Learned optimizers and MAML on one unroll engine.",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"l2o {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    add_meta_train_parser(sub)
    add_compare_parser(sub)
    add_evaluate_parser(sub)
    add_list_pretrained_parser(sub)
    add_maml_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The ``l2o`` command line; returns the exit code (0 ok, 2 bad usage or input, 1 failure).

    A ``--distributed`` run under torchrun that created its process group ends the process here
    (see :func:`l2o.cli.common.leave_distributed`).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "threads", 0) is None:  # the task commands' default depends on the task
        args.threads = default_threads(args.task, bool(getattr(args, "distributed", False)))
    return leave_distributed(_run(args))


def _run(args: argparse.Namespace) -> int:
    """Run the chosen command; turn expected failures into one line on stderr and an exit code."""
    from ..checkpoints import CheckpointError
    from ..meta import MetaTrainingError

    try:
        return args.func(args)
    except (UsageError, CheckpointError, ValueError, TypeError, FileNotFoundError) as exc:
        say(f"l2o {args.command}: error: {exc}", err=True)
        return 2
    except MetaTrainingError as exc:
        say(f"l2o {args.command}: failed: {exc}", err=True)
        return 1
    except (RuntimeError, OSError, MemoryError) as exc:  # after FileNotFoundError (exit 2) above
        if os.environ.get("L2O_DEBUG"):
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        say(f"l2o {args.command}: failed: {type(exc).__name__}: {first} (L2O_DEBUG=1 shows the traceback)",
            err=True)
        return 1
    except KeyboardInterrupt:
        say(f"l2o {args.command}: interrupted", err=True)
        return 130
