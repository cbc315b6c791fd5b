"""Shared pieces of the ``l2o`` commands: argument types, task families, errors.

This package is the only part of l2o that imports ``optimizees``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn

__all__ = ["UsageError", "checking_arguments", "RULE_DEFAULTS", "META_TRAIN_DEFAULTS", "RUN_DEFAULTS", "COMPARE_DEFAULTS", "default_threads", "positive_int", "positive_float", "nonnegative_float",
           "add_task_args", "family_from_args", "mnist_family", "resolve_training_state", "device_name", "plot_path",
           "add_device_arg", "resolve_device", "DeviceFamily", "on_device", "format_table", "write_json",
           "RuleProgress", "add_distributed_args", "init_distributed", "tasks_per_step"]


class UsageError(ValueError):
    """Bad command-line input (exit code 2)."""


@contextlib.contextmanager
def checking_arguments() -> Iterator[None]:
    """Around the code of a command that turns its arguments into objects (configs, rules, task
    families, files it reads) before any work is done: a ``ValueError``, ``TypeError`` or
    ``FileNotFoundError`` raised there is bad input, re-raised as a :class:`UsageError` (exit 2)
    with the same message. The same errors raised later, while the command runs, are failures
    (exit 1)."""
    from ..checkpoints import CheckpointError

    try:
        yield
    except (UsageError, CheckpointError):
        raise
    except (ValueError, TypeError, FileNotFoundError) as exc:
        raise UsageError(str(exc)) from exc


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line (``l2o CMD: error: ...``, exit 2),
    pointing at ``--help`` instead of printing the whole usage."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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
            "mnist": mnist_family, "generalist": generalist_family}


def generalist_family(args: argparse.Namespace) -> Any:
    from optimizees.generalist import generalist_family as mixture

    return mixture(args.data, components=getattr(args, "components", None))


#: Per-task defaults of the LSTM rule built by ``l2o meta-train``. Quadratics: the paper's raw-gradient
#: inputs with output scale 0.01 instead of its 1 (0.29x tuned Adam at step 100 against 0.36x, in the
#: same meta-training time; measured 1 / 0.3 / 0.1 / 0.03 / 0.01: 0.359 / 0.350 / 0.320 / 0.297 / 0.291).
#: MNIST: the paper's log/sign inputs and output scale 0.1.
RULE_DEFAULTS = {"quadratic": {"preprocess": "none", "output_scale": 0.01},
                 "mnist": {"preprocess": "log_sign", "output_scale": 0.1},
                 "generalist": {}}


#: Per-task defaults of ``l2o meta-train`` (``--first-order`` / ``--second-order`` override them).
#: Quadratics: second order reached 0.36x tuned Adam at step 100 where first order (the paper's
#: choice) stayed at 0.50x, in the same meta-training time (output scale 1; benchmarks/README.md).
META_TRAIN_DEFAULTS = {"quadratic": {"second_order": True},
                       "mnist": {"second_order": False},
                       "generalist": {"second_order": False}}

#: ``l2o meta-train``'s defaults by task for what the command line leaves out: the rule and the
#: run's schedule (the generalist: an MLPRule's recipe on the mixture, see
#: ``docs/meta-training.md``).
RUN_DEFAULTS = {
    "quadratic": {"rule": "lstm", "horizon": 100, "truncation": 20},
    "mnist": {"rule": "lstm", "horizon": 100, "truncation": 20},
    "generalist": {"rule": "mlp", "horizon": 400, "truncation": 25, "horizon_schedule": "log_uniform",
                   "min_horizon": 50, "objective": "log_loss", "tasks_per_step": 4, "epochs": 400,
                   "meta_lr": 1e-3, "meta_lr_final": 1e-4, "validate_every": 50, "num_val_tasks": 8,
                   "val_horizon": 1000, "meta_split": "meta",
                   "tell_total_steps": 0.5},
}


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


def _number(text: str, kind: type, ok: Callable[[float], bool], expected: str) -> Any:
    """``text`` parsed as ``kind`` (int or float) and checked with ``ok``; else an argparse error."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not (math.isfinite(value) and ok(value)):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
    return value


def components(text: str) -> dict[str, float]:
    """``--components``: ``NAME=WEIGHT`` pairs separated by commas (``mnist-mlp=3,markov-transformer=2``)."""
    out: dict[str, float] = {}
    for part in text.split(","):
        name, sep, weight = (x.strip() for x in part.partition("="))
        if not sep or not name:
            raise argparse.ArgumentTypeError(f"expected NAME=WEIGHT pairs separated by commas (e.g. mnist-mlp=3,"
                                             f"markov-transformer=2), got {text!r}")
        if name in out:
            raise argparse.ArgumentTypeError(f"component {name!r} is named twice in {text!r}")
        out[name] = _number(weight, float, lambda v: v > 0, "a positive number")
    return out


