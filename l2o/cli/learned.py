"""``l2o meta-train`` and ``l2o compare``: the learned-optimizer mode."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .common import (COMPARE_DEFAULTS, META_TRAIN_DEFAULTS, RULE_DEFAULTS, RUN_DEFAULTS, UsageError, add_device_arg,
                     add_distributed_args, components,
                     add_task_args, checking_arguments, compact_history, family_from_args, float_pair, format_table,
                     mnist_family, nonnegative_float, on_device, plot_path, positive_float, positive_int, prepare_run, probability,
                     resolve_device, RuleProgress, save_figure, say, tasks_per_step, write_outputs)

__all__ = ["add_meta_train_parser", "add_compare_parser", "cmd_meta_train", "cmd_compare", "plot_report"]


def add_meta_train_parser(sub: Any) -> None:
    mt = sub.add_parser("meta-train", help="meta-train a learned rule (LSTM or per-parameter MLP) on a task family",
                        description="Meta-train a learned rule, the coordinate-wise LSTM (Andrychowicz et al. 2016) or "
                                    "the memory-light per-parameter MLP, and save the best validated weights as a "
                                    "checkpoint.",
                        epilog="examples:\n"
                               "  l2o meta-train --task quadratic --out runs/quadratic.pt\n"
                               "  l2o meta-train --task quadratic --out runs/q.pt --epochs 200 --json runs/q.json --plot runs/q.png\n"
                               "  l2o meta-train --task quadratic --out runs/q.pt --checkpoint-every 50    # resumable\n"
                               "  l2o meta-train --task mnist --data ../shared/data --out runs/mnist.pt\n"
                               "  l2o meta-train --task generalist --data ../shared/data --out runs/generalist.pt",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_task_args(mt)
    mt.add_argument("--out", required=True, type=Path, help="checkpoint path to write")
    mt.add_argument("--components", type=components, default=None, metavar="NAME=W,...",
                    help="generalist: the mixture's components and their weights (default mnist-mlp=3,mnist-conv=2,"
                         "omniglot-conv=2,markov-gru=2,quadratic=1; mnist-mlp-deep, markov-transformer, "
                         "zipf-transformer and omniglot-normconv are available too)")
    mt.add_argument("--rule", default=None, choices=["lstm", "mlp"],
                    help="the learned rule: lstm (the coordinate-wise LSTM; quadratic and mnist default) or mlp "
                         "(l2o.MLPRule, 4 floats of state per parameter; generalist default)")
    mt.add_argument("--init-from", default=None, metavar="NAME|PATH",
                    help="start from a trained rule instead of a fresh one: a shipped rule's name (l2o.list_pretrained()) "
                         "or a checkpoint; the rule keeps its kind and size (fine-tuning, e.g. the generalist on your "
                         "own mixture)")
    mt.add_argument("--epochs", type=positive_int, default=None,
                    help="rounds of tasks to train on (default 1000; generalist 400)")
    mt.add_argument("--horizon", type=positive_int, default=None,
                    help="inner steps per task, the longest with --horizon-schedule log_uniform (default 100; "
                         "generalist 400)")
    mt.add_argument("--truncation", type=positive_int, default=None,
                    help="inner steps per meta-step (default 20; generalist 25)")
    mt.add_argument("--horizon-schedule", default=None, choices=["constant", "log_uniform"],
                    help="every task runs --horizon steps (constant, default) or each round draws its horizon "
                         "log-uniformly from [--min-horizon, --horizon] (generalist default)")
    mt.add_argument("--min-horizon", type=positive_int, default=None,
                    help="the shortest horizon of --horizon-schedule log_uniform (default: --truncation; generalist 50)")
    mt.add_argument("--estimator", default=None, choices=["tbptt", "es", "pes"],
                    help="the meta-gradient: truncated backpropagation (default), antithetic ES, or persistent ES "
                         "(unbiased over the truncations of a horizon); ES/PES run one antithetic pair per task")
    mt.add_argument("--es-std", type=positive_float, default=None,
                    help="the standard deviation of the ES/PES perturbations of the meta-params (default 0.01)")
    mt.add_argument("--num-val-tasks", type=positive_int, default=None,
                    help="held-out validation tasks (default 2; generalist 8)")
    mt.add_argument("--val-horizon", type=positive_int, default=None,
                    help="inner steps of a validation run (default: --horizon; generalist 1000)")
    mt.add_argument("--meta-split", default=None, choices=["train", "meta"],
                    help="what the meta-loss reads: the training batches (train, the paper's; default) or the "
                         "task's held-out data (meta; generalist default), rewarding what generalises")
    mt.add_argument("--tell-total-steps", type=probability, default=None, metavar="P",
                    help="the probability that a round's runs tell the rule their length (total_steps), so a rule "
                         "with training-progress inputs (mlp) learns to use it and to do without (default 0; "
                         "generalist 0.5)")
    mt.add_argument("--meta-lr", type=positive_float, default=None, help="initial Adam meta learning rate (default 1e-2)")
    mt.add_argument("--meta-lr-final", type=positive_float, default=None, help="final meta lr of the cosine decay, at most --meta-lr (default 1e-4)")
    mt.add_argument("--validate-every", type=positive_int, default=None, help="epochs between validations (default 50)")
    mt.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    mt.add_argument("--hidden-size", type=positive_int, default=None,
                    help="units per layer of the rule's network (default: LSTM 20, MLP 8)")
    mt.add_argument("--layers", type=positive_int, default=None, help="layers of the rule's network (default: LSTM 2, MLP 1)")
    mt.add_argument("--max-step-ratio", type=positive_float, default=None, metavar="K",
                    help="mlp: hold each tensor's step to at most K times the root mean square of Adam's step at the "
                         "rule's base step size (MLPRule(max_step_ratio=K)); with --init-from it replaces the loaded "
                         "rule's bound (default: none, or the loaded rule's)")
    mt.add_argument("--preprocess", default=None, choices=["none", "log_sign", "rnnprop"],
                    help="LSTM inputs: none (quadratic default), log_sign (mnist default) or rnnprop "
                         "(Adam-normalised gradient and momentum)")
    mt.add_argument("--output-scale", type=positive_float, default=None,
                    help="output scale (default 0.01 on quadratic, measured 0.29x tuned Adam against the paper's 1's "
                         "0.36x; 0.1 on mnist, the paper's)")
    mt.add_argument("--random-scaling", type=nonnegative_float, default=0.0,
                    help="mnist: rescale each coordinate of the optimizee by exp(U[-k, k]) during meta-training "
                         "(RNNprop-style; default 0: off)")
    mt.add_argument("--zero-init-output", action="store_true", help="start from a zero output layer")
    mt.add_argument("--adam-lr", type=positive_float, default=None,
                    help="with --preprocess rnnprop: add a learnable Adam step (initial step size ADAM_LR) to the "
                         "LSTM's output; with --zero-init-output the rule starts as Adam")
    mt.add_argument("--momentum-lr", type=positive_float, default=None,
                    help="with --preprocess rnnprop: add a learnable momentum-SGD step (initial step size "
                         "MOMENTUM_LR times the bias-corrected running mean of the gradient) to the LSTM's output; "
                         "with --zero-init-output the rule starts as momentum SGD")
    mt.add_argument("--nesterov-lr", type=positive_float, default=None,
                    help="add a learnable Nesterov-momentum step (torch.optim.SGD(nesterov=True) with initial learning "
                         "rate NESTEROV_LR and its own momentum buffer) to the LSTM's output, with any inputs; with "
                         "--zero-init-output the rule starts as exactly that NAG")
    mt.add_argument("--nesterov-momentum", type=float, default=0.9,
                    help="the momentum of --nesterov-lr, in [0, 1) (default 0.9)")
    mt.add_argument("--rnnprop-betas", type=float_pair, default=None, metavar="B1,B2",
                    help="with --preprocess rnnprop: the moment decay rates of its inputs and of the Adam/momentum "
                         "residuals (default 0.95,0.95, RNNprop's; 0.9,0.999 with --adam-lr and --zero-init-output "
                         "starts the rule as exactly torch.optim.Adam)")
    mt.add_argument("--step-weights", default=None, choices=["uniform", "linear", "final"],
                    help="meta-loss weight of inner step t: uniform (the paper, default), linear (t / horizon) or final (last step only)")
    order = mt.add_mutually_exclusive_group()
    order.add_argument("--second-order", dest="second_order", action="store_const", const=True, default=None,
                       help="differentiate through the task gradients (quadratic default: measured 0.36x tuned Adam "
                            "at step 100 against 0.50x first order, in the same time, both at output scale 1)")
    order.add_argument("--first-order", dest="second_order", action="store_const", const=False,
                       help="treat the task gradients fed to the rule as constants (the paper; mnist default)")
    mt.add_argument("--objective", default=None, choices=["loss", "log_loss"],
                    help="meta-loss terms: loss (the paper, default) or log_loss")
    mt.add_argument("--compile", nargs="?", const=True, default=False, metavar="BACKEND",
                    help="run each unroll through torch.compile (default backend inductor; or name one, e.g. "
                         "aot_eager): the same numbers up to float rounding; the first meta-steps compile "
                         "(seconds); if compiling fails, a warning and the eager engine")
    mt.add_argument("--no-progress", action="store_true", help="no progress bar")
    mt.add_argument("--checkpoint-every", type=positive_int, default=None, metavar="N",
                    help="write a training state every N meta-steps (atomically, to --state) so that the run "
                         "can be continued with --resume")
    mt.add_argument("--state", type=Path, default=None, metavar="PATH",
                    help="training-state file for --checkpoint-every (default: <out>.state.pt; with --resume: "
                         "the file resumed from)")
    mt.add_argument("--resume", type=Path, default=None, metavar="PATH",
                    help="continue the run saved in this training-state file, bitwise identically; give the "
                         "same arguments as the run that wrote it (keeps checkpointing at its interval unless "
                         "--checkpoint-every is given)")
    mt.add_argument("--json", type=Path, default=None,
                    help="write a summary (provenance, best validation, meta-loss history) here")
    mt.add_argument("--plot", type=plot_path, default=None,
                    help="write the meta-loss-per-epoch and validation-loss plot here (PNG/PDF/SVG)")
    add_device_arg(mt, "quadratic only (MNIST tasks stay on the CPU); --resume only on the CPU")
    add_distributed_args(mt)
    mt.set_defaults(func=cmd_meta_train)


def add_compare_parser(sub: Any) -> None:
    cp = sub.add_parser("compare", help="compare a rule with lr-tuned SGD, NAG, RMSprop and Adam",
                        description="Tune the baselines' learning rates on tuning tasks, then evaluate the rule and "
                                    "the baselines on held-out tasks; print a table, optionally write JSON and a plot.",
                        epilog="examples:\n"
                               "  l2o compare --task quadratic --rule runs/quadratic.pt --json r.json --plot r.png\n"
                               "  l2o compare --task quadratic --rule runs/quadratic.pt --horizon 200\n"
                               "  l2o compare --task quadratic --pretrained quadratic\n"
                               "  l2o compare --task quadratic            # the tuned baselines alone",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_task_args(cp)
    source = cp.add_mutually_exclusive_group()
    source.add_argument("--rule", type=Path, default=None, help="checkpoint of the learned rule (omit: baselines only)")
    source.add_argument("--pretrained", default=None, metavar="NAME",
                        help="a shipped pretrained rule by name instead (see l2o list-pretrained)")
    cp.add_argument("--horizon", type=positive_int, default=100, help="inner steps to evaluate (default 100)")
    cp.add_argument("--num-tasks", type=positive_int, default=None,
                    help="held-out instances (default 1000 quadratics, 100 mnist networks)")
    cp.add_argument("--num-tuning-tasks", type=positive_int, default=None,
                    help="tuning instances (default 1000 quadratics, 20 mnist networks)")
    cp.add_argument("--seed", type=int, default=10_000, help="tuning seed; held-out tasks use seed + 10000")
    cp.add_argument("--json", type=Path, default=None, help="write the results here")
    cp.add_argument("--plot", type=plot_path, default=None, help="write a loss-vs-step plot here (PNG/PDF/SVG)")
    cp.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_device_arg(cp, "quadratic only (MNIST tasks stay on the CPU)")
    cp.set_defaults(func=cmd_compare)


def cmd_meta_train(args: argparse.Namespace) -> int:
    from ..checkpoints import save_rule
    from ..meta import MetaTrainConfig, MetaTrainingError, meta_train
    from ..rules import MLPRule
    with checking_arguments():  # bad values here are usage errors (exit 2); failures of the run exit 1
        if args.task not in RUN_DEFAULTS:
            family_from_args(args)  # names the known tasks
        defaults = RUN_DEFAULTS[args.task]
        if args.components is not None and args.task != "generalist":
            raise UsageError(f"--components chooses the generalist mixture's components; --task {args.task} has none")
        import torch

        torch.manual_seed(args.seed)
        rule, init_from = ((_rule_from_args(args, args.rule or defaults["rule"]), None) if args.init_from is None
                           else _initial_rule(args))
        if args.max_step_ratio is not None:
            if not isinstance(rule, MLPRule):
                raise UsageError(f"--max-step-ratio bounds the steps of the mlp rule; the rule here is "
                                 f"{type(rule).__name__} (drop the flag, or use --rule mlp)")
            rule.max_step_ratio = args.max_step_ratio
        family = family_from_args(args)
        config = MetaTrainConfig(seed=args.seed)
        for field in ("epochs", "horizon", "truncation", "horizon_schedule", "min_horizon", "estimator", "es_std",
                      "meta_lr", "meta_lr_final", "validate_every", "num_val_tasks", "val_horizon", "meta_split",
                      "objective", "tell_total_steps"):
            value = getattr(args, field)
            value = defaults.get(field) if value is None else value
            if value is not None:
                setattr(config, field, value)
        config.second_order = (META_TRAIN_DEFAULTS[args.task]["second_order"] if args.second_order is None
                               else args.second_order)
        if args.step_weights is not None:
            config.step_weights = args.step_weights
        config.compile = args.compile
        config.validate()
        device, state_path, checkpoint_every, rank, world, cpu = prepare_run(args)
        config.tasks_per_step = tasks_per_step(args, world, default=defaults.get("tasks_per_step"))
        family = on_device(family, device)
        rule = rule.to(device)
    if not args.out.parent.exists():
        args.out.parent.mkdir(parents=True)
    try:
        result = meta_train(rule, family, config, progress=not args.no_progress, checkpoint_path=state_path,
                            checkpoint_every=checkpoint_every, resume=args.resume, distributed=args.distributed)
    except MetaTrainingError as exc:
        if state_path is not None and state_path.is_file() and "is intact" not in str(exc):
            raise MetaTrainingError(f"{exc}; the last good training state is intact in {state_path}") from None
        raise
    if rank != 0:  # rank 0 alone writes the checkpoint and reports
        return 0
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
    if init_from is not None:
        provenance["init_from"] = init_from
    if device.type != "cpu":
        provenance["device"] = str(device)
    if args.distributed:
        provenance["world_size"] = world
    save_rule(args.out, result.rule, provenance)
    resumed = "" if result.resumed_at is None else f" (resumed at meta-step {result.resumed_at})"
    skipped = (f"skipped {result.skipped_steps} of them (non-finite meta-loss or meta-gradient; tasks resampled)"
               if result.skipped_steps else "skipped 0")
    best = ("no validation" if result.best_val_loss is None
            else f"best validation loss {result.best_val_loss:.4g} at epoch {result.best_epoch}")
    state = "" if state_path is None else f"; training state in {state_path}"
    losses = result.history.get("epoch_loss", [])
    say(format_table([
        ("meta-train", args.task),
        ("epochs", str(config.epochs)),
        ("meta-steps", f"{result.meta_steps} ({result.skipped_steps} skipped)"),
        ("last epoch meta-loss", "-" if not losses else f"{losses[-1]:.4g}"),
        ("best validation loss", "-" if result.best_val_loss is None
         else f"{result.best_val_loss:.4g} (epoch {result.best_epoch})"),
        ("time", f"{result.seconds:.1f} s on {device}"),
    ]))
    say(f"meta-trained {result.meta_steps} meta-steps in {result.seconds:.0f}s{resumed}, {skipped}; {best}; "
          f"wrote {args.out}{state}")
    write_outputs(args, {**provenance, "device": str(device), "out": str(args.out),
                         "history": compact_history(result.history)},
                  lambda path: plot_history(result.history, path,
                                            title=f"meta-train {args.task}: {result.meta_steps} meta-steps"))
    return 0


#: ``l2o meta-train`` flags that configure the LSTM rule only (refused with ``--rule mlp``).
_LSTM_ONLY = ("preprocess", "output_scale", "adam_lr", "momentum_lr", "nesterov_lr", "rnnprop_betas")


def _initial_rule(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """``--init-from``: the rule to fine-tune (a shipped name or a checkpoint path) and where it came from."""
    from ..checkpoints import CheckpointError, load_checkpoint, rule_from_checkpoint
    from ..pretrained import list_pretrained, load_pretrained, sha256_file

    shaping = [f"--{name.replace('_', '-')}" for name in ("rule", "hidden_size", "layers", *_LSTM_ONLY)
               if getattr(args, name) is not None]
    shaping += ["--zero-init-output"] if args.zero_init_output else []
    if shaping:
        verb = "shapes" if len(shaping) == 1 else "shape"
        raise UsageError(f"{', '.join(shaping)} {verb} a new rule; --init-from {args.init_from} keeps the kind and "
                         "size of the rule it loads, so drop them (or drop --init-from to train a new rule)")
    source = args.init_from
    shipped = {entry["name"]: entry for entry in list_pretrained()}
    try:
        if source in shipped:
            return load_pretrained(source), {"pretrained": source, "sha256": shipped[source]["sha256"]}
        path = Path(source)
        if not path.is_file():
            raise UsageError(f"--init-from {source!r} is neither a shipped rule ({', '.join(shipped)}) nor a checkpoint "
                             "file; give a name from l2o.list_pretrained() or the path of an l2o meta-train --out file")
        data = load_checkpoint(path)
        return (rule_from_checkpoint(data, source=str(path)),
                {"checkpoint": str(path), "sha256": sha256_file(path), "provenance": data.get("provenance")})
    except CheckpointError as exc:
        raise UsageError(f"--init-from {source!r}: {exc}") from None


def _rule_from_args(args: argparse.Namespace, kind: str) -> Any:
    """The rule ``l2o meta-train`` trains: an :class:`~l2o.LSTMRule` or an :class:`~l2o.MLPRule`."""
    from ..rules import LSTMRule, MLPRule
    from ..rules.preprocess import RNNPROP_BETAS

    if kind == "mlp":
        given = [f"--{name.replace('_', '-')}" for name in _LSTM_ONLY if getattr(args, name) is not None]
        given += ["--zero-init-output"] if args.zero_init_output else []
        if given:
            raise UsageError(f"{', '.join(given)} configure the LSTM rule; drop them with --rule mlp (or use --rule lstm)")
        return MLPRule(hidden_size=args.hidden_size or 8, hidden_layers=args.layers or 1)
    defaults = RULE_DEFAULTS.get(args.task) or RULE_DEFAULTS["mnist"]
    return LSTMRule(hidden_size=args.hidden_size or 20, num_layers=args.layers or 2,
                    preprocess=args.preprocess or defaults["preprocess"],
                    output_scale=args.output_scale or defaults["output_scale"],
                    zero_init_output=args.zero_init_output, adam_lr=args.adam_lr, momentum_lr=args.momentum_lr,
                    nesterov_lr=args.nesterov_lr, nesterov_momentum=args.nesterov_momentum,
                    rnnprop_betas=args.rnnprop_betas or RNNPROP_BETAS)


def plot_history(history: dict[str, list[float]], path: Path, *, title: str) -> None:
    """Meta-training curves (log scale): the mean training loss of every epoch's task and the validation loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    losses = history.get("epoch_loss", [])
    if losses:
        ax.plot(range(1, len(losses) + 1), losses, lw=0.8, alpha=0.4, label="meta-training task (mean loss)")
        window = max(1, len(losses) // 40)
        if window > 1:  # a running mean over `window` epochs: the per-task losses are noisy
            smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
                      for i in range(len(losses))]
            ax.plot(range(1, len(losses) + 1), smooth, lw=1.6, label=f"running mean over {window} epochs")
    if history.get("val_loss"):
        ax.plot(history["val_epoch"], history["val_loss"], marker="o", lw=1.8, label="validation")
    ax.set_yscale("log")
    ax.set_xlabel("epoch (task)")
    ax.set_ylabel("mean loss along the unroll")
    ax.set_title(title)
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    save_figure(fig, path)


