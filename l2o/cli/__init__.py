"""The ``l2o`` command line (also ``python -m l2o``): the only part of l2o that imports optimizees.

Commands: ``meta-train``, ``compare``, ``evaluate``, ``list-pretrained``, ``maml``.

Exit codes and errors (one line on stderr each):

* 0: success.
* 2: bad usage or input, found before any work is done: an argparse error (unknown flag, a value
  of the wrong form), or a value, file or environment the command checks first (unknown task,
  inconsistent options such as ``--truncation`` longer than ``--horizon``, a missing or malformed
  checkpoint or data file, CUDA asked for but unavailable): ``l2o CMD: error: MESSAGE``. A
  checkpoint or training state that cannot be used (a ``CheckpointError``) is exit 2 wherever it
  is found.
* 1: a failure while the command runs. Meta-training that diverges (a ``MetaTrainingError``):
  ``l2o CMD: failed: MESSAGE``. Any other error (``ValueError``, ``TypeError``, ``RuntimeError``,
  ``OSError``, ...): ``l2o CMD: error: TYPE: FIRST LINE OF ITS MESSAGE (run with --debug or
  L2O_DEBUG=1 for the traceback)``.
* 130: interrupted (Ctrl-C).

``--debug`` (before or after the command: ``l2o --debug compare ...`` or ``l2o compare ... --debug``)
or ``L2O_DEBUG=1`` in the environment also prints the traceback of any error raised while the
command ran (before the one-line message; the exit code is the same).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
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
--no-progress. Exit codes: 0 ok, 2 bad usage or input (found before any work is done), 1 a failure
while running, 130 interrupted. --debug (before or after the command) or L2O_DEBUG=1 prints the
traceback of an error.
"""

DEBUG_HELP = "print the traceback of an error (also L2O_DEBUG=1)"

#: Values of ``L2O_DEBUG`` that turn debugging on (case-insensitive).
DEBUG_ON = ("1", "true", "yes", "on")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="l2o", description="Learned optimizers and MAML on one unroll engine.",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"l2o {__version__}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    add_meta_train_parser(sub)
    add_compare_parser(sub)
    add_evaluate_parser(sub)
    add_list_pretrained_parser(sub)
    add_maml_parser(sub)
    for command in sub.choices.values():  # also after the command; SUPPRESS keeps a --debug given before it
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


def debug_enabled(args: argparse.Namespace) -> bool:
    """``--debug`` was given, or ``L2O_DEBUG`` is ``1``/``true``/``yes``/``on``."""
    return bool(getattr(args, "debug", False)) or os.environ.get("L2O_DEBUG", "").strip().lower() in DEBUG_ON


def main(argv: Sequence[str] | None = None) -> int:
    """The ``l2o`` command line; returns the exit code (0 ok, 2 bad usage or input, 1 a failure
    while running, 130 interrupted; see the module docstring).

    A ``--distributed`` run under torchrun that created its process group ends the process here
    (see :func:`l2o.cli.common.leave_distributed`).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "threads", 0) is None:  # the task commands' default depends on the task
        args.threads = default_threads(args.task, bool(getattr(args, "distributed", False)))
    return leave_distributed(_run(args))


def _run(args: argparse.Namespace) -> int:
    """Run the chosen command; turn every error into one line on stderr and an exit code."""
    from ..checkpoints import CheckpointError
    from ..meta import MetaTrainingError

    prefix = f"l2o {args.command}"
    try:
        return args.func(args)
    except KeyboardInterrupt:
        say(f"{prefix}: interrupted", err=True)
        return 130
    except (UsageError, CheckpointError) as exc:  # bad input, found before the work or in a file the user named
        _traceback_if_debug(args, exc)
        say(f"{prefix}: error: {exc}", err=True)
        return 2
    except MetaTrainingError as exc:
        _traceback_if_debug(args, exc)
        say(f"{prefix}: failed: {exc}", err=True)
        return 1
    except Exception as exc:  # a failure while running (a bug, the machine, the data): exit 1
        _traceback_if_debug(args, exc)
        first = (str(exc).strip().splitlines() or [""])[0]
        say(f"{prefix}: error: {type(exc).__name__}: {first} (run with --debug or L2O_DEBUG=1 for the traceback)",
            err=True)
        return 1


def _traceback_if_debug(args: argparse.Namespace, exc: BaseException) -> None:
    if debug_enabled(args):
        sys.stderr.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        sys.stderr.flush()