def positive_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 1, "a positive integer")


def positive_float(text: str) -> float:
    return _number(text, float, lambda v: v > 0, "a positive number")


def nonnegative_float(text: str) -> float:
    return _number(text, float, lambda v: v >= 0, "a number >= 0")


def probability(text: str) -> float:
    return _number(text, float, lambda v: 0 <= v <= 1, "a probability in [0, 1]")


def float_pair(text: str) -> tuple[float, float]:
    """``"0.9,0.999"`` -> ``(0.9, 0.999)`` (ranges are checked by whoever uses the pair)."""
    parts = text.split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected two numbers separated by a comma (e.g. 0.9,0.999), got {text!r}")
    first, second = (_number(part.strip(), float, math.isfinite, "a number") for part in parts)
    return first, second


def add_task_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, help="task family: quadratic, mnist, or (meta-train only) generalist, "
                                                 "the mixture of small models a generalist rule is meta-trained on")
    p.add_argument("--dim", type=positive_int, default=10, help="quadratic: dimension d (default 10)")
    p.add_argument("--num-functions", type=positive_int, default=128,
                   help="quadratic: functions batched in one task (default 128)")
    p.add_argument("--data", type=Path, default=None,
                   help="mnist, generalist: directory with the MNIST IDX files (and, generalist, the Omniglot "
                        "zips) (default: $L2O_DATA)")
    p.add_argument("--mlp-hidden", type=_widths, default=(20,),
                   help="mnist: hidden layer widths, comma-separated (default 20; e.g. 40 or 20,20)")
    p.add_argument("--activation", default="sigmoid", choices=["sigmoid", "relu", "tanh"],
                   help="mnist: hidden activation (default sigmoid, the paper's)")
    p.add_argument("--num-networks", type=positive_int, default=1,
                   help="mnist: networks optimised side by side in one task (default 1)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch intra-op threads (default: 1 on quadratic, whose paper-sized problems are "
                        "overhead-bound; on mnist the CPU's cores up to 2, measured 1.3-1.6x faster meta-training "
                        "than 1 thread; 1 with --distributed)")


def default_threads(task: str, distributed: bool = False) -> int:
    """The ``--threads`` default: 1 on quadratics (overhead-bound) and for ``--distributed`` runs (one
    process per core), else, on MNIST, the available cores up to 2 (20 meta-training epochs of the
    paper's MLP: 33.5-33.9 s on 1 thread, 20.7-26.3 s on 2, on this project's 2-core machine)."""
    if task not in ("mnist", "generalist") or distributed:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(2, cores))


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
    from ..meta.training_state import TRAINER

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


# --- devices, output files, tables and progress (shared by every command) ---------------------------------------

PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def device_name(text: str) -> str:
    """argparse type of ``--device``: ``cpu``, ``cuda`` or ``cuda:N`` (availability is checked later,
    by :func:`resolve_device`, so that a missing GPU is a one-line error)."""
    name = text.strip().lower()
    if name in ("cpu", "cuda") or (name.startswith("cuda:") and name[5:].isdigit()):
        return name
    raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")


def plot_path(text: str) -> Path:
    """argparse type of ``--plot``: a path whose suffix matplotlib writes (checked before any work is done)."""
    path = Path(text)
    if path.suffix.lower() not in PLOT_SUFFIXES:
        raise argparse.ArgumentTypeError(f"expected a figure path ending in {', '.join(PLOT_SUFFIXES)}, got {text!r}")
    return path


def add_device_arg(p: argparse.ArgumentParser, note: str = "") -> None:
    """Add ``--device`` (default cpu); ``note`` says where cuda is not supported."""
    p.add_argument("--device", type=device_name, default="cpu",
                   help="cpu (default) or cuda / cuda:N (needs a CUDA build of torch and a GPU)" + (f"; {note}" if note else ""))


def resolve_device(args: argparse.Namespace) -> Any:
    """The ``torch.device`` of ``--device``; a :class:`UsageError` when CUDA is asked for but unavailable."""
    import torch

    name = getattr(args, "device", "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch is a CPU-only build" if torch.version.cuda is None
                   else "no CUDA GPU is visible to this process")
            raise UsageError(f"--device {name}: CUDA is not available ({why}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA device(s)")
    return device


