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


def _task_families() -> dict[str, Callable[[argparse.Namespace], Any]]:
    from optimizees.quadratic import QuadraticFamily

    return {"quadratic": lambda a: QuadraticFamily(dim=a.dim, num_functions=a.num_functions)}


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


def _add_task_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, help="task family: quadratic")
    p.add_argument("--dim", type=_positive_int, default=10, help="quadratic: dimension d (default 10)")
    p.add_argument("--num-functions", type=_positive_int, default=128,
                   help="quadratic: functions batched in one task (default 128)")
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
    mt.add_argument("--preprocess", default="none", help="gradient preprocessing: none or log_sign (default none)")
    mt.add_argument("--output-scale", type=_positive_float, default=1.0, help="output scale (default 1.0)")
    mt.add_argument("--zero-init-output", action="store_true", help="start from a zero output layer")
    mt.add_argument("--step-weights", default=None, choices=["uniform", "linear"],
                    help="meta-loss weight of inner step t: uniform (the paper, default) or linear (t / horizon)")
    mt.add_argument("--second-order", action="store_true", help="differentiate through task gradients")
    mt.add_argument("--objective", default=None, choices=["loss", "log_loss"],
                    help="meta-loss terms: loss (the paper, default) or log_loss")
    mt.add_argument("--no-progress", action="store_true", help="no progress bar")
    mt.set_defaults(func=cmd_meta_train)

    cp = sub.add_parser("compare", help="compare a rule with lr-tuned SGD, NAG, RMSprop and Adam",
                        description="Tune the baselines' learning rates on tuning tasks, then evaluate the rule and "
                                    "the baselines on held-out tasks; print a table, optionally write JSON and a plot.",
                        epilog="example:\n  l2o compare --task quadratic --rule runs/quadratic.pt --json r.json --plot r.png",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_task_args(cp)
    cp.add_argument("--rule", type=Path, default=None, help="checkpoint of the learned rule (omit: baselines only)")
    cp.add_argument("--horizon", type=_positive_int, default=100, help="inner steps to evaluate (default 100)")
    cp.add_argument("--num-tasks", type=_positive_int, default=1000, help="held-out instances (default 1000)")
    cp.add_argument("--num-tuning-tasks", type=_positive_int, default=1000, help="tuning instances (default 1000)")
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
    from .checkpoints import save_rule
    from .meta import MetaTrainConfig, meta_train
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
    cpu = configure_cpu(args.threads)
    import torch

    torch.manual_seed(args.seed)
    rule = LSTMRule(hidden_size=args.hidden_size, num_layers=args.layers, preprocess=args.preprocess,
                    output_scale=args.output_scale, zero_init_output=args.zero_init_output)
    if not args.out.parent.exists():
        args.out.parent.mkdir(parents=True)
    result = meta_train(rule, family, config, progress=not args.no_progress)
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
        "command": "l2o " + " ".join(sys.argv[1:]),
        "cpu": cpu,
    }
    save_rule(args.out, result.rule, provenance)
    print(f"meta-trained {result.meta_steps} meta-steps in {result.seconds:.0f}s "
          f"(skipped {result.skipped_steps}); best validation loss {result.best_val_loss:.4g} "
          f"at epoch {result.best_epoch}; wrote {args.out}")
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
    ax.set_ylabel(f"mean loss over {report['num_tasks']} held-out tasks")
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

    family = _family(args)
    rule = load_rule(args.rule) if args.rule is not None else None
    configure_cpu(args.threads)
    report = compare(rule, family, horizon=args.horizon, num_tasks=args.num_tasks,
                     num_tuning_tasks=args.num_tuning_tasks, tuning_seed=args.seed, eval_seed=args.seed + 10_000)
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
