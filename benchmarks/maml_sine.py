"""MAML on sine regression (Finn et al. 2017, §5.1): speed of one meta-iteration, and the
comparison of MAML, Meta-SGD and a learned initialisation + learned LSTM optimizer.

``--compare`` meta-trains each algorithm with ``l2o maml`` for the same number of meta-iterations
(K = 10 support points, meta-batch 25, one inner step during meta-training, second order), adds the
paper's baseline (one network pretrained on all tasks jointly, then fine-tuned with SGD at the
best of a few learning rates), and evaluates all of them on the same 600 held-out tasks after
0..10 adaptation steps; it writes JSON, a figure and a table.

    python benchmarks/maml_sine.py --compare --iterations 2000 --out-dir benchmarks/results

``--speed`` times one second-order meta-iteration (meta-batch 25, K = 10 support and 10 query
points, the 1-40-40-1 ReLU network written as a plain ``nn.Sequential``, inner SGD lr 0.01, Adam
meta-step) with 1 and with 5 inner steps, for every way of writing it, in one process and
interleaved (each repeat runs every implementation once, in turn), after warm-up:

* ``plain``: a Python loop over the 25 tasks, each adapted with
  ``torch.autograd.grad(create_graph=True)`` (how learn2learn and higher work);
* ``func`` / ``func+compile``: ``torch.func.vmap`` over the tasks of ``grad`` steps, eager and
  under ``torch.compile``;
* ``func expanded`` / ``func expanded+compile``: the same with θ0 handed to ``vmap`` as
  per-task copies (``expand``) rather than shared, the form of every batched engine that takes the
  gradient of the summed loss of ``(B, *shape)`` params (l2o's);
* ``l2o batched`` / ``l2o batched+compile``: ``l2o.MAML(model).adapt_batch`` + ``forward_batch``
  on the user's module (``vmap`` over ``functional_call``), eager and with ``compile=True``;
* ``l2o query`` / ``l2o query+compile``: ``MAML.query_loss_batch``: the adaptation and the query
  loss in one engine call (with ``compile``, one compiled graph);
* ``l2o per task`` / ``l2o per task+compile``: ``MAML.adapt`` + ``forward`` in a Python loop over
  the tasks;
* ``l2o task`` / ``l2o task+compile``: the engine on the task-specific batched task
  (``optimizees.sine.SineTask``, whose loss runs ``SineMLP.forward_batched``, one ``baddbmm`` per
  layer): what ``l2o maml --task sine`` runs.

Before timing, every implementation's meta-gradient at the same θ0 is compared with
``func+compile``'s (max abs difference). Peak memory is the largest amount of CPU memory allocated
during one meta-iteration above what was allocated at its start (torch profiler memory events).

    python benchmarks/maml_sine.py --speed --json benchmarks/results/maml_sine_speed.json

``--speed --omniglot`` does the same for the MAML paper's Omniglot convnet
(``optimizees.convnet.ConvNet`` as a module, 5-way 1-shot, 5 query images per class, meta-batch 8,
random images, inner lr 0.4), where ``l2o task`` is ``optimizees.omniglot.OmniglotTask`` (grouped
convolutions over the episodes: what ``l2o maml --task omniglot`` runs); ``--first-order`` times
first-order MAML instead.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.func import functional_call

import l2o
from l2o.perf import configure_cpu
from l2o.tasks import META
from l2o.unroll import init_inner, unroll
from optimizees.sine import SineFamily, SineMLP, SineTask

META_BATCH, INNER_LR, META_LR = 25, 0.01, 1e-3


def _sine_model() -> torch.nn.Module:
    """The paper's regressor as a user writes it (no task-specific code)."""
    return torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.ReLU(), torch.nn.Linear(40, 40), torch.nn.ReLU(),
                               torch.nn.Linear(40, 1))


def _mse(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((pred - y) ** 2).mean()


def _cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits, y)