def _move(task: Any, device: Any) -> Any:
    to = getattr(task, "to", None)
    if not callable(to):
        raise UsageError(f"--device {device}: {type(task).__name__} tasks cannot be moved to a device yet; "
                         "use --device cpu")
    return to(device=device)


class DeviceFamily:
    """A task family whose tasks (and models) are moved to ``device`` with their ``to`` method.

    Everything else (``name``, ``config``, further attributes) is the wrapped family's.
    """

    def __init__(self, family: Any, device: Any) -> None:
        self.family = family
        self.device = device
        self.name = getattr(family, "name", type(family).__name__)

    def sample(self, generator: Any, *args: Any, **kwargs: Any) -> Any:
        """A task of the wrapped family, on :attr:`device`."""
        return _move(self.family.sample(generator, *args, **kwargs), self.device)

    def config(self) -> dict[str, Any]:
        """The wrapped family's config."""
        return self.family.config()

    def model(self) -> Any:
        """The wrapped family's model, on :attr:`device`."""
        return self.family.model().to(self.device)

    def __getattr__(self, name: str) -> Any:
        if name in ("family", "device"):  # not set yet (copy/pickle): no recursion
            raise AttributeError(name)
        value = getattr(self.family, name)
        if name == "evaluation_tasks":
            return lambda *args, **kwargs: _move(value(*args, **kwargs), self.device)
        return value


def on_device(family: Any, device: Any) -> Any:
    """``family`` itself on the CPU; else a :class:`DeviceFamily`, after checking with one throwaway
    task that its tasks can move (a :class:`UsageError` naming the task type if not)."""
    if device.type == "cpu":
        return family
    import torch

    _move(family.sample(torch.Generator().manual_seed(0)), device)
    return DeviceFamily(family, device)


def format_table(rows: list[tuple[str, ...]] | list[list[str]]) -> str:
    """Rows of strings (the first is the header) as left-aligned columns."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def compact_history(history: dict[str, list[float]], max_points: int = 2000) -> dict[str, Any]:
    """``history`` with a long per-iteration ``epoch_loss`` replaced by block means (at most
    ``max_points`` of them, ``epoch_loss_block`` iterations each), so that JSON reports stay small."""
    losses = history.get("epoch_loss", [])
    if len(losses) <= max_points:
        return dict(history)
    block = -(-len(losses) // max_points)
    means = [sum(losses[i:i + block]) / len(losses[i:i + block]) for i in range(0, len(losses), block)]
    return {**history, "epoch_loss": means, "epoch_loss_block": block}


def save_figure(fig: Any, path: Path) -> None:
    """Lay out ``fig``, write it to ``path`` (creating its directory) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def prepare_run(args: argparse.Namespace) -> tuple[Any, Path | None, int | None, int, int, Any]:
    """What ``meta-train`` and ``maml`` set up before training: the device (``--resume`` is
    CPU-only), the training-state file and interval, the distributed rank and world size, and the
    CPU settings. Returns ``(device, state_path, checkpoint_every, rank, world, cpu)``."""
    from ..perf import configure_cpu

    device = resolve_device(args)
    if device.type != "cpu" and args.resume is not None:
        raise UsageError(f"--resume continues a run on the CPU only (training states are restored there); "
                         f"drop --device {args.device}")
    state_path, checkpoint_every = resolve_training_state(args)
    rank, world, device = init_distributed(args, device)
    cpu = configure_cpu(args.threads)
    return device, state_path, checkpoint_every, rank, world, cpu


def tasks_per_step(args: argparse.Namespace, world: int, default: int | None = None) -> int:
    """``--tasks-per-step`` (default: ``default``, else the number of ranks), which the ranks must
    divide (a :class:`UsageError` if not)."""
    tasks = args.tasks_per_step or default or world
    if tasks % world:
        raise UsageError(f"--tasks-per-step {tasks} must be a multiple of the number of ranks ({world}): each rank "
                         "takes the same share of every meta-batch")
    return tasks


def say(*lines: str, err: bool = False) -> None:
    """The commands' one way to talk to the user: each line to stdout (``err``: stderr)."""
    stream = sys.stderr if err else sys.stdout
    for line in lines:
        stream.write(f"{line}\n")
    stream.flush()