def _table(report: dict[str, Any]) -> str:
    rows = [("rule", "lr", f"loss@{report['horizon']} mean", "std", "vs adam", "90% interval")]
    for name, r in report["results"].items():
        ratio = "1.000" if name == "adam" else "-" if r.get("vs_adam") is None else f"{r['vs_adam']:.3f}"
        interval = "-" if r.get("vs_adam_ci90") is None else "{:.3f}-{:.3f}".format(*r["vs_adam_ci90"])
        lr = "-" if r["lr"] is None else f"{r['lr']:.3g}"
        rows.append((name, lr, f"{r['final_loss_mean']:.4g}", f"{r['final_loss_std']:.3g}", ratio, interval))
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
    save_figure(fig, path)


def cmd_compare(args: argparse.Namespace) -> int:
    from ..checkpoints import load_rule
    from ..pretrained import load_pretrained
    from ..meta import compare
    from ..meta.evaluate import BASELINES, lr_grid
    from ..perf import configure_cpu

    with checking_arguments():  # bad values here are usage errors (exit 2); failures of the run exit 1
        if args.task == "generalist":
            raise UsageError("the generalist mixture is a meta-training distribution; its rule is evaluated on held-out "
                             "models by benchmarks/generalist.py (l2o compare takes --task quadratic or mnist)")
        device = resolve_device(args)
        if args.pretrained is not None:
            rule = load_pretrained(args.pretrained)
        else:
            rule = load_rule(args.rule) if args.rule is not None else None
        defaults = COMPARE_DEFAULTS.get(args.task, COMPARE_DEFAULTS["quadratic"])
        if args.task == "mnist":  # tune on the validation images, report on the test images
            if args.num_networks == 1:
                args.num_networks = defaults["num_networks"]
            family = mnist_family(args, eval_split="test")
            tuning_family = family.with_eval_split("val")
        else:
            family = family_from_args(args)
            tuning_family = None
        configure_cpu(args.threads)
        family = on_device(family, device)
        if tuning_family is not None:
            tuning_family = on_device(tuning_family, device)
        if rule is not None:
            rule = rule.to(device)
    progress = RuleProgress((["learned"] if rule is not None else []) + list(BASELINES), num_lrs=len(lr_grid()),
                            disable=args.no_progress)
    try:
        report = compare(rule, family, horizon=args.horizon, num_tasks=args.num_tasks or defaults["num_tasks"],
                         num_tuning_tasks=args.num_tuning_tasks or defaults["num_tuning_tasks"],
                         tuning_seed=args.seed, eval_seed=args.seed + 10_000, tuning_family=tuning_family,
                         progress=progress)
    finally:
        progress.close()
    if device.type != "cpu":
        report["device"] = str(device)
    if args.rule is not None:
        report["rule"] = str(args.rule)
    elif args.pretrained is not None:
        report["rule"] = f"pretrained {args.pretrained!r}"
    say(_table(report))
    write_outputs(args, report, lambda path: plot_report(report, path))
    return 0
