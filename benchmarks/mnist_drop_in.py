"""The shipped MNIST rules as drop-in ``torch.optim`` optimizers on ordinary ``nn.Sequential`` MLPs.

For each activation (sigmoid, the training setting; ReLU, held out) and each optimizer, trains a
784-20-10 MLP for ``--steps`` minibatch steps (batch 128, MNIST training images) from ``--seeds``
initialisations, through the user-facing loop (``zero_grad``, ``backward``, ``step``), and prints
the mean and the per-seed test losses. Learned rules run at the optimizer's ``lr`` 1 and 0.3 (``lr``
scales the whole learned step); Adam at both of its tuned rates from the generalisation study
(0.0316 for sigmoid, 0.0178 for ReLU).

    python benchmarks/mnist_drop_in.py --data ../shared/data
    python benchmarks/mnist_drop_in.py --data ../shared/data --rule mine=runs/my.pt --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

import l2o
from optimizees.mlp import MNISTData

ACTIVATIONS = {"sigmoid": torch.nn.Sigmoid, "relu": torch.nn.ReLU}
OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]


def test_loss(data: MNISTData, make_opt: OptimizerFactory, activation: str, seed: int, steps: int) -> float:
    """Test cross-entropy of a fresh 784-20-10 MLP after ``steps`` steps of ``make_opt``."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(784, 20), ACTIVATIONS[activation](), torch.nn.Linear(20, 10))
    opt = make_opt(model.parameters())
    gen = torch.Generator().manual_seed(seed + 1)
    n = data.train_x.shape[0]
    for _ in range(steps):
        idx = torch.randint(n, (128,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(data.train_x[idx]), data.train_y[idx]).backward()
        opt.step()
    with torch.no_grad():
        return float(F.cross_entropy(model(data.test_x), data.test_y))


def optimizers(rules: dict[str, str]) -> dict[str, OptimizerFactory]:
    """Adam at its tuned lrs (for sigmoid and for ReLU) and every rule at lr 1 and 0.3."""
    opts: dict[str, OptimizerFactory] = {f"adam (lr {lr})": lambda ps, lr=lr: torch.optim.Adam(ps, lr=lr)
                                         for lr in (0.0316, 0.0178)}
    for name, source in rules.items():
        where = {"checkpoint": source} if source.endswith(".pt") else {"pretrained": source}
        for lr in (1.0, 0.3):
            opts[f"{name} (lr {lr:g})"] = lambda ps, where=where, lr=lr: l2o.LearnedOptimizer(ps, **where, lr=lr)
    return opts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="directory with the MNIST IDX files (default: $L2O_DATA)")
    parser.add_argument("--rule", action="append", default=[], metavar="NAME=PRETRAINED_OR_PATH",
                        help="a learned rule (default: the shipped mnist, mnist-nag and mnist-paper)")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rules = dict(r.split("=", 1) for r in args.rule) if args.rule else {name: name for name in ("mnist", "mnist-nag", "mnist-paper")}
    data = MNISTData(args.data)
    results = []
    print(f"{'activation':<10} {'optimizer':<24} {'mean':>7}  per seed (test loss after {args.steps} steps)")
    for activation in ACTIVATIONS:
        for name, make_opt in optimizers(rules).items():
            losses = [test_loss(data, make_opt, activation, seed, args.steps) for seed in range(args.seeds)]
            mean = statistics.fmean(losses)
            results.append({"activation": activation, "optimizer": name, "mean": mean, "losses": losses})
            print(f"{activation:<10} {name:<24} {mean:7.4f}  {' '.join(f'{x:.3f}' for x in losses)}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"steps": args.steps, "seeds": args.seeds, "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
