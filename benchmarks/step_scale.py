r"""How large are a rule's steps, tensor by tensor, next to Adam's on the same gradients?

Trains one model of the generalist suite (``generalist_tasks.py``) with an optimizer through the
ordinary ``torch.optim`` loop and, at every step, feeds the same gradients to a shadow Adam
(:math:`\beta = (0.9, 0.999)`, :math:`\epsilon = 10^{-8}`, lr ``--adam-lr``) that never touches the
weights. Printed per parameter tensor, at the steps ``--at``: the ratio of norms
:math:`\lVert\Delta\theta\rVert / \lVert\Delta\theta_\text{Adam}\rVert`, where
:math:`\Delta\theta` is the step the optimizer took and :math:`\Delta\theta_\text{Adam}` the step
Adam would have taken from the same gradient history (1 everywhere for ``--rule adam``). Also the
minibatch training loss (mean of the 10 steps up to each printed step).

    python benchmarks/step_scale.py --task char-gpt --rule generalist --steps 400
    python benchmarks/step_scale.py --task char-gpt --rule runs/generalist.pt --json step_scale.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import l2o  # noqa: E402
from generalist_tasks import ALL_TASKS, default_data_dir  # noqa: E402


def make_optimizer(rule: str, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """``adam`` (lr 1e-3), a shipped rule's name, or a checkpoint path (``.pt``)."""
    if rule == "adam":
        return torch.optim.Adam(params, lr=1e-3)
    if rule.endswith(".pt"):
        return l2o.LearnedOptimizer(params, checkpoint=rule)
    return l2o.LearnedOptimizer(params, pretrained=rule)


def step_scale(task_name: str, rule: str, steps: int, at: list[int], *, seed: int = 0, adam_lr: float = 1e-3,
               data: Path | None = None) -> dict:
    """The ratios of the module docstring: ``{"steps": at, "loss": [...], "ratio": {tensor: [...]}}``."""
    task = ALL_TASKS[task_name]
    splits = task.load(data, False, task.batch_size)
    torch.manual_seed(seed)
    model = task.make_model()
    gen = torch.Generator().manual_seed(seed + 1)
    named = [(n, p) for n, p in model.named_parameters()]
    opt = make_optimizer(rule, [p for _, p in named])
    m = [torch.zeros_like(p) for _, p in named]
    v = [torch.zeros_like(p) for _, p in named]
    losses: list[float] = []
    ratio: dict[str, list[float]] = {n: [] for n, _ in named}
    wanted = set(at)
    for t in range(steps):
        x, y = splits.batch(gen)
        opt.zero_grad()
        loss = task.loss(model, x, y)
        loss.backward()
        losses.append(float(loss.detach()))
        before = [p.detach().clone() for _, p in named]
        opt.step()
        with torch.no_grad():
            for i, (n, p) in enumerate(named):
                g = p.grad
                m[i].mul_(0.9).add_(g, alpha=0.1)
                v[i].mul_(0.999).addcmul_(g, g, value=0.001)
                if t in wanted:
                    adam = adam_lr * (m[i] / (1 - 0.9 ** (t + 1))) / ((v[i] / (1 - 0.999 ** (t + 1))).sqrt() + 1e-8)
                    ratio[n].append(float((p - before[i]).norm() / adam.norm().clamp_min(1e-30)))
    shown = [s for s in at if s < steps]
    window = [sum(losses[max(0, s - 9):s + 1]) / len(losses[max(0, s - 9):s + 1]) for s in shown]
    return {"task": task_name, "rule": rule, "seed": seed, "steps": shown, "loss": window, "ratio": ratio}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="char-gpt", choices=sorted(ALL_TASKS))
    p.add_argument("--rule", default="generalist", help="adam, a shipped rule's name, or a checkpoint path (.pt)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--at", default="0,10,50,100,200,399", help="comma-separated steps to report")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--adam-lr", type=float, default=1e-3)
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    at = sorted({int(s) for s in args.at.split(",")})
    data = args.data or default_data_dir(Path(__file__).resolve().parents[1])
    out = step_scale(args.task, args.rule, args.steps, at, seed=args.seed, adam_lr=args.adam_lr, data=data)
    width = max(len(n) for n in out["ratio"])
    print(f"{args.task}, {args.rule} vs Adam(lr={args.adam_lr:g}) on the same gradients: step-norm ratio per tensor")
    print(f"{'step':{width}s} " + " ".join(f"{s:>7d}" for s in out["steps"]))
    print(f"{'train loss':{width}s} " + " ".join(f"{v:7.3f}" for v in out["loss"]))
    for n, r in out["ratio"].items():
        print(f"{n:{width}s} " + " ".join(f"{x:7.2f}" for x in r))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