def write_outputs(args: argparse.Namespace, data: Any, plot: Callable[[Path], None] | None = None) -> None:
    """Write ``data`` to ``--json`` and draw ``plot(path)`` to ``--plot``, where given, saying so."""
    if getattr(args, "json", None) is not None:
        write_json(args.json, data)
        say(f"wrote {args.json}")
    if plot is not None and getattr(args, "plot", None) is not None:
        plot(args.plot)
        say(f"wrote {args.plot}")


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` (creating its directory)."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


class RuleProgress:
    """A tqdm bar with one tick per rule, driven by the ``progress(label)`` callback of
    :func:`l2o.meta.compare` (called as each rule starts): the description names the rule being
    evaluated or lr-tuned."""

    def __init__(self, labels: list[str], *, num_lrs: int, disable: bool) -> None:
        from tqdm.auto import tqdm

        self.num_lrs = num_lrs
        self.bar = tqdm(total=len(labels), desc="compare", unit="rule", disable=disable)
        self.started = False

    def __call__(self, label: str) -> None:
        from ..rules import HAND_RULES

        if self.started:
            self.bar.update(1)
        self.started = True
        what = f"tuning {label} ({self.num_lrs} lrs)" if label in HAND_RULES else f"evaluating {label}"
        self.bar.set_description(f"compare: {what}")

    def close(self) -> None:
        """Complete and close the bar."""
        if self.started:
            self.bar.update(self.bar.total - self.bar.n)
        self.bar.close()


# --- distributed meta-training (torchrun) ------------------------------------------------------------------------

#: The environment torchrun (or any launcher) gives every process of a run.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def add_distributed_args(p: argparse.ArgumentParser, tasks: str = "tasks") -> None:
    """Add ``--distributed``, ``--dist-timeout`` and ``--tasks-per-step`` (whose help calls a task ``tasks``)."""
    p.add_argument("--tasks-per-step", type=positive_int, default=None, metavar="T",
                   help=f"{tasks} whose meta-gradients are averaged in each meta-step (default 1; with "
                        "--distributed the number of ranks, which must divide it)")
    p.add_argument("--distributed", action="store_true",
                   help="share each meta-batch over the processes started by torchrun (torch.distributed: gloo on "
                        "the CPU, nccl with --device cuda); rank 0 writes every file")
    p.add_argument("--dist-timeout", type=positive_float, default=600.0, metavar="SECONDS",
                   help="with --distributed: how long a rank waits for the others in a collective before failing "
                        "with an error (default 600)")


def init_distributed(args: argparse.Namespace, device: Any) -> tuple[int, int, Any]:
    """Join the process group of a torchrun launch for ``--distributed``: ``(rank, world_size, device)``.

    The backend is gloo on the CPU and nccl on CUDA, where each rank takes the GPU ``LOCAL_RANK``.
    An already initialised default process group is used as it is. Without ``--distributed``:
    ``(0, 1, device)``, after refusing a launch of several processes (they would all write the
    same files).
    """
    import os

    world = os.environ.get("WORLD_SIZE", "1")
    if not args.distributed:
        if world.isdigit() and int(world) > 1:
            raise UsageError(f"this process is one of {world} (WORLD_SIZE={world}, e.g. torchrun) but --distributed "
                             "was not given: every process would train on its own and write the same files; add "
                             "--distributed")
        return 0, 1, device
    import datetime

    import torch
    import torch.distributed as dist

    if not dist.is_available():
        raise UsageError("--distributed: this torch build has no torch.distributed")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        missing = [k for k in TORCHRUN_ENV if k not in os.environ]
        if missing:
            raise UsageError(f"--distributed needs the environment torchrun sets ({', '.join(missing)} missing): "
                             "launch with torchrun --nproc_per_node N -m l2o ... --distributed")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=args.dist_timeout))
        _OWN_PROCESS_GROUP[0] = True
    return dist.get_rank(), dist.get_world_size(), device


#: Whether this process's command created the process group (and so ends the process: see
#: :func:`leave_distributed`).
_OWN_PROCESS_GROUP = [False]


def leave_distributed(code: int) -> int:
    """After a command: if it created the process group, destroy it (unless one of its collectives
    failed: destroying a broken gloo group can abort the process, and the OS closes its sockets
    anyway) and end the process with ``code`` through
    :func:`l2o.meta.trainer.end_distributed_process`; otherwise return ``code``."""
    if not _OWN_PROCESS_GROUP[0]:
        return code
    import torch.distributed as dist

    from ..meta.distributed import Distributed, end_distributed_process

    if not Distributed.failed and dist.is_initialized():
        dist.destroy_process_group()
    end_distributed_process(code)