class Problem:
    """One benchmark setting: the module, its loss, a meta-batch ``(sx, sy, qx, qy)`` with a leading
    task dimension, the inner learning rate, and (optionally) the task-specific l2o task."""

    def __init__(self, name: str, model: torch.nn.Module, loss_fn, data, inner_lr: float, first_order: bool,
                 task_specific=None) -> None:
        self.name, self.model, self.loss_fn, self.data = name, model, loss_fn, data
        self.inner_lr, self.first_order, self.task_specific = inner_lr, first_order, task_specific


def sine_problem(first_order: bool = False) -> Problem:
    torch.manual_seed(0)
    family = SineFamily(meta_batch_size=META_BATCH)
    task = family.sample(torch.Generator().manual_seed(1))
    model = _sine_model()
    data = (task.support[0], task.support[1], task.query[0], task.query[1])
    sine_model = SineMLP()

    def specific(model: torch.nn.Module):
        # SineMLP's params are named net.{i}.*; the Sequential's {i}.*: the same tensors, renamed
        return SineTask(sine_model, task.support, task.query, task.amplitude, task.phase), "net."

    return Problem("sine", model, _mse, data, INNER_LR, first_order, specific)


def omniglot_problem(first_order: bool = False) -> Problem:
    from optimizees.convnet import ConvNet
    from optimizees.omniglot import EpisodeBatch, OmniglotTask

    torch.manual_seed(0)
    ways, shots, query, batch = 5, 1, 5, 8
    g = torch.Generator().manual_seed(1)
    sx = torch.rand(batch, ways * shots, 1, 28, 28, generator=g)
    sy = torch.arange(ways).repeat_interleave(shots).expand(batch, -1).contiguous()
    qx = torch.rand(batch, ways * query, 1, 28, 28, generator=g)
    qy = torch.arange(ways).repeat_interleave(query).expand(batch, -1).contiguous()
    model = ConvNet(ways)
    model.reset_parameters(torch.Generator().manual_seed(0))
    with torch.no_grad():  # the recipe's --zero-last-layer
        model.classifier.weight.zero_()

    def specific(model: torch.nn.Module):
        return OmniglotTask(EpisodeBatch(sx, sy), EpisodeBatch(qx, qy), ConvNet(ways)), ""

    return Problem("omniglot", model, _cross_entropy, (sx, sy, qx, qy), 0.4, first_order, specific)


def _func_loss(problem: Problem, model: torch.nn.Module, steps: int, batched_init: bool = False):
    """The torch.func meta-loss: vmap over the tasks of ``steps`` grad steps, then the query loss.
    ``batched_init``: θ0 enters ``vmap`` as per-task copies (``expand``, ``in_dims=0``), as in any
    engine that differentiates the summed loss of batched params, instead of shared (``in_dims=None``)."""
    from torch.func import grad, vmap

    lr, loss_fn, fo = problem.inner_lr, problem.loss_fn, problem.first_order

    def one(params, xs, ys, xq, yq):
        for _ in range(steps):
            g = grad(lambda p: loss_fn(functional_call(model, p, (xs,)), ys))(params)
            params = {k: params[k] - lr * (g[k].detach() if fo else g[k]) for k in params}
        return loss_fn(functional_call(model, params, (xq,)), yq)

    def meta_loss(params, sx, sy, qx, qy):
        if batched_init:
            params = {k: v.expand(sx.shape[0], *v.shape) for k, v in params.items()}
        dims = (0 if batched_init else None, 0, 0, 0, 0)
        return vmap(one, in_dims=dims, randomness="different")(params, sx, sy, qx, qy).mean()

    return meta_loss


