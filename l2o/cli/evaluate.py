"""``l2o evaluate`` (a learned rule on held-out tasks, no baselines) and ``l2o list-pretrained``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from .common import (COMPARE_DEFAULTS, add_device_arg, add_task_args, checking_arguments, family_from_args, format_table,
                     mnist_family, on_device, plot_path, positive_int, resolve_device, save_figure, say,
                     UsageError, write_outputs)

__all__ = ["add_evaluate_parser", "add_list_pretrained_parser", "cmd_evaluate", "cmd_list_pretrained",
           "evaluate_rule", "plot_evaluation"]

EVALUATE_EXAMPLES = """examples:
  l2o evaluate --task quadratic --pretrained quadratic
  l2o evaluate --task quadratic --rule runs/quadratic.pt --horizon 200 --json runs/eval.json --plot runs/eval.png
  l2o evaluate --task mnist --data ../shared/data --rule runs/mnist.pt --num-tasks 40

With the default --seed the held-out tasks are those of `l2o compare` (its default --seed), so the
numbers equal compare's "learned" row, without the cost of tuning the baselines.
"""

LIST_EXAMPLES = """examples:
  l2o list-pretrained
  l2o list-pretrained --json pretrained.json
"""


def add_evaluate_parser(sub: Any) -> None:
    p = sub.add_parser("evaluate", help="evaluate a learned rule on held-out tasks (no baseline tuning)",
                       description="Run a learned rule (a checkpoint or a shipped pretrained rule) on held-out tasks "
                                   "of a task family and report the mean ± std of the final loss (on the task's "
                                   "evaluation split) and the loss curve; no baselines are tuned (see l2o compare).",
                       epilog=EVALUATE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_task_args(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--rule", type=Path, default=None, help="checkpoint of the learned rule (from l2o meta-train)")
    source.add_argument("--pretrained", default=None, metavar="NAME",
                        help="a shipped pretrained rule by name (see l2o list-pretrained)")
    p.add_argument("--horizon", type=positive_int, default=100, help="inner steps (default 100)")
    p.add_argument("--num-tasks", type=positive_int, default=None,
                   help="held-out instances (default 1000 quadratics, 100 mnist networks)")
    p.add_argument("--seed", type=int, default=20_000,
                   help="seed of the held-out tasks (default 20000: the held-out tasks of l2o compare's default)")
    p.add_argument("--json", type=Path, default=None, help="write the results (summary and curves) here")
    p.add_argument("--plot", type=plot_path, default=None, help="write the loss-vs-step plot here (PNG/PDF/SVG)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_device_arg(p, "quadratic only (MNIST tasks stay on the CPU)")
    p.set_defaults(func=cmd_evaluate)


def add_list_pretrained_parser(sub: Any) -> None:
    p = sub.add_parser("list-pretrained", help="list the shipped pretrained rules",
                       description="List the pretrained rules shipped with l2o (l2o.list_pretrained()): name, task, "
                                   "description and the command that trained each. Load one with "
                                   "l2o.LearnedOptimizer(params, pretrained=NAME) or evaluate it with "
                                   "l2o evaluate --pretrained NAME.",
                       epilog=LIST_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, default=None, help="also write the full index entries here")
    p.set_defaults(func=cmd_list_pretrained)


def cmd_list_pretrained(args: argparse.Namespace) -> int:
    from ..pretrained import list_pretrained

    with checking_arguments():
        entries = list_pretrained()
    if not entries:
        say("no pretrained rules are shipped in this installation")
    else:
        rows = [("name", "task", "description", "training command")]
        rows += [(e["name"], e["task"], e["description"], e["command"]) for e in entries]
        say(format_table(rows))
    write_outputs(args, entries)
    return 0


def _load(args: argparse.Namespace) -> tuple[Any, str, str | None]:
    """(rule, where it came from, the task it was meta-trained on)."""
    if args.pretrained is not None:
        from ..pretrained import list_pretrained, load_pretrained

        rule = load_pretrained(args.pretrained)
        entry = next(e for e in list_pretrained() if e["name"] == args.pretrained)
        return rule, f"pretrained {args.pretrained!r}", entry.get("task")
    from ..checkpoints import load_checkpoint, rule_from_checkpoint

    data = load_checkpoint(args.rule)
    provenance = data.get("provenance") or {}
    if provenance.get("mode") == "maml" or data.get("init") is not None:
        raise UsageError(f"{args.rule} is a MAML checkpoint (a learned initialisation and its inner rule); "
                         "l2o maml evaluates those on held-out tasks")
    return rule_from_checkpoint(data, source=str(args.rule)), str(args.rule), provenance.get("task")


def evaluate_rule(rule: Any, family: Any, *, horizon: int, num_tasks: int, seed: int,
                  progress: bool = True, desc: str = "evaluate") -> dict[str, Any]:
    """Run ``rule`` for ``horizon`` steps on ``num_tasks`` held-out instances of ``family`` (drawn with
    ``seed``, as :func:`l2o.meta.compare` draws its held-out tasks with ``eval_seed``) and summarise.

    Uses :func:`l2o.meta.evaluate.run_rule` one task at a time (the same seeds as one call on all
    tasks) so that a progress bar can follow it. Returns ``final_loss_mean/std`` (the final params on
    the evaluation split), ``final_train_loss_mean``, ``diverged`` (instances with a non-finite final
    loss) and the per-step training-loss ``curve`` (mean), ``curve_std``, ``curve_median``,
    ``curve_q25``, ``curve_q75``.
    """
    import torch
    from tqdm.auto import tqdm

    from ..meta.evaluate import run_rule, sample_tasks

    tasks = sample_tasks(family, num_tasks, seed)
    curves, finals = [], []
    with tqdm(total=num_tasks, desc=desc, unit="instance", disable=not progress) as bar:
        for k, task in enumerate(tasks):
            curve, final = run_rule(rule, [task], horizon, seed + k)
            curves.append(curve.cpu())
            finals.append(final.cpu())
            bar.update(min(curve.shape[1], num_tasks - bar.n))
            bar.set_postfix(final_loss=f"{float(torch.cat(finals)[:num_tasks].mean()):.4g}")
    curve = torch.cat(curves, dim=1)[:, :num_tasks].double()
    final = torch.cat(finals)[:num_tasks].double()
    q = torch.quantile(curve, torch.tensor([0.25, 0.5, 0.75], dtype=curve.dtype), dim=1)

    def floats(t: Any) -> list[float]:
        return [float(v) for v in t]

    return {
        "horizon": horizon, "num_tasks": int(final.numel()), "seed": seed,
        "final_loss_mean": float(final.mean()),
        "final_loss_std": float(final.std()) if final.numel() > 1 else 0.0,
        "final_train_loss_mean": float(curve[-1].mean()),
        "diverged": int((~torch.isfinite(final)).sum()),
        "curve": floats(curve.mean(1)),
        "curve_std": floats(curve.std(1)) if curve.shape[1] > 1 else [0.0] * curve.shape[0],
        "curve_median": floats(q[1]), "curve_q25": floats(q[0]), "curve_q75": floats(q[2]),
    }


def plot_evaluation(report: dict[str, Any], path: Path) -> None:
    """Loss-vs-step plot (log scale) of an evaluation: mean, median and the interquartile band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = range(len(report["curve"]))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.fill_between(steps, report["curve_q25"], report["curve_q75"], alpha=0.25, label="25-75% of instances")
    ax.plot(steps, report["curve"], lw=2.0, label="mean")
    ax.plot(steps, report["curve_median"], lw=1.2, ls="--", label="median")
    ax.set_yscale("log")
    ax.set_xlabel("inner step")
    ax.set_ylabel(f"training loss, {report['num_tasks']} held-out instances")
    ax.set_title(f"{report['task']}: {report['rule']}")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    save_figure(fig, path)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..perf import configure_cpu

    with checking_arguments():  # bad values here are usage errors (exit 2); failures of the run exit 1
        if args.task == "generalist":
            raise UsageError("the generalist mixture is a meta-training distribution; its rule is evaluated on held-out "
                             "models by benchmarks/generalist.py (l2o evaluate takes --task quadratic or mnist)")
        device = resolve_device(args)
        rule, source, trained_on = _load(args)
        defaults = COMPARE_DEFAULTS.get(args.task, COMPARE_DEFAULTS["quadratic"])
        if args.task == "mnist":  # as l2o compare: networks batched per task, scored on the test images
            if args.num_networks == 1:
                args.num_networks = defaults["num_networks"]
            family = mnist_family(args, eval_split="test")
        else:
            family = family_from_args(args)
        cpu = configure_cpu(args.threads)
        family = on_device(family, device)
        rule = rule.to(device)
    start = time.perf_counter()
    summary = evaluate_rule(rule, family, horizon=args.horizon, num_tasks=args.num_tasks or defaults["num_tasks"],
                            seed=args.seed, progress=not args.no_progress, desc=f"evaluate on {args.task}")
    seconds = time.perf_counter() - start
    report = {"task": getattr(family, "name", args.task), "rule": source, "trained_on": trained_on,
              "task_config": family.config(), **summary, "device": str(device), "threads": cpu["threads"],
              "seconds": round(seconds, 2)}
    h = args.horizon
    say(format_table([
        ("rule", "task", "instances", f"loss@{h} mean", "std", "diverged"),
        (source, report["task"], str(report["num_tasks"]), f"{report['final_loss_mean']:.4g}",
         f"{report['final_loss_std']:.3g}", str(report["diverged"])),
    ]))
    marks = sorted({0, h // 4, h // 2, (3 * h) // 4, h})
    say(format_table([("step", "mean", "std", "median")] + [
        (str(t), f"{report['curve'][t]:.4g}", f"{report['curve_std'][t]:.3g}", f"{report['curve_median'][t]:.4g}")
        for t in marks]))
    if trained_on is not None and trained_on != args.task:
        say(f"note: the rule was meta-trained on {trained_on!r}, evaluated here on {args.task!r}")
    say(f"evaluated in {seconds:.1f}s on {device} (held-out seed {args.seed})")
    write_outputs(args, report, lambda path: plot_evaluation(report, path))
    return 0
