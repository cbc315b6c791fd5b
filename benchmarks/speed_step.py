"""Time one ``LearnedOptimizer.step()`` on a ~1M-parameter MLP, next to ``torch.optim.Adam.step()``
and next to its floor, with every rate measured in the same run.

The floor is ``max(compute, memory)``:

* compute = the LSTM's matrix-product FLOPs per step / the GFLOP/s of a large ``torch.mm``;
* memory  = the fewest bytes a step must move / the bandwidth of a large tensor copy.

FLOPs (per coordinate per step; a multiply-add counts 2). Layer ``l`` of the stacked LSTM computes
its four gates from ``[x; h]``, a ``4H x (in_l + H)`` matrix times an ``(in_l + H)``-vector, plus the
bias; the output layer is ``1 x H``::

    flops = sum_l (2 * 4H * (in_l + H) + 4H)  +  (2H + 1)
    in_0 = F (preprocessing features: 1 for "none", 2 for "log_sign"),  in_l = H for l > 0

The paper's LSTM (H=20, L=2, F=1): 2*80*21 + 80 + 2*80*40 + 80 + 41 = 9,961 FLOPs per coordinate.
The elementwise gate math (5H sigmoids per layer via tanh(x) = 2 sigmoid(2x) - 1, about 10H other
elementwise ops per layer) is not counted: it is cheap in FLOPs but it is memory traffic through
the gate tensors, which is what the measured time shows on top of the floor.

Bytes (the minimum per coordinate per step): read the gradient, read and write the parameter, read
and write the recurrent state (2 L H numbers)::

    bytes = g + 2 p + 2 * (2 L H) * s        (g, p, s: bytes per gradient, parameter, state number)

= 4 + 8 + 640 = 652 bytes per coordinate for float32 everything and the paper's LSTM.

With ``--mlp-rule`` it also times the memory-light :class:`l2o.MLPRule` on a ~10M-parameter MLP
(ten 1000 x 1000 layers by default) next to ``torch.optim.Adam`` and ``torch.optim.AdamW``
(``foreach=True``, lr 1e-3), at each of ``--mlp-threads`` (default 1 and 2), all in the same run and
interleaved (one step of each in turn, ``--repeats`` rounds; median and minimum reported): the drop-in
``LearnedOptimizer(rule=MLPRule())``, the same with a ``max_step_ratio`` bound that holds every
tensor's step down (``bounded``) and ``MLPRule.update_`` called once on all parameters (what an
adapter calling the rule once per param group runs), with the update added to the parameters.
``--no-lstm`` skips the LSTM measurement.

Usage::

    python benchmarks/speed_step.py [--threads 1] [--repeats 15] [--json out.json]
    python benchmarks/speed_step.py --no-lstm --mlp-rule [--mlp-threads 1 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import l2o  # noqa: E402
from l2o import kernels  # noqa: E402
from l2o.rules.lstm import LSTMRule  # noqa: E402
from l2o.rules.preprocess import num_features  # noqa: E402


def median_time(fn: Callable[[], object], repeats: int, warmup: int) -> tuple[float, list[float]]:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def lstm_flops_per_coordinate(hidden: int, layers: int, features: int) -> int:
    """Matrix-product FLOPs of one LSTM step for one coordinate (formula in the module docstring)."""
    total = 0
    for layer in range(layers):
        n_in = features if layer == 0 else hidden
        total += 2 * 4 * hidden * (n_in + hidden) + 4 * hidden
    return total + 2 * hidden + 1


def min_bytes_per_coordinate(hidden: int, layers: int, grad_bytes: int = 4, param_bytes: int = 4,
                             state_bytes: int = 4) -> int:
    """Fewest bytes one step must move per coordinate (formula in the module docstring)."""
    return grad_bytes + 2 * param_bytes + 2 * (2 * layers * hidden) * state_bytes


def measure_gflops(size: int, repeats: int) -> float:
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    out = torch.empty(size, size)
    t, _ = median_time(lambda: torch.mm(a, b, out=out), repeats, warmup=2)
    return 2 * size**3 / t / 1e9


def measure_skinny_gflops(hidden: int, n: int, repeats: int) -> float:
    """GFLOP/s of the LSTM's own product shape, (4H x 2H) @ (2H x N): for reference, not the floor."""
    w = torch.randn(4 * hidden, 2 * hidden)
    x = torch.randn(2 * hidden, n)
    out = torch.empty(4 * hidden, n)
    t, _ = median_time(lambda: torch.mm(w, x, out=out), repeats, warmup=2)
    return 2 * 4 * hidden * 2 * hidden * n / t / 1e9


