"""``l2o maml``: meta-learn an initialisation (MAML, Meta-SGD, or jointly with a learned optimizer).

The run is :func:`l2o.meta.meta_train` in MAML mode (``init=MAMLInit(model)``, horizon = the inner
steps, the meta-loss on the query set after the last one), then an evaluation on held-out tasks:
the query loss (and, for Omniglot, the accuracy) after 0, 1, ..., ``--eval-steps`` adaptation steps.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from .common import (add_device_arg, add_distributed_args, checking_arguments, compact_history, format_table,
                     nonnegative_float, on_device, plot_path, positive_float, positive_int, prepare_run, save_figure,
                     say, tasks_per_step, UsageError, write_outputs)

__all__ = ["add_maml_parser", "cmd_maml", "MAML_DEFAULTS"]

#: Per-task defaults (Finn et al. 2017): sine regression and 5-way Omniglot.
MAML_DEFAULTS: dict[str, dict[str, Any]] = {
    "sine": {"inner_lr": 0.01, "meta_batch": 25, "shots": 10, "query_shots": 10, "iterations": 2000,
             "eval_tasks": 600, "eval_steps": 10, "num_val_tasks": 20},
    "omniglot": {"inner_lr": 0.4, "meta_batch": 32, "shots": 1, "query_shots": 15, "iterations": 2000,
                 "eval_tasks": 600, "eval_steps": 3, "num_val_tasks": 2},
}
INNER_RULES = ("sgd", "metasgd", "lstm")

EXAMPLES = """examples:
  l2o maml --task sine --out runs/sine.pt --json runs/sine.json --plot runs/sine.png
  l2o maml --task sine --inner-rule metasgd --out runs/sine_metasgd.pt
  l2o maml --task omniglot --ways 5 --shots 1 --data ../shared/data --first-order --meta-batch 8 --out runs/omniglot.pt
  l2o maml --task omniglot --data ../shared/data --device cuda --out runs/omniglot.pt
