"""Shared pieces of the ``l2o`` commands: argument types, task families, errors.

This package is the only part of l2o that imports ``optimizees``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Callable

__all__ = ["UsageError", "RULE_DEFAULTS", "COMPARE_DEFAULTS", "positive_int", "positive_float", "nonnegative_float",
           "add_task_args", "family_from_args", "mnist_family", "resolve_training_state"]


class UsageError(ValueError):
    """Bad command-line input (exit code 2)."""


def mnist_family(args: argparse.Namespace, eval_split: str = "val") -> Any:
    from optimizees.mlp import MLPFamily
    from optimizees.rescaled import RescaledFamily

    family: Any = MLPFamily(data_dir=args.data, hidden=args.mlp_hidden, activation=args.activation,
                            num_networks=args.num_networks, eval_split=eval_split)
    if getattr(args, "random_scaling", 0.0):
        family = RescaledFamily(family, args.random_scaling)
    return family


def task_families() -> dict[str, Callable[[argparse.Namespace], Any]]:
    from optimizees.quadratic import QuadraticFamily

    return {"quadratic": lambda a: QuadraticFamily(dim=a.dim, num_functions=a.num_functions),
            "mnist": mnist_family}


#: Per-task defaults of the LSTM rule (the paper's: raw gradients on quadratics; log/sign
#: preprocessing and output x 0.1 on MNIST).
RULE_DEFAULTS = {"quadratic": {"preprocess": "none", "output_scale": 1.0},
                 "mnist": {"preprocess": "log_sign", "output_scale": 0.1}}


#: Per-task defaults of ``l2o compare``: held-out and tuning instances, and (mnist) networks per
#: batched task. MNIST baselines are tuned on the validation images and reported on the test images.
COMPARE_DEFAULTS = {"quadratic": {"num_tasks": 1000, "num_tuning_tasks": 1000},
                    "mnist": {"num_tasks": 100, "num_tuning_tasks": 20, "num_networks": 20}}


def _widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer widths such as 20 or 20,20, got {text!r}") from None
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"expected positive layer widths such as 20 or 20,20, got {text!r}")
    return widths


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def add_task_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, help="task family: quadratic or mnist")
    p.add_argument("--dim", type=positive_int, default=10, help="quadratic: dimension d (default 10)")
    p.add_argument("--num-functions", type=positive_int, default=128,
                   help="quadratic: functions batched in one task (default 128)")
    p.add_argument("--data", type=Path, default=None,
                   help="mnist: directory with the MNIST IDX files (default: $L2O_DATA)")
    p.add_argument("--mlp-hidden", type=_widths, default=(20,),
                   help="mnist: hidden layer widths, comma-separated (default 20; e.g. 40 or 20,20)")
    p.add_argument("--activation", default="sigmoid", choices=["sigmoid", "relu", "tanh"],
                   help="mnist: hidden activation (default sigmoid, the paper's)")
    p.add_argument("--num-networks", type=positive_int, default=1,
                   help="mnist: networks optimised side by side in one task (default 1)")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch intra-op threads (default 1: the paper-sized problems are overhead-bound)")


def family_from_args(args: argparse.Namespace) -> Any:
    families = task_families()
    if args.task not in families:
        raise UsageError(f"unknown task {args.task!r}; known tasks: {', '.join(sorted(families))}")
    return families[args.task](args)


def resolve_training_state(args: argparse.Namespace) -> tuple[Path | None, int | None]:
    """Where and how often to write training states, from ``--checkpoint-every``, ``--state`` and
    ``--resume`` (``(None, None)``: none). A resumed run keeps its stored interval and file unless
    the flags say otherwise."""
    from ..checkpoints import load_training_state
    from ..meta.trainer import TRAINER

    # --checkpoint-every N writes to --state (default <out>.state.pt); --resume PATH
    # continues from PATH and keeps writing there at the interval it was written with.
    resume_state = load_training_state(args.resume, trainer=TRAINER) if args.resume is not None else None
    checkpoint_every = args.checkpoint_every
    if checkpoint_every is None and resume_state is not None:
        checkpoint_every = resume_state.get("checkpoint_every")
        checkpoint_every = checkpoint_every if isinstance(checkpoint_every, int) and checkpoint_every > 0 else None
    if args.state is not None and checkpoint_every is None:
        raise UsageError("--state needs --checkpoint-every N (how often to write the training state)")
    state_path = None
    if checkpoint_every is not None:
        state_path = args.state or args.resume or args.out.with_name(args.out.name + ".state.pt")
        if state_path.resolve() == args.out.resolve():
            raise UsageError(f"the training state and the checkpoint would both be written to {args.out}; "
                             "give --state another path")
        if state_path.is_dir():
            raise UsageError(f"--state {state_path} is a directory; give a file path")
    return state_path, checkpoint_every
