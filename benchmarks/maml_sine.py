"""MAML on sine regression (Finn et al. 2017, §5.1): speed of one meta-iteration.

``--speed`` times one second-order meta-iteration (meta-batch 25, K = 10 support and 10 query
points, network 1-40-40-1 ReLU, inner SGD lr 0.01, Adam meta-step) with 1 and with 5 inner steps:

* **l2o**: what ``l2o maml`` runs: θ0 from :class:`l2o.MAMLInit` broadcast over the 25 tasks, one
  call of the unroll engine (``weights=[0, ..., 0, 1]``, ``meta_split=META``, second order) on the
  batched sine task (``vmap`` over ``functional_call``), backward, Adam step;
* **plain loop**: the same algorithm written the usual way in this script: a Python loop over the
  25 tasks, each adapted with ``torch.autograd.grad(create_graph=True)`` on its own
  (learn2learn and higher work like this).

Both run in alternation in one process after warm-up; the script prints medians and the ratio.

    python benchmarks/maml_sine.py --speed --json benchmarks/results/maml_sine_speed.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from torch.func import functional_call

import l2o
from l2o.maml import MAMLInit
from l2o.perf import configure_cpu
from l2o.rules import SGD
from l2o.tasks import META
from l2o.unroll import init_inner, unroll
from optimizees.sine import SineFamily, SineMLP

META_BATCH, INNER_LR, META_LR = 25, 0.01, 1e-3


def library_step(init: MAMLInit, rule: SGD, optimizer: torch.optim.Optimizer, task, steps: int) -> float:
    gen = torch.Generator().manual_seed(0)
    inner = init_inner(rule, task, gen, params=init.expand(task.num_tasks))
    result = unroll(rule, task, inner, steps=steps, generator=gen, weights=[0.0] * (steps - 1) + [1.0],
                    meta_split=META, second_order=True)
    optimizer.zero_grad(set_to_none=True)
    result.meta_loss.backward()
    optimizer.step()
    return float(result.meta_loss.detach())


def plain_step(model: SineMLP, optimizer: torch.optim.Optimizer, task, steps: int) -> float:
    names = [n for n, _ in model.named_parameters()]
    optimizer.zero_grad(set_to_none=True)
    meta_loss = 0.0
    for b in range(task.num_tasks):
        xs, ys = task.support[0][b], task.support[1][b]
        xq, yq = task.query[0][b], task.query[1][b]
        params = dict(model.named_parameters())
        for _ in range(steps):
            loss = ((functional_call(model, params, (xs,)) - ys) ** 2).mean()
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
            params = {n: p - INNER_LR * g for n, p, g in zip(names, params.values(), grads)}
        meta_loss = meta_loss + ((functional_call(model, params, (xq,)) - yq) ** 2).mean()
    meta_loss = meta_loss / task.num_tasks
    meta_loss.backward()
    optimizer.step()
    return float(meta_loss.detach())


def speed(args: argparse.Namespace) -> dict:
    family = SineFamily(meta_batch_size=META_BATCH)
    task = family.sample(torch.Generator().manual_seed(1))
    model_lib, model_plain = SineMLP(), SineMLP()
    model_plain.load_state_dict(model_lib.state_dict())
    init = MAMLInit(model_lib)
    rule = SGD(lr=INNER_LR)
    opt_lib = torch.optim.Adam(init.parameters(), lr=META_LR)
    opt_plain = torch.optim.Adam(model_plain.parameters(), lr=META_LR)
    rows = []
    for steps in (1, 5):
        # same algorithm: the first meta-losses agree
        a, b = library_step(init, rule, opt_lib, task, steps), plain_step(model_plain, opt_plain, task, steps)
        if abs(a - b) > 1e-4 * max(1.0, abs(a)):
            raise RuntimeError(f"the two implementations disagree: {a} vs {b}")
        times = {"l2o": [], "plain": []}
        for _ in range(args.warmup):
            library_step(init, rule, opt_lib, task, steps)
            plain_step(model_plain, opt_plain, task, steps)
        for _ in range(args.repeats):
            t = time.perf_counter()
            library_step(init, rule, opt_lib, task, steps)
            times["l2o"].append(time.perf_counter() - t)
            t = time.perf_counter()
            plain_step(model_plain, opt_plain, task, steps)
            times["plain"].append(time.perf_counter() - t)
        lib, plain = statistics.median(times["l2o"]), statistics.median(times["plain"])
        rows.append({"inner_steps": steps, "l2o_ms": 1000 * lib, "plain_ms": 1000 * plain, "speedup": plain / lib})
    return {"suite": "maml-sine-speed", "meta_batch": META_BATCH, "threads": args.threads,
            "repeats": args.repeats, "l2o_version": l2o.__version__, "torch_version": str(torch.__version__),
            "device": f"cpu ({platform.processor() or platform.machine()})", "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speed", action="store_true", help="time one meta-iteration against a plain loop")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    if not args.speed:
        parser.error("choose a mode: --speed (training and evaluation run through `l2o maml`)")
    configure_cpu(args.threads)
    report = speed(args)
    print("| inner steps | plain loop | l2o | speed-up |")
    print("|---|---|---|---|")
    for r in report["rows"]:
        print(f"| {r['inner_steps']} | {r['plain_ms']:.2f} ms | {r['l2o_ms']:.2f} ms | {r['speedup']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