"""


def add_maml_parser(sub: Any) -> None:
    p = sub.add_parser("maml", help="meta-learn an initialisation: MAML, Meta-SGD, or MAML with a learned optimizer",
                       description="Meta-train the initial params θ0 of a model (MAML, Finn et al. 2017) with the "
                                   "unroll engine; the inner rule is SGD (MAML), a learned per-coordinate rate "
                                   "(Meta-SGD) or a coordinate-wise LSTM meta-trained jointly with θ0. Then evaluate "
                                   "on held-out tasks.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, help="sine or omniglot")
    p.add_argument("--out", required=True, type=Path, help="checkpoint path (the rule and θ0)")
    p.add_argument("--json", type=Path, default=None, help="write the evaluation and training history here")
    p.add_argument("--plot", type=plot_path, default=None, help="write the held-out loss-vs-adaptation-steps plot here")
    p.add_argument("--data", type=Path, default=None, help="omniglot: directory with the zips (default $L2O_DATA)")
    p.add_argument("--ways", type=positive_int, default=5, help="omniglot: classes per episode (default 5)")
    p.add_argument("--shots", type=positive_int, default=None, help="support points per task (sine 10, omniglot 1)")
    p.add_argument("--query-shots", type=positive_int, default=None,
                   help="query points per task (sine 10; omniglot 15 per class)")
    p.add_argument("--channels", type=positive_int, default=64, help="omniglot: filters per conv layer (default 64)")
    p.add_argument("--iterations", type=positive_int, default=None, help="meta-iterations (default 2000)")
    p.add_argument("--meta-batch", type=positive_int, default=None, help="tasks per meta-iteration (sine 25, omniglot 32)")
    p.add_argument("--inner-steps", type=positive_int, default=1, help="adaptation steps during meta-training (default 1)")
    p.add_argument("--inner-lr", type=positive_float, default=None, help="inner learning rate (sine 0.01, omniglot 0.4)")
    p.add_argument("--inner-rule", default="sgd", choices=INNER_RULES,
                   help="sgd (MAML, default), metasgd (learned per-coordinate rates) or lstm (learned optimizer)")
    p.add_argument("--hidden-size", type=positive_int, default=10, help="lstm: units per layer (default 10)")
    p.add_argument("--zero-last-layer", action="store_true",
                   help="start θ0 with the model's last linear layer at zero (the output head): the first "
                        "adaptation step then fits the head from the support set's features")
    p.add_argument("--first-order", action="store_true", help="first-order MAML (no second derivatives)")
    p.add_argument("--meta-lr", type=positive_float, default=1e-3, help="Adam meta learning rate (default 1e-3)")
    p.add_argument("--meta-lr-final", type=positive_float, default=None,
                   help="decay the meta learning rate to this value over the run (cosine in log space; "
                        "default: constant)")
    p.add_argument("--max-grad-norm", type=nonnegative_float, default=10.0,
                   help="clip the meta-gradient's global norm (default 10; 0: off)")
    p.add_argument("--validate-every", type=positive_int, default=100, help="meta-iterations between validations")
    p.add_argument("--num-val-tasks", type=positive_int, default=None,
                   help="validation meta-batches, drawn once (sine 20, omniglot 2)")
    p.add_argument("--eval-tasks", type=positive_int, default=None, help="held-out tasks to evaluate (default 600)")
    p.add_argument("--eval-steps", type=positive_int, default=None,
                   help="adaptation steps in the evaluation (sine 10, omniglot 3)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--compile", nargs="?", const=True, default=False, metavar="BACKEND",
                    help="run each unroll through torch.compile (default backend inductor; or name one, e.g. "
                         "aot_eager): the same numbers up to float rounding; the first meta-steps compile "
                         "(seconds); if compiling fails, a warning and the eager engine")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--checkpoint-every", type=positive_int, default=None, metavar="N",
                   help="write a training state every N meta-iterations (continue with --resume)")
    p.add_argument("--state", type=Path, default=None, metavar="PATH",
                   help="training-state file for --checkpoint-every (default <out>.state.pt)")
    p.add_argument("--resume", type=Path, default=None, metavar="PATH",
                   help="continue the run saved in this training-state file (same arguments)")
    add_device_arg(p, "--resume only on the CPU")
    add_distributed_args(p, "task batches (each of --meta-batch tasks)")
    p.set_defaults(func=cmd_maml)


def _families(args: argparse.Namespace, d: dict[str, Any], device: Any = None) -> tuple[Any, Any, Any]:
    """(training family, validation family, held-out evaluation family), their tasks on ``device``."""
    if args.task == "sine":
        from optimizees.sine import SineFamily

        fam = SineFamily(shots=args.shots, query_shots=args.query_shots, meta_batch_size=args.meta_batch)
        if device is not None:
            fam = on_device(fam, device)
        return fam, fam, fam
    from optimizees.omniglot import OmniglotFamily, load_omniglot

    data = load_omniglot(args.data)
    kw = dict(ways=args.ways, shots=args.shots, query_shots=args.query_shots, channels=args.channels, data=data,
              device=device)
    train = OmniglotFamily(meta_batch_size=args.meta_batch, split="train", **kw)
    return train, OmniglotFamily(meta_batch_size=args.meta_batch, split="val", **kw), \
        OmniglotFamily(meta_batch_size=min(50, args.eval_tasks), split="test", **kw)


def _rule(args: argparse.Namespace, model: Any) -> Any:
    from ..rules import SGD, LSTMRule, MetaSGD

    if args.inner_rule == "sgd":
        return SGD(lr=args.inner_lr)
    if args.inner_rule == "metasgd":
        return MetaSGD(model, lr=args.inner_lr)
    return LSTMRule(hidden_size=args.hidden_size, preprocess="none", output_scale=args.inner_lr)


def evaluate_adaptation(rule: Any, init: Any, family: Any, *, num_tasks: int, steps: int, seed: int) -> dict[str, Any]:
    """Held-out query loss (and accuracy, when the task has one) after 0..steps adaptation steps."""
    import torch

    from ..maml import adaptation_params
    from ..meta.validation import start_params
    from ..tasks import META

    gen = torch.Generator().manual_seed(seed)
    losses, accs, done = [], [], 0
    with torch.no_grad():
        while done < num_tasks:
            if hasattr(family, "evaluation_tasks") and done == 0:
                tasks = [family.evaluation_tasks(num_tasks=num_tasks)]
            else:
                tasks = [family.sample(gen)]
            for task in tasks:
                row_l, row_a = [], []
                for theta in adaptation_params(rule, task, start_params(init, task, gen), steps=steps, generator=gen):
                    query = task.sample_batch(META, gen)
                    row_l.append(task.loss(theta, query).reshape(-1))
                    if hasattr(task, "accuracy"):
                        row_a.append(task.accuracy(theta, query).reshape(-1))
                losses.append(torch.stack(row_l))
                if row_a:
                    accs.append(torch.stack(row_a))
                done += losses[-1].shape[1]
    loss = torch.cat(losses, dim=1)[:, :num_tasks]
    out = {"steps": list(range(steps + 1)), "num_tasks": int(loss.shape[1]),
           "loss_mean": [float(v) for v in loss.mean(1)], "loss_std": [float(v) for v in loss.std(1)]}
    if accs:
        acc = torch.cat(accs, dim=1)[:, :num_tasks]
        out["accuracy_mean"] = [float(v) for v in acc.mean(1)]
        out["accuracy_std"] = [float(v) for v in acc.std(1)]
    return out


def zero_last_linear(model: Any) -> None:
    """Zero the weight and bias of the last ``nn.Linear`` in ``model`` (its output head)."""
    import torch
    from torch import nn

    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UsageError(f"--zero-last-layer: {type(model).__name__} has no nn.Linear layer")
    with torch.no_grad():
        linears[-1].weight.zero_()
        if linears[-1].bias is not None:
            linears[-1].bias.zero_()


def _plot(report: dict[str, Any], path: Path) -> None:
    """Held-out query loss (log scale) and, where the task has one, accuracy vs adaptation steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = report["eval"]
    panels = 2 if "accuracy_mean" in ev else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.6 * panels, 4.0), squeeze=False)
    ax = axes[0, 0]
    ax.plot(ev["steps"], ev["loss_mean"], marker="o", label=f"{report['algorithm']} (θ0 learned)")
    ax.set_yscale("log")
    ax.set_xlabel("adaptation steps on the support set")
    ax.set_ylabel(f"query loss, mean over {ev['num_tasks']} held-out tasks")
    ax.set_title(f"{report['task']}: {report['algorithm']}, {report['iterations']} meta-iterations")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    if panels == 2:
        ax = axes[0, 1]
        ax.errorbar(ev["steps"], [100 * a for a in ev["accuracy_mean"]], yerr=[100 * a for a in ev["accuracy_std"]],
                    marker="o", capsize=3)
        ax.set_xlabel("adaptation steps on the support set")
        ax.set_ylabel(f"query accuracy (%), {ev['num_tasks']} held-out tasks (± std)")
        ax.set_title("accuracy")
        ax.grid(True, alpha=0.3)
    save_figure(fig, path)


