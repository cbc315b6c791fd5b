"""``step()`` time of the generalist drop-in on two small held-out models, against torch.optim.Adam.

The MNIST convnet (28k parameters, 8 tensors) and the character GPT (110k parameters, 28 tensors)
of :mod:`generalist_tasks`; gradients are random and set once, so only ``step()`` is timed. Three
contenders run interleaved in every round: ``torch.optim.Adam(lr=1e-3)``, ``l2o.LearnedOptimizer``
with the compiled kernel, and the same with ``L2O_KERNELS`` off (the torch path). Prints the median
ms per ``step()`` and the ratio to Adam::

    python benchmarks/speed_step_small.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import l2o  # noqa: E402
from l2o import kernels  # noqa: E402
from generalist_tasks import CharGPT, ConvNet  # noqa: E402


def _make(model_fn, kind: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = model_fn()
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-2
    if kind == "adam":
        return model, torch.optim.Adam(model.parameters(), lr=1e-3)
    return model, l2o.LearnedOptimizer(model.parameters())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round (default 20)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name, fn in (("mnist-convnet", ConvNet), ("char-gpt", CharGPT)):
        runs = {kind: _make(fn, kind) for kind in ("adam", "kernel", "torch")}
        params = list(runs["adam"][0].parameters())
        times: dict[str, list[float]] = {kind: [] for kind in runs}
        for _ in range(args.rounds):
            for kind, (_, opt) in runs.items():
                kernels.set_enabled(kind != "torch")
                for _ in range(3):
                    opt.step()
                start = time.perf_counter()
                for _ in range(args.steps):
                    opt.step()
                times[kind].append((time.perf_counter() - start) / args.steps)
        kernels.set_enabled(True)
        med = {kind: statistics.median(v) * 1e3 for kind, v in times.items()}
        print(f"{name}: {sum(p.numel() for p in params)} params, {len(params)} tensors; median ms per step(): "
              + ", ".join(f"{kind} {v:.3f} ({v / med['adam']:.2f}x)" for kind, v in med.items()))


if __name__ == "__main__":
    main()
