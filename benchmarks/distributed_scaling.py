"""Distributed meta-training: meta-steps per second on 1 and 2 processes of this machine.

Strong scaling at a fixed global meta-batch: every run meta-trains with ``tasks_per_step = T``
(default 2) tasks per meta-step. One process runs all ``T`` tasks of each meta-step itself
(``meta_train(..., distributed=False)``); ``W`` processes launched by ``torchrun`` (gloo, one
intra-op thread per rank unless ``--threads`` says otherwise) run ``T / W`` each and all-reduce the
meta-gradients (``distributed=True``). Both compute the same meta-steps (the tests prove it), so
the ratio of meta-steps per second is the speed-up.

Cases:

* ``quadratic``: the paper's setup: 128 10-d quadratics per task, LSTM 2×20, horizon 100,
  truncation 20, first order (one meta-step = 20 inner steps of every task);
* ``sine-maml``: MAML on sine regression, one task = a meta-batch of 25 sine waves, K = 1 second-order
  SGD step (one meta-step = one meta-iteration).

Each rank also times a bare ``all_reduce`` of a buffer the size of the meta-gradient (the
collective's latency on this machine), and the runs record their wall-clock, so the JSON shows
where the time goes. Warm-up: one short ``meta_train`` call before the timed ones; the timed calls
are repeated and the median reported.

    python benchmarks/distributed_scaling.py --json benchmarks/results/distributed_scaling.json
    python benchmarks/distributed_scaling.py --fast        # a smoke run (a few meta-steps; numbers meaningless)

Run it alone: other processes on the machine's 2 cores distort a 2-process measurement far more
than a 1-process one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = ("quadratic", "sine-maml")


def _build(case: str):
    """(rule, family, config kwargs, init) of a case."""
    import torch

    from l2o import LSTMRule
    from l2o.maml import MAMLInit
    from l2o.rules import SGD
    from l2o.tasks import META

    torch.manual_seed(0)
    if case == "quadratic":
        from optimizees.quadratic import QuadraticFamily

        return LSTMRule(), QuadraticFamily(), dict(horizon=100, truncation=20), None
    from optimizees.sine import SineFamily

    family = SineFamily(meta_batch_size=25)
    init = MAMLInit(family.model())
    return SGD(lr=0.01), family, dict(horizon=1, truncation=1, meta_lr=1e-3, meta_lr_final=None, max_grad_norm=10.0,
                                      second_order=True, step_weights="final", meta_split=META), init


def worker(args: argparse.Namespace) -> None:
    """One rank (or the single process): warm up, time ``args.repeats`` runs, rank 0 writes JSON."""
    import torch

    from l2o.meta import MetaTrainConfig, meta_train
    from l2o.perf import configure_cpu

    cpu = configure_cpu(args.threads)
    distributed = "WORLD_SIZE" in os.environ
    rank, world = 0, 1
    if distributed:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    rule, family, kw, init = _build(args.case)
    meta_params = [p for m in (rule, init) if m is not None for p in m.parameters()]
    segments = -(-kw["horizon"] // kw["truncation"])

    def run(epochs: int) -> tuple[float, int]:
        config = MetaTrainConfig(epochs=epochs, validate_every=0, seed=0, tasks_per_step=args.tasks_per_step, **kw)
        if distributed:
            dist.barrier()
        start = time.perf_counter()
        result = meta_train(rule, family, config, progress=False, init=init, distributed=distributed)
        return time.perf_counter() - start, result.meta_steps

    run(1)  # warm-up
    times = []
    for _ in range(args.repeats):
        seconds, steps = run(args.epochs)
        times.append(seconds / steps)
    reduce_ms = None
    if distributed:  # the bare collective: the flat meta-gradient buffer, float64, as the trainer sends it
        buffer = torch.zeros(sum(p.numel() for p in meta_params) + 2, dtype=torch.float64)
        for _ in range(10):
            dist.all_reduce(buffer)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(200):
            dist.all_reduce(buffer)
        reduce_ms = (time.perf_counter() - start) / 200 * 1e3
    if rank == 0:
        step = statistics.median(times)
        out = {"case": args.case, "processes": world, "tasks_per_step": args.tasks_per_step,
               "threads_per_rank": torch.get_num_threads(), "meta_steps_per_run": args.epochs * segments,
               "repeats": args.repeats, "ms_per_meta_step": step * 1e3, "meta_steps_per_s": 1.0 / step,
               "tasks_per_s": args.tasks_per_step / step, "ms_per_meta_step_all": [t * 1e3 for t in times],
               "all_reduce_ms": reduce_ms, "meta_params": sum(p.numel() for p in meta_params), "cpu": cpu}
        Path(args.result).write_text(json.dumps(out, indent=1))
    if distributed:
        from l2o.meta.distributed import end_distributed_process

        dist.destroy_process_group()
        end_distributed_process(0)  # skip interpreter finalisation (a gloo teardown race aborts it)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(case: str, processes: int, args: argparse.Namespace, result: Path) -> dict:
    script = [str(Path(__file__).resolve()), "--worker", "--case", case, "--tasks-per-step", str(args.tasks_per_step),
              "--epochs", str(args.epochs_for[case]), "--repeats", str(args.repeats), "--threads", str(args.threads),
              "--result", str(result)]
    if processes == 1:
        command = [sys.executable, *script]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *script]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    out = json.loads(result.read_text())
    out["wall_s"] = time.perf_counter() - start
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated: {', '.join(CASES)}")
    p.add_argument("--processes", default="1,2", help="process counts to measure (default 1,2)")
    p.add_argument("--tasks-per-step", type=int, default=2, help="the global meta-batch T (default 2)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per rank (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median; default 3)")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs per timed run (default: quadratic 6 = 30 meta-steps, sine-maml 200)")
    p.add_argument("--fast", action="store_true", help="a smoke run: 1 repeat of a few meta-steps")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.fast:
        args.repeats = 1
    default_epochs = {"quadratic": 1 if args.fast else 6, "sine-maml": 10 if args.fast else 200}
    args.epochs_for = {c: args.epochs or default_epochs[c] for c in CASES}
    import torch

    report = {"benchmark": "distributed_scaling", "fast": args.fast, "tasks_per_step": args.tasks_per_step,
              "threads_per_rank": args.threads, "torch_version": str(torch.__version__),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor()},
              "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "cases": {}}
    rows = [("case", "processes", "ms / meta-step", "meta-steps / s", "speed-up", "all-reduce ms")]
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases.split(","):
            runs = {}
            for n in (int(v) for v in args.processes.split(",")):
                runs[n] = launch(case, n, args, Path(tmp) / f"{case}-{n}.json")
                base = runs[min(runs)]
                speedup = runs[n]["meta_steps_per_s"] / base["meta_steps_per_s"]
                runs[n]["speedup_vs_fewest"] = speedup
                reduce = "-" if runs[n]["all_reduce_ms"] is None else f"{runs[n]['all_reduce_ms']:.3f}"
                rows.append((case, str(n), f"{runs[n]['ms_per_meta_step']:.1f}", f"{runs[n]['meta_steps_per_s']:.2f}",
                             f"{speedup:.2f}x", reduce))
                print("  ".join(rows[-1]), flush=True)
            report["cases"][case] = {str(n): r for n, r in runs.items()}
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print("\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
