r"""The held-out suite: how optimizers train a user's own model, through ``torch.optim`` and the drop-in
``l2o.LearnedOptimizer``, on tasks no learned rule was meta-trained on (``generalist_tasks.py``).

For every task, in one process, back to back:

1. tuning (on a tuning seed, separate from the reported seeds): ``torch.optim.AdamW`` (weight decay
   0.01, torch's default) and ``torch.optim.SGD`` with momentum 0.9, each over a log grid of learning
   rates in half-decades; the lr with the lowest final loss on the task's ``val`` split (held-out
   training data, never the test split) is kept;
2. for each reported seed: ``torch.optim.Adam(lr=1e-3)`` (what users type), the tuned AdamW and
   SGD-momentum, every shipped rule (``l2o.list_pretrained()``) as
   ``l2o.LearnedOptimizer(params, pretrained=NAME)`` at its default lr, and every ``--rule`` (a
   shipped name or a checkpoint path); a rule with training-progress inputs (``l2o.MLPRule``) runs
   twice, as is and told the run's length (``NAME+total_steps``: ``total_steps=<steps>``). A seed
   fixes the model's initialisation, the dropout masks and the minibatch order, identically for
   every optimizer.

Reported per task and optimizer (mean ± std over seeds): the final loss on the test split (held out:
no optimizer ever trained on it), the final training loss (on a fixed subset of the training data,
in evaluation mode), the ratios of the held-out loss to Adam@1e-3's and to tuned AdamW's, the
wall time of ``opt.step()`` and of the whole training loop relative to Adam's on the same seed, the
optimizer's state in bytes per parameter (every tensor in ``opt.state``), and a divergence flag (a
non-finite loss or parameter, or a training-loss window mean, or the final held-out loss, above
``--divergence-factor`` x the initial held-out loss; a run stops at its first non-finite loss).
Output: one JSON file, a markdown table (printed, and ``--markdown PATH``), one PNG of loss curves
per task in ``--out-dir``.

    python benchmarks/generalist.py                                     # the full suite, ~95 min (benchmarks/README.md)
    python benchmarks/generalist.py --rule runs/generalist.pt --rule runs/mine.pt  # plus further rules
    python benchmarks/generalist.py --tasks char-gpt --seeds 0 --steps 300  # one task, shortened
    python benchmarks/generalist.py --fast                              # a smoke test in seconds

Exit codes: 0 success (tasks whose data is missing are skipped with a message), 2 bad usage.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import l2o  # noqa: E402
from generalist_tasks import (EXTRA_TASKS, TASKS, MissingData, Splits, Task, default_data_dir,  # noqa: E402
                              iter_tasks, task_names_error)

ADAM = "adam-1e-3"
ADAMW = "adamw-tuned"
SGDM = "sgdm-tuned"
#: Half-decade grids: AdamW 10^-3.5 .. 10^-1.5, SGD-momentum 10^-2.5 .. 10^-0.5.
ADAMW_GRID = tuple(10 ** (e / 2) for e in range(-7, -2))
SGDM_GRID = tuple(10 ** (e / 2) for e in range(-5, 0))
FAST_ADAMW_GRID = (1e-3, 10 ** -2.5)
FAST_SGDM_GRID = (1e-2, 10 ** -1.5)
FAST_STEPS = 4
EVAL_POINTS = 10  # held-out evaluations along a run (plus one before the first step)
FAST_EVAL_POINTS = 1
CURVE_POINTS = 100  # windows the training-loss curve is averaged over


class UsageError(ValueError):
    """Bad input to this script (exit code 2)."""


OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


@dataclass
class Contender:
    """One optimizer of the comparison."""

    name: str
    kind: str  # "torch" or "learned"
    make: OptimizerFactory
    lr: float | None  # None: the learned rule's default
    source: str  # how it is built, in words
    with_steps: Callable[[int], OptimizerFactory] | None = None  # told the run's length (replaces make)


# -- one run --------------------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(task: Task, model: nn.Module, chunks: list[tuple[Tensor, Tensor]]) -> float:
    """The mean loss over ``chunks`` (weighted by examples), in evaluation mode."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in chunks:
        total += float(task.loss(model, x, y)) * len(x)
        count += len(x)
    model.train(was_training)
    return total / count


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``opt.state`` (torch's ``step`` tensors included)."""
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if isinstance(v, Tensor))


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def train(task: Task, splits: Splits, make_opt: OptimizerFactory, seed: int, steps: int, *, factor: float,
          final_split: str = "test", eval_points: int = EVAL_POINTS) -> dict[str, Any]:
    """Train a fresh model of ``task`` (initialised under ``torch.manual_seed(seed)``) for ``steps``
    steps of ``make_opt`` through the user-facing loop, and measure it.

    ``final_split`` ``"test"`` (reported runs) or ``"val"`` (tuning runs) is what the final held-out
    loss is computed on; tuning runs skip the training-loss and curve evaluations they do not need.
    """
    torch.manual_seed(seed)
    model = task.make_model()
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(seed + 1)
    opt = make_opt(model.parameters())
    torch.manual_seed(seed + 2)  # dropout masks: the same for every optimizer, whatever its constructor drew
    reported = final_split == "test"
    eval_at = {round(steps * (i + 1) / eval_points) for i in range(eval_points)} if reported else set()
    # the divergence reference: the initial loss on held-out data (tuning runs never touch the test split)
    initial = evaluate(task, model, splits.test_curve if reported else splits.val[:1])
    heldout_curve: list[list[float]] = [[0, initial]]
    losses: list[float] = []
    step_s = loop_s = cpu_s = 0.0
    reason = None
    for t in range(1, steps + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        x, y = splits.batch(gen)
        opt.zero_grad(set_to_none=True)
        loss = task.loss(model, x, y)
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        value = float(loss.detach())
        loop_s += time.perf_counter() - t0
        cpu_s += time.process_time() - c0
        step_s += t2 - t1
        losses.append(value)
        if not math.isfinite(value):
            reason = f"non-finite training loss at step {t}"
            break
        if t in eval_at:
            heldout_curve.append([t, evaluate(task, model, splits.test_curve)])
    done = len(losses)
    params_finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    if reason is None and not params_finite:
        reason = f"non-finite parameters after step {done}"
    final = evaluate(task, model, splits.test if reported else splits.val) if reason is None else math.nan
    train_loss = evaluate(task, model, splits.train_eval) if reason is None and reported else None
    window = max(1, math.ceil(done / CURVE_POINTS))
    curve = [[min(i + window, done), statistics.fmean(losses[i:i + window])] for i in range(0, done, window)]
    if reason is None:
        worst = max((v for _, v in curve), default=initial)
        if not math.isfinite(final) or final > factor * initial:
            reason = f"final held-out loss {final:.4g} above {factor:g} x the initial {initial:.4g}"
        elif worst > factor * initial:
            reason = f"a training-loss window mean ({worst:.4g}) above {factor:g} x the initial held-out loss {initial:.4g}"
    return {"seed": seed, "final_loss": final, "train_loss": train_loss, "initial_loss": initial,
            "diverged": reason is not None, "diverged_reason": reason, "steps_done": done,
            "step_ms": 1e3 * step_s / max(done, 1), "train_step_ms": 1e3 * loop_s / max(done, 1), "train_s": loop_s,
            "train_cpu_s": cpu_s,
            "state_bytes_per_param": state_bytes(opt) / n_params, "params": n_params,
            "curve": curve, "heldout_curve": heldout_curve}


# -- the optimizers -------------------------------------------------------------------------------------------------

def _shipped_names() -> list[str]:
    return [entry["name"] for entry in l2o.list_pretrained()]


def learned_optimizers(extra: list[str], shipped: bool) -> list[Contender]:
    """Every shipped rule (unless ``shipped`` is False) and every ``extra`` rule (a shipped name or a
    checkpoint path), each through ``l2o.LearnedOptimizer`` at its default lr; duplicates dropped."""
    names = _shipped_names()
    out: list[Contender] = []
    seen: set[str] = set()
    for spec in ([*names] if shipped else []) + list(extra):
        if spec in seen:
            continue
        seen.add(spec)
        if spec in names:
            source, kw = f"pretrained={spec!r}", {"pretrained": spec}
            rule = l2o.load_pretrained(spec)
        elif Path(spec).is_file():
            path = str(Path(spec).resolve())
            source, kw = f"checkpoint={path!r}", {"checkpoint": path}
            rule = l2o.load_rule(path)  # fail now (CheckpointError) rather than in the middle of the suite
        else:
            raise UsageError(f"--rule {spec}: neither a shipped rule ({', '.join(names) or 'none shipped'}) nor an "
                             "existing checkpoint file")
        out.append(Contender(spec, "learned", lambda ps, kw=kw: l2o.LearnedOptimizer(ps, **kw), None,
                             f"l2o.LearnedOptimizer(params, {source})"))
        if hasattr(rule, "total_steps"):  # a rule with training-progress inputs: also told the run's length
            out.append(Contender(f"{spec}+total_steps", "learned", lambda ps: None, None,
                                 f"l2o.LearnedOptimizer(params, {source}, total_steps=<the run's steps>)",
                                 with_steps=lambda n, kw=kw: lambda ps: l2o.LearnedOptimizer(ps, total_steps=n, **kw)))
    return out


def _adam(lr: float) -> OptimizerFactory:
    return lambda ps: torch.optim.Adam(ps, lr=lr)


def _adamw(lr: float) -> OptimizerFactory:
    return lambda ps: torch.optim.AdamW(ps, lr=lr)


def _sgdm(lr: float) -> OptimizerFactory:
    return lambda ps: torch.optim.SGD(ps, lr=lr, momentum=0.9)


def tune(task: Task, splits: Splits, make: Callable[[float], OptimizerFactory], grid: Iterable[float], seed: int,
         steps: int, factor: float, log: Callable[[str], None], label: str) -> dict[str, Any]:
    """Train at each lr of ``grid`` on the tuning ``seed``; the lr with the lowest final ``val`` loss
    (a diverged run counts as +inf; ties go to the smaller lr)."""
    rows = []
    for lr in grid:
        run = train(task, splits, make(lr), seed, steps, factor=factor, final_split="val")
        score = run["final_loss"] if not run["diverged"] and _finite(run["final_loss"]) else math.inf
        rows.append({"lr": lr, "val_loss": run["final_loss"], "diverged": run["diverged"], "train_s": run["train_s"],
                     "score": score})
        log(f"  tune {label} lr={lr:.3g}: val loss {run['final_loss']:.4g}{' (diverged)' if run['diverged'] else ''}")
    best = min(range(len(rows)), key=lambda i: (rows[i]["score"], rows[i]["lr"]))
    if not math.isfinite(rows[best]["score"]):
        best = 0
    return {"grid": list(grid), "val_loss": [r["val_loss"] for r in rows], "diverged": [r["diverged"] for r in rows],
            "train_s": [r["train_s"] for r in rows], "best_lr": rows[best]["lr"],
            "at_grid_edge": best in (0, len(rows) - 1), "seed": seed, "steps": steps}


# -- aggregation ----------------------------------------------------------------------------------------------------

def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    if not values or any(not _finite(v) for v in values):
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(results: dict[str, dict[str, Any]]) -> None:
    """Adds a ``summary`` to each optimizer's results (in place): means, ratios to Adam@1e-3 and to
    tuned AdamW, times relative to Adam on the same seed."""
    adam_runs = {r["seed"]: r for r in results[ADAM]["runs"]}
    for res in results.values():
        runs = res["runs"]
        loss_m, loss_s = _mean_std([r["final_loss"] for r in runs])
        train_m, train_s = _mean_std([r["train_loss"] for r in runs])
        step_ratio = [r["step_ms"] / adam_runs[r["seed"]]["step_ms"] for r in runs]
        run_ratio = [r["train_step_ms"] / adam_runs[r["seed"]]["train_step_ms"] for r in runs]
        res["summary"] = {
            "final_loss_mean": loss_m, "final_loss_std": loss_s, "train_loss_mean": train_m, "train_loss_std": train_s,
            "step_ms": statistics.fmean(r["step_ms"] for r in runs),
            "train_step_ms": statistics.fmean(r["train_step_ms"] for r in runs),
            "step_time_vs_adam": statistics.fmean(step_ratio), "run_time_vs_adam": statistics.fmean(run_ratio),
            "state_bytes_per_param": statistics.fmean(r["state_bytes_per_param"] for r in runs),
            "diverged_seeds": sum(r["diverged"] for r in runs), "seeds": len(runs)}
    ref = {k: results[k]["summary"]["final_loss_mean"] if k in results else None for k in (ADAM, ADAMW)}
    for res in results.values():
        m = res["summary"]["final_loss_mean"]
        res["summary"]["vs_adam"] = m / ref[ADAM] if _finite(m) and ref[ADAM] else None
        res["summary"]["vs_adamw_tuned"] = m / ref[ADAMW] if _finite(m) and ref[ADAMW] else None


def project(task: Task, entry: dict[str, Any], full_seeds: int = 3, key: str = "train_s") -> float:
    """Seconds the full configuration of ``task`` (its own steps, ``full_seeds`` seeds, the full grids)
    would take at the per-step times (``key``: ``"train_s"`` wall, ``"train_cpu_s"`` this process's CPU
    time, which other jobs on the machine disturb less) and evaluation costs measured in ``entry``."""
    opts = entry["optimizers"]
    runs = {name: full_seeds for name in opts}
    runs[ADAMW] += len(ADAMW_GRID)
    runs[SGDM] += len(SGDM_GRID)
    train = sum(statistics.fmean(r[key] / r["steps_done"] for r in res["runs"]) * task.steps * runs[name]
                for name, res in opts.items())
    done = sum(len(res["runs"]) for res in opts.values()) + sum(len(t["grid"]) for t in entry["tuning"].values())
    measured = sum(r["train_s"] for res in opts.values() for r in res["runs"]) + \
        sum(sum(t["train_s"]) for t in entry["tuning"].values())
    overhead = max(0.0, entry["wall_s"] - measured) / done  # evaluation and set-up, per run
    return train + overhead * sum(runs.values())


# -- reporting ------------------------------------------------------------------------------------------------------

def _fmt(v: Any, spec: str = ".4g") -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def markdown(report: dict[str, Any]) -> str:
    """The report's tables: one per task, then the ratios of every optimizer on every task."""
    cfg = report["config"]
    out = [f"## Held-out suite: {len(cfg['seeds'])} seed(s) {', '.join(map(str, cfg['seeds']))}, tuning seed "
           f"{cfg['tuning_seed']}, {cfg['threads']} thread(s){' (fast: a smoke test, not a result)' if cfg['fast'] else ''}"
           + ("" if cfg.get("tuning", True) else "; no tuning (Adam@1e-3 and the rules only: a screen, not the suite)")]
    done = {k: v for k, v in report["tasks"].items() if not v.get("skipped")}
    for name, task in report["tasks"].items():
        if task.get("skipped"):
            out.append(f"\n### {name}: skipped\n\n{task['skipped']}")
            continue
        rows = []
        for opt, res in task["optimizers"].items():
            s = res["summary"]
            rows.append((opt, _fmt(res["lr"], ".3g") if res["lr"] is not None else "default",
                         f"{_fmt(s['final_loss_mean'])} ± {_fmt(s['final_loss_std'], '.2g')}",
                         f"{_fmt(s['train_loss_mean'])} ± {_fmt(s['train_loss_std'], '.2g')}",
                         _fmt(s["vs_adam"], ".3f"), _fmt(s["vs_adamw_tuned"], ".3f"),
                         f"{_fmt(s['step_ms'], '.3g')} ms ({_fmt(s['step_time_vs_adam'], '.3g')}×)",
                         f"{_fmt(s['run_time_vs_adam'], '.3g')}×", _fmt(s["state_bytes_per_param"], ".3g"),
                         f"{s['diverged_seeds']}/{s['seeds']}"))
        edge = [k for k, t in task["tuning"].items() if t["at_grid_edge"]]
        out.append(f"\n### {name}: {task['title']}, {task['steps']} steps, {task['params']:,} parameters\n\n"
                   + _table(("optimizer", "lr", "held-out loss", "final train loss", "vs Adam@1e-3", "vs tuned AdamW",
                             "step() time (vs Adam)", "run time vs Adam", "state B/param", "diverged"), rows)
                   + (f"\n\nbest lr at the edge of its grid: {', '.join(edge)}" if edge else ""))
    if done:
        opts = list(next(iter(done.values()))["optimizers"])
        ratios = [("vs_adam", "held-out loss / Adam@1e-3's")]
        ratios += [("vs_adamw_tuned", "held-out loss / tuned AdamW's")] if cfg.get("tuning", True) else []
        for key, title in ratios:
            rows = [(opt, *(_fmt(t["optimizers"][opt]["summary"][key], ".3f") if opt in t["optimizers"] else "–"
                            for t in done.values())) for opt in opts]
            out.append(f"\n### {title}\n\n" + _table(("optimizer", *done), rows))
    projected = [t.get("projected_full_s") for t in done.values()]
    cpu = [t.get("projected_full_cpu_s") for t in done.values()]
    out.append(f"\nsuite time {report['wall_s']:.0f} s"
               + (f"; projected time of these {len(done)} task(s) at full length (each task's steps, 3 seeds, full "
                  f"grids, these optimizers) from the per-step times measured here: {sum(projected) / 60:.0f} min "
                  f"wall ({sum(cpu) / 60:.0f} min of this process's CPU time in training steps, plus evaluation)"
                  if projected and None not in projected else ""))
    return "\n".join(out)


def plot_task(name: str, task: dict[str, Any], path: Path, log_y: bool) -> None:
    """One figure: the training-loss curve and the held-out curve of every optimizer (mean over seeds).

    The y-axis stops at 2.5x the initial held-out loss so that a diverged run does not flatten the others;
    diverged runs are marked in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    initial = max(r["initial_loss"] for res in task["optimizers"].values() for r in res["runs"])
    finite: list[float] = []
    for opt, res in task["optimizers"].items():
        diverged = res["summary"]["diverged_seeds"]
        label = opt + (f" (diverged: {diverged}/{len(res['runs'])} seeds)" if diverged else "")
        for ax, key in zip(axes, ("curve", "heldout_curve")):
            curves = [r[key] for r in res["runs"]]
            n = min(len(c) for c in curves)
            xs = [c[0] for c in curves[0][:n]]
            ys = [statistics.fmean(c[i][1] for c in curves) for i in range(n)]
            finite += [y for y in ys if math.isfinite(y)]
            ax.plot(xs, ys, label=label if key == "curve" else None, marker="o" if key == "heldout_curve" else None,
                    ms=3, ls="--" if diverged else "-")
    top = min(max(finite, default=initial), 2.5 * initial)
    bottom = min(finite, default=initial)
    for ax, what in zip(axes, ("training loss (minibatch, window mean)", "held-out loss (test subset)")):
        ax.set_xlabel("step")
        ax.set_ylabel(what)
        if log_y:
            ax.set_yscale("log")
            ax.set_ylim(bottom / 1.1, top * 1.1)
        else:
            ax.set_ylim(bottom - 0.05 * (top - bottom), top + 0.05 * (top - bottom))
        ax.grid(True, alpha=0.3, which="both")
    fig.legend(loc="center right", fontsize=7)
    fig.suptitle(f"{name}: {task['title']} (mean over {len(task['seeds'])} seed(s))")
    fig.subplots_adjust(left=0.06, right=0.78, bottom=0.12, top=0.88, wspace=0.25)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the suite ------------------------------------------------------------------------------------------------------

def run_suite(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs the configured tasks; the report (also written to ``args.json``)."""
    torch.set_num_threads(args.threads)
    learned = learned_optimizers(args.rule, shipped=not args.no_shipped)
    adamw_grid, sgdm_grid = (FAST_ADAMW_GRID, FAST_SGDM_GRID) if args.fast else (ADAMW_GRID, SGDM_GRID)
    tasks = list(iter_tasks(args.tasks))
    start = time.perf_counter()
    report: dict[str, Any] = {
        "suite": "generalist",
        "config": {"fast": args.fast, "seeds": args.seeds, "tuning_seed": args.tuning_seed, "threads": args.threads,
                   "tuning": not args.no_tuning,
                   "steps": args.steps, "divergence_factor": args.divergence_factor,
                   "adamw_grid": list(adamw_grid), "sgdm_grid": list(sgdm_grid), "adamw_weight_decay": 0.01,
                   "sgd_momentum": 0.9, "rules": [o.name for o in learned], "data": str(args.data) if args.data else None},
        "environment": {"l2o_version": l2o.__version__, "torch_version": str(torch.__version__),
                        "python": platform.python_version(), "platform": platform.platform(),
                        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
        "tasks": {}}
    for task in tasks:
        steps = args.steps or (FAST_STEPS if args.fast else task.steps)
        entry: dict[str, Any] = {"title": task.title, "model": task.model, "data": task.data, "held_out": task.held_out,
                                 "steps": steps, "batch_size": task.batch_size, "seeds": args.seeds, "skipped": None}
        report["tasks"][task.name] = entry
        try:
            splits = task.load(args.data, args.fast, task.batch_size)
        except MissingData as exc:
            entry["skipped"] = str(exc)
            log(f"skipping {task.name}: {exc}")
            continue
        t_task = time.perf_counter()
        entry["source"] = splits.source
        torch.manual_seed(0)
        entry["params"] = sum(p.numel() for p in task.make_model().parameters())
        log(f"{task.name}: {task.title}, {entry['params']:,} parameters, {steps} steps")
        factor = args.divergence_factor
        opts = [Contender(ADAM, "torch", _adam(1e-3), 1e-3, "torch.optim.Adam(params, lr=1e-3)")]
        entry["tuning"] = {}
        if not args.no_tuning:
            entry["tuning"] = {
                "adamw": tune(task, splits, _adamw, adamw_grid, args.tuning_seed, steps, factor, log, "adamw"),
                "sgdm": tune(task, splits, _sgdm, sgdm_grid, args.tuning_seed, steps, factor, log, "sgdm")}
            adamw_lr, sgdm_lr = entry["tuning"]["adamw"]["best_lr"], entry["tuning"]["sgdm"]["best_lr"]
            opts += [Contender(ADAMW, "torch", _adamw(adamw_lr), adamw_lr,
                               "torch.optim.AdamW(params, lr=<tuned>) (weight_decay 0.01)"),
                     Contender(SGDM, "torch", _sgdm(sgdm_lr), sgdm_lr, "torch.optim.SGD(params, lr=<tuned>, momentum=0.9)")]
        opts += learned
        results = {o.name: {"kind": o.kind, "lr": o.lr, "source": o.source, "runs": []} for o in opts}
        for seed in args.seeds:
            for o in opts:  # back to back, Adam first: the times of one seed are measured together
                make = o.make if o.with_steps is None else o.with_steps(steps)
                run = train(task, splits, make, seed, steps, factor=factor,
                            eval_points=FAST_EVAL_POINTS if args.fast else EVAL_POINTS)
                results[o.name]["runs"].append(run)
                log(f"  seed {seed} {o.name}: held-out {run['final_loss']:.4g}, train {_fmt(run['train_loss'])}, "
                    f"step {run['step_ms']:.3g} ms, {run['train_s']:.1f} s"
                    + (f"  DIVERGED: {run['diverged_reason']}" if run["diverged"] else ""))
        summarise(results)
        entry["optimizers"] = results
        entry["wall_s"] = time.perf_counter() - t_task
        if not args.fast and entry["tuning"]:
            entry["projected_full_s"] = project(task, entry)
            entry["projected_full_cpu_s"] = project(task, entry, key="train_cpu_s")
        if args.out_dir is not None:
            png = args.out_dir / f"generalist_{task.name}.png"
            plot_task(task.name, entry, png, task.log_y)
            entry["figure"] = str(png)
    report["wall_s"] = time.perf_counter() - start
    return report


def _clean(value: Any) -> Any:
    """``value`` with non-finite floats as None (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integer seeds such as 0,1,2, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"expected distinct comma-separated seeds >= 0 such as 0,1,2, got {text!r}")
    return seeds


def _tasks(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    error = task_names_error(names)
    if error:
        raise argparse.ArgumentTypeError(error)
    return list(dict.fromkeys(names))


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if not value > 0 or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The command line of this script."""
    p = argparse.ArgumentParser(prog="benchmarks/generalist.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="tasks: " + ", ".join(TASKS) + "; run only when named: " + ", ".join(EXTRA_TASKS))
    p.add_argument("--rule", action="append", default=[], metavar="NAME_OR_PATH",
                   help="a further learned rule: a shipped name (l2o.list_pretrained()) or a checkpoint path; repeatable")
    p.add_argument("--no-shipped", action="store_true",
                   help="leave out the shipped rules (only --rule rules and the baselines)")
    p.add_argument("--tasks", type=_tasks, default=None, help="comma-separated task names (default: the suite's; "
                   "mnist-bn-convnet and mnist-resmlp, the Fashion-MNIST models on MNIST, only when named)")
    p.add_argument("--seeds", type=_seeds, default=None, help="reported seeds (default 0,1,2; --fast: 0)")
    p.add_argument("--tuning-seed", type=int, default=1000, help="the seed of the tuning runs (default 1000)")
    p.add_argument("--steps", type=_positive(int), default=None,
                   help="training steps of every run (default: each task's, at least 2000; --fast: 4)")
    p.add_argument("--no-tuning", action="store_true",
                   help="skip the tuned AdamW and SGD-momentum (and their 10 tuning runs per task): Adam@1e-3 and the "
                        "rules only, to screen checkpoints (the report says so; not the suite's result)")
    p.add_argument("--fast", action="store_true", help="few steps, one seed, two-point grids, small evaluation sets: "
                                                        "a smoke test, not a result")
    p.add_argument("--data", type=Path, default=None,
                   help="data directory with MNIST (and optionally Fashion-MNIST): default $L2O_DATA, else "
                        "../shared/data; Fashion-MNIST is also looked for in /usr/share/datasets/fashion-mnist")
    p.add_argument("--threads", type=_positive(int), default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--divergence-factor", type=_positive(float), default=2.0,
                   help="a run diverged if its loss rises above this x its initial held-out loss (default 2)")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="figures (generalist_<task>.png) and, by default, the JSON go here "
                        "(default benchmarks/results/generalist; --fast: runs/generalist-fast)")
    p.add_argument("--json", type=Path, default=None, help="the JSON report (default <out-dir>/generalist.json)")
    p.add_argument("--markdown", type=Path, default=None, help="also write the markdown tables here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.seeds = args.seeds or ([0] if args.fast else [0, 1, 2])
    if args.tuning_seed in args.seeds:
        print(f"generalist.py: error: --tuning-seed {args.tuning_seed} is one of the reported --seeds; tuning must use "
              "a separate seed", file=sys.stderr)
        return 2
    args.data = args.data or default_data_dir(REPO)
    if args.data is not None and not args.data.is_dir():
        print(f"generalist.py: error: --data {args.data} is not a directory", file=sys.stderr)
        return 2
    args.out_dir = (args.out_dir or (REPO / "runs" / "generalist-fast" if args.fast
                                     else HERE / "results" / "generalist")).resolve()
    args.json = args.json or args.out_dir / "generalist.json"
    try:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        report = run_suite(args)
    except UsageError as exc:
        print(f"generalist.py: error: {exc}", file=sys.stderr)
        return 2
    except l2o.CheckpointError as exc:
        print(f"generalist.py: error: {exc}", file=sys.stderr)
        return 2
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(_clean(report), allow_nan=False, indent=1) + "\n")
    text = markdown(report)
    print("\n" + text)
    if args.markdown is not None:
        args.markdown.write_text(text + "\n")
    print(f"\nJSON: {args.json}; figures: {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