class Impl:
    """One implementation: ``step()`` runs a meta-iteration (zero_grad, meta-loss, backward, Adam
    step) on its own copy of the model; ``gradient()`` the meta-gradient at the current θ0."""

    def __init__(self, name: str, problem: Problem, steps: int, state: dict) -> None:
        self.name, self.problem, self.steps = name, problem, steps
        self.model = copy.deepcopy(problem.model)
        self.model.load_state_dict(state)
        self.names = [n for n, _ in self.model.named_parameters()]
        self.compiled = name.endswith("+compile")
        self.maml = l2o.MAML(self.model, inner_lr=problem.inner_lr, inner_steps=steps,
                             first_order=problem.first_order, compile=self.compiled)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=META_LR)
        base = name.removesuffix("+compile")
        if base in ("func", "func expanded"):
            fn = _func_loss(problem, self.model, steps, batched_init=base != "func")
            self.func = torch.compile(fn) if self.compiled else fn
        if base == "l2o task":
            self.task, self.prefix = problem.task_specific(self.model)
        self.loss = getattr(self, "_" + base.replace(" ", "_"))

    def meta_loss(self) -> torch.Tensor:
        return self.loss(*self.problem.data)

    def _plain(self, sx, sy, qx, qy):
        lr, loss_fn, fo = self.problem.inner_lr, self.problem.loss_fn, self.problem.first_order
        total = 0.0
        for b in range(sx.shape[0]):
            params = dict(self.model.named_parameters())
            for _ in range(self.steps):
                loss = loss_fn(functional_call(self.model, params, (sx[b],)), sy[b])
                grads = torch.autograd.grad(loss, list(params.values()), create_graph=not fo)
                params = {n: p - lr * g for n, p, g in zip(self.names, params.values(), grads)}
            total = total + loss_fn(functional_call(self.model, params, (qx[b],)), qy[b])
        return total / sx.shape[0]

    def _func(self, sx, sy, qx, qy):
        return self.func(dict(self.model.named_parameters()), sx, sy, qx, qy)

    _func_expanded = _func

    def _l2o_batched(self, sx, sy, qx, qy):
        params = self.maml.adapt_batch(self.problem.loss_fn, sx, sy)
        pred = self.maml.forward_batch(params, qx)
        return torch.stack([self.problem.loss_fn(pred[b], qy[b]) for b in range(qx.shape[0])]).mean() \
            if self.problem.name == "omniglot" else ((pred - qy) ** 2).mean((1, 2)).mean()

    def _l2o_query(self, sx, sy, qx, qy):
        return self.maml.query_loss_batch(self.problem.loss_fn, sx, sy, qx, qy)

    def _l2o_per_task(self, sx, sy, qx, qy):
        total = 0.0
        for b in range(sx.shape[0]):
            params = self.maml.adapt(self.problem.loss_fn, sx[b], sy[b])
            total = total + self.problem.loss_fn(self.maml(params, qx[b]), qy[b])
        return total / sx.shape[0]

    def _l2o_task(self, sx, sy, qx, qy):
        task, prefix, k = self.task, self.prefix, self.steps
        theta = {prefix + n: p.expand(task.num_tasks, *p.shape) for n, p in self.model.named_parameters()}
        gen = torch.Generator().manual_seed(0)
        inner = init_inner(self.maml.rule, task, gen, params=theta)
        result = unroll(self.maml.rule, task, inner, steps=k, generator=gen, weights=[0.0] * (k - 1) + [1.0],
                        meta_split=META, second_order=not self.problem.first_order, compile=self.compiled)
        return result.meta_loss

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.meta_loss().backward()
        self.optimizer.step()

    def gradient(self) -> list[torch.Tensor]:
        loss = self.meta_loss()
        return list(torch.autograd.grad(loss, list(self.model.parameters())))


IMPLEMENTATIONS = ("plain", "func", "func+compile", "func expanded", "func expanded+compile", "l2o batched",
                   "l2o batched+compile", "l2o query", "l2o query+compile", "l2o per task", "l2o per task+compile",
                   "l2o task", "l2o task+compile")


def peak_memory_mb(fn) -> float:
    """Peak CPU memory allocated while ``fn()`` runs, above what was allocated at its start (MB),
    from the torch profiler's memory events."""
    import os
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        events = json.loads(Path(path).read_text())["traceEvents"]
    mem = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    if not mem:
        return 0.0
    base = mem[0]["args"]["Total Allocated"] - mem[0]["args"]["Bytes"]
    return max(e["args"]["Total Allocated"] - base for e in mem) / 1e6


