"""The generalisation study of Andrychowicz et al. 2016 (§3.2, Fig. 4), and RNNprop-style inputs.

Learned rules (checkpoints) against SGD, NAG, RMSprop and Adam on MNIST MLPs, for the training
setting and four changes of it:

    base      784-20-10 sigmoid, 100 steps (the setting the rules were meta-trained on)
    steps200  the same network, 200 steps
    units40   784-40-10 sigmoid, 100 steps
    layers2   784-20-20-10 sigmoid, 100 steps
    relu      784-20-10 ReLU, 100 steps

Baselines' learning rates are tuned per case on a log grid (1e-4 .. 1, 4 per decade) on tuning
networks scored on the 10,000 validation images; every rule is then run on held-out networks
(other seeds: other initial weights and minibatches) and scored by the mean cross-entropy of the
final weights on the 10,000 MNIST test images. Writes one JSON line per case and a figure per case.

    python benchmarks/mnist_generalisation.py --data ../shared/data \\
        --rule paper=runs/mnist_paper.pt --rule rnnprop=runs/mnist_rnnprop.pt
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import l2o
from l2o.checkpoints import load_rule
from l2o.cli import plot_report
from l2o.meta import compare
from l2o.perf import configure_cpu
from optimizees.mlp import MLPFamily, MNISTData

CASES = {
    "base": dict(hidden=(20,), activation="sigmoid", steps=100),
    "steps200": dict(hidden=(20,), activation="sigmoid", steps=200),
    "units40": dict(hidden=(40,), activation="sigmoid", steps=100),
    "layers2": dict(hidden=(20, 20), activation="sigmoid", steps=100),
    "relu": dict(hidden=(20,), activation="relu", steps=100),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="MNIST directory (default $L2O_DATA)")
    parser.add_argument("--rule", action="append", default=[], metavar="NAME=PATH", help="a learned rule (repeatable)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    parser.add_argument("--num-tasks", type=int, default=40, help="held-out networks per case (default 40)")
    parser.add_argument("--num-tuning-tasks", type=int, default=20, help="tuning networks per lr (default 20)")
    parser.add_argument("--networks-per-task", type=int, default=20, help="networks batched per task (default 20)")
    parser.add_argument("--seed", type=int, default=10_000, help="tuning seed; held-out networks use seed + 10000")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    cpu = configure_cpu(args.threads)
    rules = {}
    for spec in args.rule:
        name, sep, path = spec.partition("=")
        if not sep:
            parser.error(f"--rule expects NAME=PATH, got {spec!r}")
        rules[name] = load_rule(path)
    cases = args.cases.split(",")
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")
    data = MNISTData(args.data)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = args.out_dir / "mnist_generalisation.jsonl"
    rows = []
    for case in cases:
        spec = CASES[case]
        family = MLPFamily(data, hidden=spec["hidden"], activation=spec["activation"],
                           num_networks=args.networks_per_task, eval_split="test")
        start = time.perf_counter()
        report = compare(rules, family, horizon=spec["steps"], num_tasks=args.num_tasks,
                         num_tuning_tasks=args.num_tuning_tasks, tuning_seed=args.seed,
                         eval_seed=args.seed + 10_000, tuning_family=family.with_eval_split("val"))
        wall = time.perf_counter() - start
        report["task"] = f"MNIST {case}"
        plot_report(report, args.out_dir / f"mnist_{case}.png")
        adam = report["results"]["adam"]["final_loss_mean"]
        row = {
            "suite": "mnist_generalisation", "case": case, "config": {**spec, "hidden": list(spec["hidden"])},
            "num_tasks": args.num_tasks, "num_tuning_tasks": args.num_tuning_tasks, "seed": args.seed,
            "rules": {name: str(path) for name, path in (s.split("=", 1) for s in args.rule)},
            "l2o_version": l2o.__version__, "torch_version": str(torch.__version__),
            "device": f"cpu ({platform.processor() or platform.machine()}), {args.threads} thread(s)",
            "cpu_settings": cpu, "wall_s": round(wall, 1),
            "results": {name: {"lr": r["lr"], "test_loss_mean": r["final_loss_mean"],
                               "test_loss_std": r["final_loss_std"], "train_loss_mean": r["final_train_loss_mean"],
                               "vs_adam": r["final_loss_mean"] / adam, "curve": r["curve"]}
                        for name, r in report["results"].items()},
            "tuning": report["tuning"],
        }
        rows.append(row)
        with jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
    print("| case | rule | tuned lr | test loss (mean ± std) | vs Adam |")
    print("|---|---|---|---|---|")
    for row in rows:
        for name, r in row["results"].items():
            lr = "–" if r["lr"] is None else f"{r['lr']:.3g}"
            print(f"| {row['case']} | {name} | {lr} | {r['test_loss_mean']:.3f} ± {r['test_loss_std']:.3f} | "
                  f"{r['vs_adam']:.2f} |")


if __name__ == "__main__":
    main()