def cmd_maml(args: argparse.Namespace) -> int:
    from ..checkpoints import save_rule
    from ..maml import MAMLInit
    from ..meta import MetaTrainConfig, MetaTrainingError, meta_train
    from ..tasks import META

    with checking_arguments():  # bad values here are usage errors (exit 2); failures of the run exit 1
        if args.task not in MAML_DEFAULTS:
            raise UsageError(f"unknown task {args.task!r} for maml; known tasks: {', '.join(sorted(MAML_DEFAULTS))}")
        d = MAML_DEFAULTS[args.task]
        for name in ("inner_lr", "meta_batch", "shots", "query_shots", "iterations", "eval_tasks", "eval_steps",
                     "num_val_tasks"):
            if getattr(args, name) is None:
                setattr(args, name, d[name])
        config = MetaTrainConfig(epochs=args.iterations, horizon=args.inner_steps, truncation=args.inner_steps,
                                 meta_lr=args.meta_lr, meta_lr_final=args.meta_lr_final,
                                 max_grad_norm=args.max_grad_norm or None,
                                 validate_every=args.validate_every, num_val_tasks=args.num_val_tasks, seed=args.seed,
                                 second_order=not args.first_order, step_weights="final", meta_split=META,
                                 compile=args.compile)
        config.validate()
        device, state_path, checkpoint_every, rank, world, cpu = prepare_run(args)
        config.tasks_per_step = tasks_per_step(args, world)
        import torch

        torch.manual_seed(args.seed)
        family, val_family, eval_family = _families(args, d, device)
        model = family.model()
        if hasattr(model, "reset_parameters"):
            model.reset_parameters(torch.Generator().manual_seed(args.seed))
        if args.zero_last_layer:
            zero_last_linear(model)
        init = MAMLInit(model)
        rule = _rule(args, model).to(device)
    algorithm = {"sgd": "MAML", "metasgd": "Meta-SGD", "lstm": "MAML + learned LSTM optimizer"}[args.inner_rule]
    if args.first_order and args.inner_rule == "sgd":
        algorithm = "first-order MAML"
    if not args.out.parent.exists():
        args.out.parent.mkdir(parents=True)
    start = time.perf_counter()
    try:
        result = meta_train(rule, family, config, progress=not args.no_progress, checkpoint_path=state_path,
                            checkpoint_every=checkpoint_every, resume=args.resume, init=init,
                            val_family=val_family, distributed=args.distributed)
    except MetaTrainingError as exc:
        if state_path is not None and state_path.is_file() and "is intact" not in str(exc):
            raise MetaTrainingError(f"{exc}; the last good training state is intact in {state_path}") from None
        raise
    if rank != 0:  # rank 0 alone evaluates, writes the checkpoint and reports
        return 0
    evaluation = evaluate_adaptation(rule, init, eval_family, num_tasks=args.eval_tasks, steps=args.eval_steps,
                                     seed=args.seed + 20_000)
    provenance = {
        "mode": "maml", "algorithm": algorithm, "task": args.task, "task_config": family.config(),
        "train_config": config.to_dict(), "seed": args.seed, "meta_steps": result.meta_steps,
        "skipped_steps": result.skipped_steps, "best_epoch": result.best_epoch,
        "best_val_loss": result.best_val_loss, "seconds": round(result.seconds, 1),
        "command": "l2o " + " ".join(sys.argv[1:]), "cpu": cpu,
        "eval": {k: evaluation[k] for k in evaluation if k != "steps"},
    }
    if args.distributed:
        provenance["world_size"] = world
    save_rule(args.out, rule, provenance, init=init.params())
    report = {"task": args.task, "algorithm": algorithm, "iterations": args.iterations, "inner_steps": args.inner_steps,
              "first_order": args.first_order, "seconds": round(result.seconds, 1),
              "wall_s": round(time.perf_counter() - start, 1), "best_val_loss": result.best_val_loss,
              "best_iteration": result.best_epoch, "skipped": result.skipped_steps, "eval": evaluation,
              "history": compact_history(result.history), "config": config.to_dict(), "task_config": family.config()}
    if device.type != "cpu":
        report["device"] = str(device)
    has_acc = "accuracy_mean" in evaluation
    rows = [("adaptation steps", "query loss mean", "std") + (("accuracy",) if has_acc else ())]
    for t in evaluation["steps"]:
        row = (str(t), f"{evaluation['loss_mean'][t]:.4g}", f"{evaluation['loss_std'][t]:.3g}")
        rows.append(row + ((f"{100 * evaluation['accuracy_mean'][t]:.1f}%",) if has_acc else ()))
    say(format_table(rows))
    k = args.inner_steps
    line = (f"{algorithm}: {result.meta_steps} meta-iterations in {result.seconds:.0f}s (skipped {result.skipped_steps}); "
            f"held-out query loss after {k} step(s): {evaluation['loss_mean'][min(k, args.eval_steps)]:.4g} "
            f"± {evaluation['loss_std'][min(k, args.eval_steps)]:.3g} ({evaluation['num_tasks']} tasks)")
    if "accuracy_mean" in evaluation:
        line += f", accuracy after {args.eval_steps} steps {100 * evaluation['accuracy_mean'][-1]:.1f}%"
    say(line + f"; wrote {args.out}")
    write_outputs(args, report, lambda path: _plot(report, path))
    return 0
