"""MAML on sine regression (Finn et al. 2017, §5.1): speed of one meta-iteration, and the
comparison of MAML, Meta-SGD and a learned initialisation + learned LSTM optimizer.

``--compare`` meta-trains each algorithm with ``l2o maml`` for the same number of meta-iterations
(K = 10 support points, meta-batch 25, one inner step during meta-training, second order), adds the
paper's baseline (one network pretrained on all tasks jointly, then fine-tuned with SGD at the
best of a few learning rates), and evaluates all of them on the same 600 held-out tasks after
0..10 adaptation steps; it writes JSON, a figure and a table.

    python benchmarks/maml_sine.py --compare --iterations 2000 --out-dir benchmarks/results

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
from pathlib import Path

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


def plot_compare(result: dict, path: Path) -> None:
    """Query MSE vs adaptation steps for every algorithm of a ``--compare`` result (y clipped at 10:
    an algorithm that diverges beyond the steps it was meta-trained for leaves the plot there)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for row in result["rows"]:
        c = row["eval"]["loss_mean"]
        ax.plot(range(len(c)), c, marker="o", ms=3, label=row["algorithm"])
    ax.set_yscale("log")
    ax.set_ylim(0.1, 10)
    ax.set_xlabel("adaptation steps (K = 10 support points)")
    ax.set_ylabel("query MSE, 600 held-out tasks")
    ax.set_title(f"sine regression after {result['iterations']} meta-iterations")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare_algorithms(args: argparse.Namespace) -> None:
    from l2o.cli import main as l2o_main
    from optimizees.sine import fine_tune_curve, pretrain_jointly

    args.out_dir.mkdir(parents=True, exist_ok=True)
    curves: dict[str, list[float]] = {}
    rows = []
    for rule in args.algorithms.split(","):
        js = args.out_dir / f"maml_sine_{rule}_{args.iterations}.json"
        code = l2o_main(["maml", "--task", "sine", "--inner-rule", rule, "--iterations", str(args.iterations),
                         "--out", str(args.out_dir / f"maml_sine_{rule}.pt"), "--json", str(js), "--no-progress",
                         "--threads", str(args.threads)])
        if code != 0:
            raise SystemExit(f"l2o maml --inner-rule {rule} failed with exit code {code}")
        report = json.loads(js.read_text())
        (args.out_dir / f"maml_sine_{rule}.pt").unlink()  # checkpoints are not results
        js.unlink()  # its numbers are kept in the combined JSON below
        curves[report["algorithm"]] = report["eval"]["loss_mean"]
        rows.append({"algorithm": report["algorithm"], "seconds": report["seconds"], "eval": report["eval"]})
    family = SineFamily()
    start = time.perf_counter()
    theta = pretrain_jointly(family, args.iterations, torch.Generator().manual_seed(0))
    held_out = family.evaluation_tasks(num_tasks=600)
    best = None
    for lr in (0.001, 0.003, 0.01, 0.03, 0.1):  # the paper tunes the fine-tuning step size
        curve = fine_tune_curve(held_out, theta, lr=lr, steps=10)
        if best is None or float(curve[-1].mean()) < float(best[1][-1].mean()):
            best = (lr, curve)
    lr, curve = best
    name = f"pretrained on all tasks, fine-tuned (SGD lr {lr:g})"
    curves[name] = [float(v) for v in curve.mean(1)]
    rows.append({"algorithm": name, "seconds": round(time.perf_counter() - start, 1),
                 "eval": {"loss_mean": curves[name], "loss_std": [float(v) for v in curve.std(1)]}})
    result = {"suite": "maml-sine-compare", "iterations": args.iterations, "meta_batch": META_BATCH, "shots": 10,
              "l2o_version": l2o.__version__, "torch_version": str(torch.__version__),
              "device": f"cpu ({platform.processor() or platform.machine()}), {args.threads} thread(s)", "rows": rows}
    (args.out_dir / f"maml_sine_compare_{args.iterations}.json").write_text(json.dumps(result, indent=1))

    plot_compare(result, args.out_dir / f"maml_sine_compare_{args.iterations}.png")
    print("| algorithm | MSE after 0 steps | after 1 step | after 10 steps | meta-training time |")
    print("|---|---|---|---|---|")
    for r in rows:
        m, sd = r["eval"]["loss_mean"], r["eval"]["loss_std"]
        print(f"| {r['algorithm']} | {m[0]:.3f} | {m[1]:.3f} ± {sd[1]:.3f} | {m[10]:.3f} | {r['seconds']:.0f} s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speed", action="store_true", help="time one meta-iteration against a plain loop")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--compare", action="store_true", help="MAML vs Meta-SGD vs init+LSTM vs pretrained")
    parser.add_argument("--iterations", type=int, default=2000, help="--compare: meta-iterations per algorithm")
    parser.add_argument("--algorithms", default="sgd,metasgd,lstm", help="--compare: inner rules to run")
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    if not (args.speed or args.compare):
        parser.error("choose a mode: --speed or --compare")
    configure_cpu(args.threads)
    if args.compare:
        compare_algorithms(args)
        return
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