def speed(args: argparse.Namespace) -> dict:
    problem = omniglot_problem(args.first_order) if args.omniglot else sine_problem(args.first_order)
    names = IMPLEMENTATIONS if args.impls is None else tuple(args.impls.split(","))
    unknown = set(names) - set(IMPLEMENTATIONS)
    if unknown:
        raise SystemExit(f"unknown --impls {sorted(unknown)}; choose from {', '.join(IMPLEMENTATIONS)}")
    reference = "func+compile" if "func+compile" in names else names[0]
    state = copy.deepcopy(problem.model.state_dict())
    rows = []
    for steps in args.steps:
        impls = [Impl(n, problem, steps, state) for n in names]
        compile_s, grads = {}, {}
        for impl in impls:  # first call compiles; the meta-gradients at the same θ0 are compared
            t = time.perf_counter()
            grads[impl.name] = impl.gradient()
            compile_s[impl.name] = time.perf_counter() - t
        ref = grads[reference]
        diff = {n: max(float((a - b).abs().max()) for a, b in zip(g, ref)) for n, g in grads.items()}
        times = {impl.name: [] for impl in impls}
        for _ in range(args.warmup):
            for impl in impls:
                impl.step()
        for r in range(args.repeats):
            order = impls[r % len(impls):] + impls[:r % len(impls)]  # interleaved, rotating who goes first
            for impl in order:
                t = time.perf_counter()
                impl.step()
                times[impl.name].append(time.perf_counter() - t)
        ms = {n: 1000 * statistics.median(v) for n, v in times.items()}
        peak = {impl.name: peak_memory_mb(impl.step) for impl in impls}
        row = {"inner_steps": steps, "ms": ms, "peak_mb": peak, "grad_max_abs_diff": diff, "reference": reference,
               "first_call_s": compile_s, "ratio_to_reference": {n: ms[n] / ms[reference] for n in ms},
               "peak_ratio_to_reference": {n: peak[n] / peak[reference] if peak[reference] else None for n in peak}}
        if "plain" in ms and "l2o task" in ms:  # the keys benchmarks/run.py reads
            row.update(l2o_ms=ms["l2o task"], plain_ms=ms["plain"], speedup=ms["plain"] / ms["l2o task"])
        rows.append(row)
    return {"suite": f"maml-{problem.name}-speed", "problem": problem.name,
            "meta_batch": problem.data[0].shape[0], "first_order": problem.first_order, "threads": args.threads,
            "repeats": args.repeats, "warmup": args.warmup, "l2o_version": l2o.__version__,
            "torch_version": str(torch.__version__), "device": f"cpu ({platform.processor() or platform.machine()})",
            "rows": rows}


def print_speed(report: dict) -> None:
    ref = report["rows"][0]["reference"]
    print(f"{report['problem']}, meta-batch {report['meta_batch']}, "
          f"{'first' if report['first_order'] else 'second'} order, {report['threads']} thread(s), "
          f"median of {report['repeats']} interleaved repeats; ratios to {ref}")
    print("| implementation | inner steps | ms / meta-iteration | ratio | peak MB | peak ratio | max abs grad diff | first call |")
    print("|---|---|---|---|---|---|---|---|")
    for row in report["rows"]:
        for n, ms in row["ms"].items():
            pr = row["peak_ratio_to_reference"][n]
            print(f"| {n} | {row['inner_steps']} | {ms:.2f} | {row['ratio_to_reference'][n]:.2f}x | "
                  f"{row['peak_mb'][n]:.2f} | {'-' if pr is None else f'{pr:.2f}x'} | "
                  f"{row['grad_max_abs_diff'][n]:.1e} | {row['first_call_s'][n]:.1f} s |")


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
    parser.add_argument("--speed", action="store_true", help="time one meta-iteration, every implementation, interleaved")
    parser.add_argument("--omniglot", action="store_true", help="--speed: the Omniglot convnet instead of sine")
    parser.add_argument("--first-order", action="store_true", help="--speed: first-order MAML")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5], help="--speed: inner steps (default 1 5)")
    parser.add_argument("--impls", default=None, help=f"--speed: comma-separated subset of {', '.join(IMPLEMENTATIONS)}")
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
    print_speed(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
