"""Fair evaluation: learning-rate-tuned baselines against a rule, on held-out tasks.

Baselines (SGD, NAG, RMSprop, Adam) have their learning rate tuned on a log grid over *tuning*
tasks; then every rule is evaluated on *held-out* tasks drawn with a different seed. Scores are the
mean loss at the final inner step on each task's evaluation split (:data:`~l2o.tasks.META`: for
quadratics the function itself, for MNIST MLPs a fixed set of images no minibatch contains); a rule
that produces NaN/Inf at some learning rate scores ``inf`` there and is never chosen.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ..rules import HAND_RULES
from ..rules.base import Rule
from ..validation import check_positive_int
from ..tasks import META, TRAIN, Task, TaskFamily
from ..unroll import init_inner, loss_and_grads, unroll

__all__ = ["BASELINES", "lr_grid", "loss_curves", "run_rule", "sample_tasks", "tune_lr", "ratio_interval", "compare"]

#: Baseline names, in the order reports list them.
BASELINES = ("sgd", "nag", "rmsprop", "adam")


def lr_grid(low: float = 1e-4, high: float = 1.0, per_decade: int = 4) -> list[float]:
    """Log-spaced learning rates from ``low`` to ``high`` inclusive, ``per_decade`` points a decade."""
    if not (0 < low < high) or per_decade < 1:
        raise ValueError(f"need 0 < low < high and per_decade >= 1, got {low}, {high}, {per_decade}")
    n = round(math.log10(high / low) * per_decade)
    return [low * 10 ** (k / per_decade) for k in range(n + 1)]


def sample_tasks(family: TaskFamily, num_instances: int, seed: int) -> list[Task]:
    """Enough tasks from ``family`` (seeded) to hold ``num_instances`` instances."""
    if num_instances < 1:
        raise ValueError(f"num_instances must be >= 1, got {num_instances}")
    gen = torch.Generator().manual_seed(seed)
    tasks, count = [], 0
    while count < num_instances:
        task = family.sample(gen)
        tasks.append(task)
        count += int(task.loss(task.init(torch.Generator().manual_seed(0)), task.sample_batch(TRAIN, gen)).numel())
    return tasks


@torch.no_grad()
def run_rule(rule: Rule, tasks: Sequence[Task], steps: int, seed: int,
             num_instances: int | None = None) -> tuple[Tensor, Tensor]:
    """Run ``rule`` for ``steps`` inner steps on every task; no meta-gradient.

    Each task is started from ``task.init`` with a generator seeded by ``seed`` and its index, so
    every rule sees the same initial params and batches.

    Returns:
        ``(curves, final)``: the per-instance training losses at inner steps ``0..steps``, shape
        ``(steps + 1, instances)``, and the per-instance loss of the final params on the task's
        evaluation split (:data:`~l2o.tasks.META`), shape ``(instances,)``.
    """
    curves, finals = [], []
    for k, task in enumerate(tasks):
        gen = torch.Generator().manual_seed(seed + k)
        inner = init_inner(rule, task, gen)
        loss, grads = loss_and_grads(task, inner.params, task.sample_batch(TRAIN, gen))
        inner = inner._replace(loss=loss, grads=grads)  # the unroll's first step reuses them
        result = unroll(rule, task, inner, steps=steps, generator=gen, weights=[0.0] * steps)
        curves.append(torch.cat((loss.reshape(1, -1), result.losses)))
        finals.append(task.loss(result.inner.params, task.sample_batch(META, gen)).detach().reshape(-1))
    out, final = torch.cat(curves, dim=1), torch.cat(finals)
    if num_instances is not None:
        out, final = out[:, :num_instances], final[:num_instances]
    return out, final


def loss_curves(rule: Rule, tasks: Sequence[Task], steps: int, seed: int, num_instances: int | None = None) -> Tensor:
    """The training-loss curves of :func:`run_rule`, shape ``(steps + 1, instances)``."""
    return run_rule(rule, tasks, steps, seed, num_instances)[0]


def _score(final: Tensor) -> float:
    value = float(final.mean())
    return value if math.isfinite(value) else math.inf


def tune_lr(make_rule: Callable[[float], Rule], tasks: Sequence[Task], steps: int, lrs: Sequence[float],
            seed: int) -> tuple[float, dict[float, float]]:
    """The learning rate from ``lrs`` with the lowest mean final evaluation loss on ``tasks``, and all scores."""
    scores = {lr: _score(run_rule(make_rule(lr), tasks, steps, seed)[1]) for lr in lrs}
    best = min(scores, key=lambda lr: scores[lr])
    if not math.isfinite(scores[best]):
        raise ValueError("every learning rate in the grid diverged on the tuning tasks; widen the grid")
    return best, scores


def _summary(curves: Tensor, final: Tensor, lr: float | None) -> dict[str, Any]:
    return {
        "lr": lr,
        "final_loss_mean": float(final.mean()),
        "final_loss_std": float(final.std()) if final.numel() > 1 else 0.0,
        "final_train_loss_mean": float(curves[-1].mean()),
        "curve": [float(v) for v in curves.mean(dim=1)],
    }


def ratio_interval(final: Tensor, reference: Tensor, *, level: float = 0.9, resamples: int = 2000,
                   seed: int = 0) -> tuple[float, float]:
    r"""Paired bootstrap interval of the ratio of mean final losses, :math:`\bar f / \bar f_{\rm ref}`.

    Both tensors hold one final loss per held-out instance, in the same order (the same instances).
    Each of ``resamples`` bootstrap draws picks instances with replacement, the same ones for both,
    and takes the ratio of the two means; the interval is the central ``level`` quantile range of
    those ratios. On heavy-tailed task families (the 10-d quadratics: a few near-singular functions
    hold much of the mean loss) it shows how much of a ratio is the luck of the held-out draw.
    """
    if final.shape != reference.shape or final.dim() != 1 or final.numel() < 2:
        raise ValueError(f"need two 1-d tensors of the same length >= 2, got {tuple(final.shape)} and "
                         f"{tuple(reference.shape)}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    check_positive_int("resamples", resamples)
    a, b = final.double().cpu(), reference.double().cpu()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return math.nan, math.nan
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, a.numel(), (resamples, a.numel()), generator=gen)
    ratios = a[idx].mean(1) / b[idx].mean(1)
    lo, hi = torch.quantile(ratios, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=ratios.dtype)).tolist()
    return lo, hi


def compare(learned: Rule | dict[str, Rule] | None, family: TaskFamily, *, horizon: int = 100, num_tasks: int = 1000,
            num_tuning_tasks: int = 1000, baselines: Sequence[str] = BASELINES,
            lrs: Sequence[float] | None = None, tuning_seed: int = 10_000, eval_seed: int = 20_000,
            tuning_family: TaskFamily | None = None,
            progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Tune each baseline's lr on tuning tasks, then evaluate everything on held-out tasks.

    ``learned`` is one rule (reported as ``"learned"``), several by name, or None (baselines
    only). ``tuning_family`` (default ``family``) draws the tuning tasks, e.g. the same MNIST networks
    evaluated on the validation images while ``family`` evaluates on the test images.

    Returns the report dict (see the README): ``{"task", "horizon", "num_tasks", "results": {name:
    {"lr", "final_loss_mean", "final_loss_std", "final_train_loss_mean", "curve"}}, "tuning":
    {name: {lr: score}}}``. ``final_loss_*`` are read on the evaluation split at the final step;
    ``curve`` is the mean training loss at steps ``0..horizon``. When Adam is among the baselines,
    every other entry also has ``vs_adam`` (its mean final loss over Adam's) and ``vs_adam_ci90``
    (a 90% paired bootstrap interval of that ratio over the held-out instances, see
    :func:`ratio_interval`).
    """
    check_positive_int("horizon", horizon)
    if tuning_seed == eval_seed:
        raise ValueError("tuning_seed and eval_seed must differ so that held-out tasks are not tuning tasks")
    unknown = [b for b in baselines if b not in HAND_RULES]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; choose from {', '.join(HAND_RULES)}")
    lrs = list(lrs) if lrs is not None else lr_grid()
    tuning = sample_tasks(tuning_family or family, num_tuning_tasks, tuning_seed)
    held_out = sample_tasks(family, num_tasks, eval_seed)
    results: dict[str, Any] = {}
    finals: dict[str, Tensor] = {}
    tuning_scores: dict[str, Any] = {}
    learned_rules = {"learned": learned} if isinstance(learned, Rule) else dict(learned or {})
    for label, rule in learned_rules.items():
        if label in HAND_RULES:
            raise ValueError(f"learned rule name {label!r} clashes with a baseline; pick another name")
        if progress:
            progress(label)
        curves, finals[label] = run_rule(rule, held_out, horizon, eval_seed, num_tasks)
        results[label] = _summary(curves, finals[label], None)
    for name in baselines:
        if progress:
            progress(name)
        cls = HAND_RULES[name]
        best, scores = tune_lr(lambda lr: cls(lr=lr), tuning, horizon, lrs, tuning_seed)
        tuning_scores[name] = {f"{lr:.6g}": s for lr, s in scores.items()}
        curves, finals[name] = run_rule(cls(lr=best), held_out, horizon, eval_seed, num_tasks)
        results[name] = _summary(curves, finals[name], best)
    if "adam" in finals and finals["adam"].numel() > 1:
        adam = finals["adam"]
        for label, final in finals.items():
            if label != "adam":
                results[label]["vs_adam"] = float(final.double().mean() / adam.double().mean())
                results[label]["vs_adam_ci90"] = list(ratio_interval(final, adam))
    name = getattr(family, "name", type(family).__name__)
    return {"task": name, "horizon": horizon, "num_tasks": num_tasks, "results": results, "tuning": tuning_scores}
