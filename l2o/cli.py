"""The ``l2o`` command line (also ``python -m l2o``): the only module that imports optimizees.

Exit codes: 0 success, 2 bad usage or bad input (unknown task, bad value, missing or malformed
file), 1 a failure while running (e.g. meta-training diverged).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from . import __version__

EXAMPLES = """examples:
  l2o meta-train --task quadratic --out runs/quadratic.pt
  l2o compare --task quadratic --rule runs/quadratic.pt --json runs/quadratic.json --plot runs/quadratic.png
  l2o compare --task quadratic --rule runs/quadratic.pt --horizon 200
"""


class UsageError(ValueError):
    """Bad command-line input (exit code 2)."""


def _mnist_family(args: argparse.Namespace, eval_split: str = "val") -> Any:
    from optimizees.mlp import MLPFamily
    from optimizees.rescaled import RescaledFamily

    family: Any = MLPFamily(data_dir=args.data, hidden=args.mlp_hidden, activation=args.activation,
                            num_networks=args.num_networks, eval_split=eval_split)
    if getattr(args, "random_scaling", 0.0):
        family = RescaledFamily(family, args.random_scaling)
    return family


def _task_families() -> dict[str, Callable[[argparse.Namespace], Any]]:
    from optimizees.quadratic import QuadraticFamily

    return {"quadratic": lambda a: QuadraticFamily(dim=a.dim, num_functions=a.num_functions),
            "mnist": _mnist_family}


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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def _add_task_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, help="task family: quadratic or mnist")
    p.add_argument("--dim", type=_positive_int, default=10, help="quadratic: dimension d (default 10)")
    p.add_argument("--num-functions", type=_positive_int, default=128,
                   help="quadratic: functions batched in one task (default 128)")
    p.add_argument("--data", type=Path, default=None,
                   help="mnist: directory with the MNIST IDX files (default: $L2O_DATA)")
    p.add_argument("--mlp-hidden", type=_widths, default=(20,),
                   help="mnist: hidden layer widths, comma-separated (default 20; e.g. 40 or 20,20)")
    p.add_argument("--activation", default="sigmoid", choices=["sigmoid", "relu", "tanh"],
                   help="mnist: hidden activation (default sigmoid, the paper's)")
    p.add_argument("--num-networks", type=_positive_int, default=1,
                   help="mnist: networks optimised side by side in one task (default 1)")
    p.add_argument("--threads", type=_positive_int, default=1,
                   help="torch intra-op threads (default 1: the paper-sized problems are overhead-bound)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="l2o", description="Learned optimizers and MAML on one unroll engine.",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"l2o {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    mt = sub.add_parser("meta-train", help="meta-train a coordinate-wise LSTM rule on a task family",
                        description="Meta-train a coordinate-wise LSTM rule (Andrychowicz et al. 2016) and save "
                                    "the best validated weights as a checkpoint.",
                        epilog="example:\n  l2o meta-train --task quadratic --out runs/quadratic.pt",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_task_args(mt)
    mt.add_argument("--out", required=True, type=Path, help="checkpoint path to write")
    mt.add_argument("--epochs", type=_positive_int, default=None, help="tasks to train on (default 1000)")
    mt.add_argument("--horizon", type=_positive_int, default=100, help="inner steps per task (default 100)")
    mt.add_argument("--truncation", type=_positive_int, default=20, help="inner steps per meta-step (default 20)")
    mt.add_argument("--meta-lr", type=_positive_float, default=None, help="initial Adam meta learning rate (default 1e-2)")
    mt.add_argument("--meta-lr-final", type=_positive_float, default=None, help="final meta lr of the cosine decay (default 1e-4)")
    mt.add_argument("--validate-every", type=_positive_int, default=None, help="epochs between validations (default 50)")
    mt.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    mt.add_argument("--hidden-size", type=_positive_int, default=20, help="LSTM units per layer (default 20)")
    mt.add_argument("--layers", type=_positive_int, default=2, help="LSTM layers (default 2)")
    mt.add_argument("--preprocess", default=None, choices=["none", "log_sign", "rnnprop"],
                    help="LSTM inputs: none (quadratic default), log_sign (mnist default) or rnnprop "
                         "(Adam-normalised gradient and momentum)")
    mt.add_argument("--output-scale", type=_positive_float, default=None,
                    help="output scale (default 1.0 on quadratic, 0.1 on mnist)")
    mt.add_argument("--random-scaling", type=_nonnegative_float, default=0.0,
                    help="mnist: rescale each coordinate of the optimizee by exp(U[-k, k]) during meta-training "
                         "(RNNprop-style; default 0: off)")
    mt.add_argument("--zero-init-output", action="store_true", help="start from a zero output layer")
    mt.add_argument("--step-weights", default=None, choices=["uniform", "linear"],
                    help="meta-loss weight of inner step t: uniform (the paper, default) or linear (t / horizon)")
    mt.add_argument("--second-order", action="store_true", help="differentiate through task gradients")
    mt.add_argument("--objective", default=None, choices=["loss", "log_loss"],
                    help="meta-loss terms: loss (the paper, default) or log_loss")
    mt.add_argument("--no-progress", action="store_true", help="no progress bar")
    mt.add_argument("--checkpoint-every", type=_positive_int, default=None, metavar="N",
                    help="write a training state every N meta-steps (atomically, to --state) so that the run "
                         "can be continued with --resume")
    mt.add_argument("--state", type=Path, default=None, metavar="PATH",
                    help="training-state file for --checkpoint-every (default: <out>.state.pt; with --resume: "
                         "the file resumed from)")
    mt.add_argument("--resume", type=Path, default=None, metavar="PATH",
                    help="continue the run saved in this training-state file, bitwise identically; give the "
                         "same arguments as the run that wrote it (keeps checkpointing at its interval unless "
                         "--checkpoint-every is given)")
    mt.set_defaults(func=cmd_meta_train)

    cp = sub.add_parser("compare", help="compare a rule with lr-tuned SGD, NAG, RMSprop and Adam",
                        description="Tune the baselines' learning rates on tuning tasks, then evaluate the rule and "
                                    "the baselines on held-out tasks; print a table, optionally write JSON and a plot.",
                        epilog="example:\n  l2o compare --task quadratic --rule runs/quadratic.pt --json r.json --plot r.png",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_task_args(cp)
    cp.add_argument("--rule", type=Path, default=None, help="checkpoint of the learned rule (omit: baselines only)")
    cp.add_argument("--horizon", type=_positive_int, default=100, help="inner steps to evaluate (default 100)")
    cp.add_argument("--num-tasks", type=_positive_int, default=None,
                    help="held-out instances (default 1000 quadratics, 100 mnist networks)")
    cp.add_argument("--num-tuning-tasks", type=_positive_int, default=None,
                    help="tuning instances (default 1000 quadratics, 20 mnist networks)")
    cp.add_argument("--seed", type=int, default=10_000, help="tuning seed; held-out tasks use seed + 10000")
    cp.add_argument("--json", type=Path, default=None, help="write the results here")
    cp.add_argument("--plot", type=Path, default=None, help="write a loss-vs-step plot here (PNG/PDF/SVG)")
    cp.set_defaults(func=cmd_compare)
    return parser


def _family(args: argparse.Namespace) -> Any:
    families = _task_families()
    if args.task not in families:
        raise UsageError(f"unknown task {args.task!r}; known tasks: {', '.join(sorted(families))}")
    return families[args.task](args)


def cmd_meta_train(args: argparse.Namespace) -> int:
    from .checkpoints import load_training_state, save_rule
    from .meta import MetaTrainConfig, MetaTrainingError, meta_train
    from .meta.trainer import TRAINER
    from .perf import configure_cpu
    from .rules import LSTMRule

    family = _family(args)
    config = MetaTrainConfig(horizon=args.horizon, truncation=args.truncation, seed=args.seed)
    for field, value in (("epochs", args.epochs), ("meta_lr", args.meta_lr), ("meta_lr_final", args.meta_lr_final),
                         ("validate_every", args.validate_every)):
        if value is not None:
            setattr(config, field, value)
    config.second_order = args.second_order
    if args.objective is not None:
        config.objective = args.objective
    if args.step_weights is not None:
        config.step_weights = args.step_weights
    config.validate()
    # Training states: --checkpoint-every N writes to --state (default <out>.state.pt); --resume PATH
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
    cpu = configure_cpu(args.threads)
    import torch

    torch.manual_seed(args.seed)
    defaults = RULE_DEFAULTS[args.task]
    rule = LSTMRule(hidden_size=args.hidden_size, num_layers=args.layers,
                    preprocess=args.preprocess or defaults["preprocess"],
                    output_scale=args.output_scale or defaults["output_scale"], zero_init_output=args.zero_init_output)
    if not args.out.parent.exists():
        args.out.parent.mkdir(parents=True)
    try:
        result = meta_train(rule, family, config, progress=not args.no_progress, checkpoint_path=state_path,
                            checkpoint_every=checkpoint_every, resume=args.resume)
    except MetaTrainingError as exc:
        if state_path is not None and state_path.is_file():
            raise MetaTrainingError(f"{exc}; the last good training state is intact in {state_path}") from None
        raise
    provenance = {
        "task": args.task,
        "task_config": family.config(),
        "train_config": config.to_dict(),
        "seed": args.seed,
        "meta_steps": result.meta_steps,
        "skipped_steps": result.skipped_steps,
        "best_epoch": result.best_epoch,
        "best_val_loss": result.best_val_loss,
        "seconds": round(result.seconds, 1),
        "resumed_at_meta_step": result.resumed_at,
        "command": "l2o " + " ".join(sys.argv[1:]),
        "cpu": cpu,
    }
    save_rule(args.out, result.rule, provenance)
    resumed = "" if result.resumed_at is None else f" (resumed at meta-step {result.resumed_at})"
    skipped = (f"skipped {result.skipped_steps} of them (non-finite meta-loss or meta-gradient; tasks resampled)"
               if result.skipped_steps else "skipped 0")
    best = ("no validation" if result.best_val_loss is None
            else f"best validation loss {result.best_val_loss:.4g} at epoch {result.best_epoch}")
    state = "" if state_path is None else f"; training state in {state_path}"
    print(f"meta-trained {result.meta_steps} meta-steps in {result.seconds:.0f}s{resumed}, {skipped}; {best}; "
          f"wrote {args.out}{state}")
    return 0


def _table(report: dict[str, Any]) -> str:
    rows = [("rule", "lr", f"loss@{report['horizon']} mean", "std", "vs adam")]
    adam = report["results"].get("adam", {}).get("final_loss_mean")
    for name, r in report["results"].items():
        ratio = f"{r['final_loss_mean'] / adam:.3f}" if adam else "-"
        lr = "-" if r["lr"] is None else f"{r['lr']:.3g}"
        rows.append((name, lr, f"{r['final_loss_mean']:.4g}", f"{r['final_loss_std']:.3g}", ratio))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows)


def plot_report(report: dict[str, Any], path: Path) -> None:
    """Loss-vs-step plot (log scale) of every rule in a compare report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, r in report["results"].items():
        label = name if r["lr"] is None else f"{name} (lr {r['lr']:.3g})"
        ax.plot(range(len(r["curve"])), r["curve"], label=label, lw=2.2 if name == "learned" else 1.4)
    ax.set_yscale("log")
    ax.set_xlabel("inner step")
    ax.set_ylabel(f"mean training loss, {report['num_tasks']} held-out tasks")
    ax.set_title(f"{report['task']}: learned rule vs lr-tuned baselines")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_compare(args: argparse.Namespace) -> int:
    from .checkpoints import load_rule
    from .meta import compare
    from .perf import configure_cpu

    rule = load_rule(args.rule) if args.rule is not None else None
    defaults = COMPARE_DEFAULTS.get(args.task, COMPARE_DEFAULTS["quadratic"])
    if args.task == "mnist":  # tune on the validation images, report on the test images
        if args.num_networks == 1:
            args.num_networks = defaults["num_networks"]
        family = _mnist_family(args, eval_split="test")
        tuning_family = family.with_eval_split("val")
    else:
        family = _family(args)
        tuning_family = None
    configure_cpu(args.threads)
    report = compare(rule, family, horizon=args.horizon, num_tasks=args.num_tasks or defaults["num_tasks"],
                     num_tuning_tasks=args.num_tuning_tasks or defaults["num_tuning_tasks"],
                     tuning_seed=args.seed, eval_seed=args.seed + 10_000, tuning_family=tuning_family)
    if args.rule is not None:
        report["rule"] = str(args.rule)
    print(_table(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    if args.plot is not None:
        plot_report(report, args.plot)
        print(f"wrote {args.plot}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from .checkpoints import CheckpointError
    from .meta import MetaTrainingError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, CheckpointError, ValueError, TypeError, FileNotFoundError) as exc:
        print(f"l2o {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except MetaTrainingError as exc:
        print(f"l2o {args.command}: failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"l2o {args.command}: interrupted", file=sys.stderr)
        return 130