def measure_bandwidth(num_bytes: int, repeats: int) -> float:
    """GB/s of a large tensor copy, counting the bytes read and written."""
    src = torch.randn(num_bytes // 4)
    dst = torch.empty_like(src)
    t, _ = median_time(lambda: dst.copy_(src), repeats, warmup=2)
    return 2 * src.numel() * 4 / t / 1e9


def make_model(sizes: list[int], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Sigmoid())
    return nn.Sequential(*layers)


def set_random_grads(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-2


def profile_top_ops(step: Callable[[], object], top: int = 8) -> list[dict[str, object]]:
    """Self CPU time of the most expensive ops in two steps (where the time goes)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
        step()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    return [{"op": e.key, "calls": e.count, "self_ms_per_step": e.self_cpu_time_total / 2 / 1e3,
             "share": e.self_cpu_time_total / total} for e in rows]


def interleaved_times(fns: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds of each of ``fns``, run one after the other ``repeats`` times (after ``warmup`` rounds),
    so that every candidate sees the same machine conditions."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


#: The MLP-rule timing's contenders, in the order they are stepped and printed: ``bounded`` is the
#: drop-in with ``MLPRule(max_step_ratio=BINDING_RATIO)``, a bound every tensor's step exceeds (the
#: untrained rule steps like Adam, ratio 1), so its rescaling pass runs on every tensor.
MLP_CONTENDERS = ("adam", "adamw", "learned_optimizer", "bounded", "update_all")
BINDING_RATIO = 0.5


def measure_mlp_rule(sizes: list[int], threads: list[int], repeats: int, warmup: int, seed: int) -> dict[str, object]:
    """ms per step of ``MLPRule`` (drop-in and one call on all params) against Adam and AdamW (foreach)."""
    from l2o.rules.mlp import MLPRule

    rows = []
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        fns: dict[str, Callable[[], object]] = {}
        models = {}
        for name in MLP_CONTENDERS:
            model = make_model(sizes, seed)
            set_random_grads(model, seed + 1)
            models[name] = model
        fns["adam"] = torch.optim.Adam(models["adam"].parameters(), lr=1e-3, foreach=True).step
        fns["adamw"] = torch.optim.AdamW(models["adamw"].parameters(), lr=1e-3, foreach=True).step
        fns["learned_optimizer"] = l2o.LearnedOptimizer(models["learned_optimizer"].parameters(), rule=MLPRule()).step
        bounded = MLPRule(max_step_ratio=BINDING_RATIO)
        fns["bounded"] = l2o.LearnedOptimizer(models["bounded"].parameters(), rule=bounded).step
        rule = MLPRule().requires_grad_(False)
        named = dict(models["update_all"].named_parameters())
        params = {k: p.detach() for k, p in named.items()}
        grads = {k: p.grad for k, p in named.items()}
        state = rule.init(params)
        counter = [0]

        @torch.no_grad()
        def update_all() -> None:
            updates, _ = rule.update_(grads, state, params, step=counter[0])
            for k, u in updates.items():
                params[k].add_(u)
            counter[0] += 1

        fns["update_all"] = update_all
        times = interleaved_times(fns, repeats, warmup)
        med = {k: statistics.median(v) for k, v in times.items()}
        low = {k: min(v) for k, v in times.items()}
        rows.append({"threads": n_threads, "median_s": med, "min_s": low, "times_s": times,
                     "over_adam_median": {k: med[k] / med["adam"] for k in med},
                     "over_adam_min": {k: low[k] / low["adam"] for k in low}})
    n = sum(p.numel() for p in make_model(sizes, seed).parameters())
    state = MLPRule().init({k: p.detach() for k, p in make_model(sizes, seed).named_parameters()})
    from l2o.tree import state_leaves

    floats = sum(t.numel() for t in state_leaves(state))
    return {"sizes": sizes, "params": n, "rule": MLPRule().config(), "repeats": repeats, "warmup": warmup,
            "state_floats_per_param": floats / n, "rows": rows}


def print_mlp_rule(result: dict[str, object]) -> None:
    print(f"\nMLPRule vs Adam/AdamW (foreach), MLP {'-'.join(map(str, result['sizes']))} ({result['params']:,} params), "
          f"state {result['state_floats_per_param']:.3f} floats/param (Adam: 2), {result['repeats']} interleaved rounds")
    print(f"{'':22s}" + "".join(f"{name:>20s}" for name in MLP_CONTENDERS))
    for row in result["rows"]:
        for stat in ("median", "min"):
            cells = "".join(f"{1e3 * row[stat + '_s'][k]:12.1f} ({row['over_adam_' + stat][k]:4.2f}x)"
                            for k in MLP_CONTENDERS)
            print(f"{row['threads']} thread(s), {stat:6s} ms{cells}")


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--repeats", type=int, default=15, help="timed repetitions (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repetitions first")
    parser.add_argument("--sizes", type=int, nargs="+", default=[784, 1024, 256, 10],
                        help="MLP layer widths (default 784 1024 256 10: 1,068,810 params)")
    parser.add_argument("--hidden", type=int, default=20)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--mm-size", type=int, default=2048, help="side of the square matmul for GFLOP/s")
    parser.add_argument("--copy-mib", type=int, default=512, help="MiB copied to measure bandwidth")
    parser.add_argument("--no-profile", action="store_true", help="skip the per-op profile")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--mlp-rule", action="store_true", help="also time MLPRule against Adam and AdamW")
    parser.add_argument("--mlp-sizes", type=int, nargs="+", default=[1000] * 11,
                        help="MLP widths for the MLPRule timing (default ten 1000 x 1000 layers: 10,010,000 params)")
    parser.add_argument("--mlp-threads", type=int, nargs="+", default=[1, 2], help="thread counts for the MLPRule timing")
    parser.add_argument("--no-lstm", action="store_true", help="skip the LSTM measurement")
    args = parser.parse_args(argv)
    if args.no_lstm:
        if not args.mlp_rule:
            parser.error("--no-lstm leaves nothing to measure without --mlp-rule")
        result: dict[str, object] = {"benchmark": "speed_step"}
        result["mlp_rule"] = measure_mlp_rule(args.mlp_sizes, args.mlp_threads, args.repeats, args.warmup, args.seed)
        print_mlp_rule(result["mlp_rule"])
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2) + "\n")
            print(f"wrote {args.json}")
        return result

    torch.set_num_threads(args.threads)
    model = make_model(args.sizes, args.seed)
    n = sum(p.numel() for p in model.parameters())
    set_random_grads(model, args.seed + 1)

    rule = LSTMRule(hidden_size=args.hidden, num_layers=args.layers)
    opt = l2o.LearnedOptimizer(model.parameters(), rule=rule)
    kernel = kernels.is_available()  # builds the compiled LSTM-cell kernel now, outside the timing
    t_l2o, times_l2o = median_time(opt.step, args.repeats, args.warmup)
    t_torch_path = None
    if kernel:  # the same step on the torch path (what runs without a C compiler), for comparison
        kernels.set_enabled(False)
        t_torch_path, _ = median_time(opt.step, args.repeats, args.warmup)
        kernels.set_enabled(True)

    adam_model = make_model(args.sizes, args.seed)
    set_random_grads(adam_model, args.seed + 1)
    adam = torch.optim.Adam(adam_model.parameters(), lr=1e-3)
    t_adam, times_adam = median_time(adam.step, args.repeats, args.warmup)

    gflops = measure_gflops(args.mm_size, args.repeats)
    skinny = measure_skinny_gflops(args.hidden, n, args.repeats)
    bandwidth = measure_bandwidth(args.copy_mib << 20, args.repeats)

    features = num_features(rule.preprocess)
    flops = lstm_flops_per_coordinate(args.hidden, args.layers, features) * n
    min_bytes = min_bytes_per_coordinate(args.hidden, args.layers) * n
    t_compute = flops / (gflops * 1e9)
    t_memory = min_bytes / (bandwidth * 1e9)
    floor = max(t_compute, t_memory)
    top_ops = [] if args.no_profile else profile_top_ops(opt.step)

    result = {
        "benchmark": "speed_step",
        "params": n,
        "sizes": args.sizes,
        "rule": rule.config(),
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "learned_step_s": t_l2o,
        "learned_step_times_s": times_l2o,
        "compiled_kernel": kernel,
        "learned_step_torch_path_s": t_torch_path,
        "adam_step_s": t_adam,
        "adam_step_times_s": times_adam,
        "lstm_flops_per_step": flops,
        "min_bytes_per_step": min_bytes,
        "mm_gflops": gflops,
        "mm_size": args.mm_size,
        "skinny_mm_gflops": skinny,
        "copy_gb_per_s": bandwidth,
        "floor_compute_s": t_compute,
        "floor_memory_s": t_memory,
        "floor_s": floor,
        "floor_bound": "compute" if t_compute >= t_memory else "memory",
        "learned_over_floor": t_l2o / floor,
        "learned_over_adam": t_l2o / t_adam,
        "top_ops": top_ops,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "torch": str(torch.__version__),
                    "l2o": l2o.__version__},
    }

    ms = 1e3
    print(f"one step on an MLP {'-'.join(map(str, args.sizes))} ({n:,} params), {result['threads']} thread(s), "
          f"median of {args.repeats}")
    print(f"{'':34s}{'ms':>10s}{'x floor':>10s}")
    print(f"{'LearnedOptimizer (LSTM ' + str(args.layers) + 'x' + str(args.hidden) + ')':34s}"
          f"{t_l2o * ms:10.2f}{t_l2o / floor:10.2f}")
    if t_torch_path is not None:
        print(f"{'  same, torch path (no C kernel)':34s}{t_torch_path * ms:10.2f}{t_torch_path / floor:10.2f}")
    else:
        print("  (the compiled LSTM-cell kernel is not available here: the row above is the torch path)")
    print(f"{'torch.optim.Adam':34s}{t_adam * ms:10.2f}{t_adam / floor:10.3f}")
    print(f"{'floor, compute':34s}{t_compute * ms:10.2f}"
          f"      ({flops / 1e9:.2f} GFLOP at {gflops:.1f} GFLOP/s, large mm)")
    print(f"{'floor, memory':34s}{t_memory * ms:10.2f}"
          f"      ({min_bytes / 1e9:.3f} GB at {bandwidth:.1f} GB/s, copy)")
    print(f"LSTM/Adam = {t_l2o / t_adam:.1f}x;  LSTM/floor = {t_l2o / floor:.2f}x ({result['floor_bound']}-bound floor); "
          f"skinny (4H x 2H)@(2H x N) mm runs at {skinny:.1f} GFLOP/s")
    if top_ops:
        print("where the learned step's time goes (self CPU time per step):")
        for row in top_ops:
            print(f"  {row['op']:38s}{row['self_ms_per_step']:10.2f} ms  {100 * row['share']:5.1f}%  ({row['calls']} calls)")
    if args.mlp_rule:
        result["mlp_rule"] = measure_mlp_rule(args.mlp_sizes, args.mlp_threads, args.repeats, args.warmup, args.seed)
        print_mlp_rule(result["mlp_rule"])
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
