"""Time one meta-training epoch: the library against a plain ``nn.LSTMCell`` loop.

One epoch = 128 random 10-d quadratics optimised for 100 inner steps with truncation 20 (5
meta-steps of Adam on the rule's weights), first-order as in the paper. The plain loop below is
the straightforward PyTorch implementation of the same algorithm (two ``nn.LSTMCell``s and a
``Linear`` on all 1280 coordinates as one batch, autograd through the task losses); the library
side is one epoch of :func:`l2o.meta.meta_train` itself (validation off). Both are timed
in alternation in the same process, after warm-up; the script reports medians and their ratio.

Each setting runs in its own subprocess because the CPU settings are process-wide:
``default`` leaves torch's defaults; ``tuned`` applies :func:`l2o.perf.configure_cpu` (threads,
denormal flushing, allocator reuse) to both implementations alike. Each runs at every thread count
of ``--threads`` (default: 1 and the machine's cores), the same for both implementations.

    python benchmarks/speed_meta_train.py --json benchmarks/results/speed_meta_train.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

B, D, H, HORIZON, TRUNC = 128, 10, 20, 100, 20


class PlainLSTM(nn.Module):
    """The paper's rule written the straightforward way: two LSTMCells and a linear output."""

    def __init__(self) -> None:
        super().__init__()
        self.cell1 = nn.LSTMCell(1, H)
        self.cell2 = nn.LSTMCell(H, H)
        self.out = nn.Linear(H, 1)

    def forward(self, grad, state):
        (h1, c1), (h2, c2) = state
        h1, c1 = self.cell1(grad, (h1, c1))
        h2, c2 = self.cell2(h1, (h2, c2))
        return self.out(h2), ((h1, c1), (h2, c2))


def plain_epoch(net: PlainLSTM, meta_opt: torch.optim.Optimizer, gen: torch.Generator) -> float:
    W = torch.randn(B, D, D, generator=gen)
    y = torch.randn(B, D, generator=gen)
    theta = (torch.randn(B, D, generator=gen) * 0.01).requires_grad_()
    state = tuple((torch.zeros(B * D, H), torch.zeros(B * D, H)) for _ in range(2))

    def f(th):
        r = torch.bmm(W, th.unsqueeze(-1)).squeeze(-1) - y
        return (r * r).sum(-1)

    total = 0.0
    for _ in range(HORIZON // TRUNC):
        meta_loss = 0.0
        for _ in range(TRUNC):
            (g,) = torch.autograd.grad(f(theta).sum(), theta, retain_graph=True)
            update, state = net(g.detach().reshape(-1, 1), state)
            theta = theta + update.reshape(B, D)
            meta_loss = meta_loss + f(theta).mean()
        meta_opt.zero_grad()
        meta_loss.backward()
        meta_opt.step()
        total += float(meta_loss.detach())
        theta = theta.detach().requires_grad_()
        state = tuple((h.detach(), c.detach()) for h, c in state)
    return total


def library_epoch(rule, family, seed: int) -> None:
    """One epoch of the library's own trainer (which also clips and checks every meta-step)."""
    from l2o.meta import MetaTrainConfig, meta_train

    config = MetaTrainConfig(epochs=1, horizon=HORIZON, truncation=TRUNC, meta_lr=1e-3, meta_lr_final=None,
                             validate_every=0, seed=seed)
    meta_train(rule, family, config, progress=False)


def measure(setting: str, threads: int, repeats: int, warmup: int) -> dict:
    import l2o
    from l2o.perf import configure_cpu
    from optimizees.quadratic import QuadraticFamily

    torch.set_num_threads(threads)
    applied = configure_cpu(threads) if setting == "tuned" else {"threads": torch.get_num_threads()}
    torch.manual_seed(0)
    net = PlainLSTM()
    rule = l2o.LSTMRule()
    plain_opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    family = QuadraticFamily(dim=D, num_functions=B)
    gen_p = torch.Generator().manual_seed(1)
    times = {"plain": [], "library": []}
    for i in range(warmup + repeats):
        for name in ("plain", "library"):
            start = time.perf_counter()
            if name == "plain":
                plain_epoch(net, plain_opt, gen_p)
            else:
                library_epoch(rule, family, seed=i)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    plain, lib = statistics.median(times["plain"]), statistics.median(times["library"])
    return {
        "setting": setting, "applied": applied, "repeats": repeats,
        "plain_ms": plain * 1e3, "library_ms": lib * 1e3, "speedup": plain / lib,
        "l2o_version": l2o.__version__, "torch_version": str(torch.__version__),
        "machine": platform.processor() or platform.machine(), "cpus": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    parser.add_argument("--threads", default=",".join(str(t) for t in sorted({1, cores})),
                        help="comma-separated torch intra-op thread counts, each for both (default: 1 and the cores)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--settings", default="default,tuned", help="comma-separated: default, tuned")
    parser.add_argument("--json", default=None, help="write the rows (JSON list) here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, int(args.threads), args.repeats, args.warmup)))
        return
    rows = []
    for threads in args.threads.split(","):
        for setting in args.settings.split(","):
            cmd = [sys.executable, __file__, "--child", setting, "--threads", threads,
                   "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"{'setting':8s} {'threads':>7s} {'plain ms':>9s} {'l2o ms':>8s} {'speed-up':>9s}")
    for r in rows:
        print(f"{r['setting']:8s} {r['applied']['threads']:7d} {r['plain_ms']:9.1f} {r['library_ms']:8.1f} {r['speedup']:8.2f}x")
    if args.json:
        from pathlib import Path

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
