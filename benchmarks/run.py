"""Run a named benchmark suite and append its results as JSON Lines rows, with figures.

    python benchmarks/run.py --suite quadratic            # meta-train, then compare at 100 and 200 steps
    python benchmarks/run.py --suite mnist                # meta-train on MNIST, then the generalisation study
    python benchmarks/run.py --suite maml-sine            # MAML, first-order MAML, Meta-SGD; speed vs a plain loop
    python benchmarks/run.py --suite maml-omniglot        # 5-way 1-shot MAML (slow on a CPU; --device cuda)
    python benchmarks/run.py --suite speed                # meta-training epoch, optimizer step, MAML iteration
    python benchmarks/run.py --suite generalist           # held-out models trained through torch.optim (3 seeds)
    python benchmarks/run.py --suite quadratic --fast     # everything shrunk: a smoke test in seconds

The suite drives the existing pieces in subprocesses and never re-implements them: the ``l2o``
commands (``meta-train``, ``compare``, ``maml``, each with ``--json``) and the scripts next to this
one (``mnist_generalisation.py``, ``speed_meta_train.py``, ``speed_step.py``, ``maml_sine.py
--speed``, ``generalist.py``). Every measurement becomes one row appended to ``<out-dir>/<suite>.jsonl``::

    {"suite", "name", "fast", "config", "seed", "l2o_version", "torch_version", "device", "threads",
     "machine", "git", "time", "wall_s", "metrics", "command", "files"}

(``seed`` is the meta-training seed, null where nothing is meta-trained; non-finite numbers are
written as null). Figures and the commands' own JSON go to ``<out-dir>/<suite>/``, checkpoints to
``--runs-dir``. Baselines are always lr-tuned by ``l2o compare`` on tuning tasks separate from the
held-out tasks; with several ``--seeds`` a further row aggregates mean ± std over the seeds.

Exit codes: 0 success, 2 bad usage (unknown suite, missing data, CUDA unavailable), 1 a step failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
_LAST = object()  # Runner.add's default command: the last one run
BENCH = REPO / "benchmarks"
#: ``maml_sine.py --speed --impls`` in fast mode: the eager implementations (the compiled ones take minutes to compile).
FAST_MAML_IMPLS = "plain,func,func expanded,l2o task,l2o batched,l2o per task"

SUITES = ("quadratic", "mnist", "maml-sine", "maml-omniglot", "speed", "generalist")
#: Seeds of ``l2o compare``'s tuning tasks (its held-out tasks use this + 10000), as in the README tables.
COMPARE_SEED = 10_000


class SuiteError(RuntimeError):
    """A step of a suite failed (exit code 1)."""


class UsageError(ValueError):
    """Bad input to this script (exit code 2)."""


def _clean(value: Any) -> Any:
    """``value`` with non-finite floats replaced by None (strict JSON) and paths as strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _git_version() -> str | None:
    """The repository's commit (``+dirty`` with uncommitted changes), or None outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


class Runner:
    """Runs one suite's commands and appends its rows.

    Args:
        args: the parsed command line of this script.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        import l2o

        self.args = args
        self.suite: str = args.suite
        self.fast: bool = args.fast
        self.out_dir: Path = args.out_dir.resolve()
        self.art: Path = self.out_dir / self.suite
        self.runs: Path = args.runs_dir.resolve() / self.suite
        self.jsonl: Path = self.out_dir / f"{self.suite}.jsonl"
        self.rows: list[dict[str, Any]] = []
        self.figures: list[Path] = []
        self.last_command: str | None = None
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        if args.device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise UsageError(f"--device {args.device}: CUDA is not available; use --device cpu")
            self.device = f"{args.device} ({torch.cuda.get_device_name(torch.device(args.device))})"
        else:
            self.device = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
        self.common = {"l2o_version": l2o.__version__, "torch_version": str(torch.__version__),
                       "device": self.device, "threads": args.threads,
                       "machine": {"platform": platform.platform(), "python": platform.python_version()},
                       "git": _git_version()}

    # -- running ----------------------------------------------------------------------------------------------
    def run(self, cmd: list[str]) -> float:
        """Run ``cmd`` in the repository root; its wall time in seconds. Raises :class:`SuiteError` on failure."""
        shown = shlex.join([c if c != sys.executable else "python" for c in cmd])
        print(f"$ {shown}", flush=True)
        self.art.mkdir(parents=True, exist_ok=True)  # (only once a command runs: a usage error leaves nothing)
        self.runs.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=self.env)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SuiteError(f"`{shown}` exited with code {proc.returncode}")
        self.last_command = shown
        return wall

    def l2o(self, *argv: Any) -> float:
        """Run an ``l2o`` command (``python -m l2o``) with ``--threads`` and, unless ``--progress``, ``--no-progress``."""
        extra = [] if self.args.progress else ["--no-progress"]
        return self.run([sys.executable, "-m", "l2o", *map(str, argv), "--threads", str(self.args.threads), *extra])

    def script(self, name: str, *argv: Any) -> float:
        """Run one of the benchmark scripts next to this one."""
        return self.run([sys.executable, str(BENCH / name), *map(str, argv)])

    def add(self, name: str, *, config: dict[str, Any], seed: Any, wall_s: float, metrics: dict[str, Any],
            files: list[Path] = (), command: Any = _LAST) -> dict[str, Any]:
        """Append one row to the suite's JSON Lines file (right away: a later failure keeps it).
        ``command`` defaults to the last command run (None for rows computed from other rows)."""
        row = {"suite": self.suite, "name": name, "fast": self.fast, "config": config, "seed": seed, **self.common,
               "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "wall_s": round(wall_s, 3), "metrics": metrics,
               "command": self.last_command if command is _LAST else command,
               "files": [self._rel(f) for f in files]}
        row = _clean(row)
        self.jsonl.parent.mkdir(parents=True, exist_ok=True)
        with self.jsonl.open("a") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")
        self.rows.append(row)
        return row

    def figure(self, path: Path) -> Path:
        """Record a figure written by the suite (listed at the end)."""
        self.figures.append(path)
        return path

    @staticmethod
    def _rel(path: Path) -> str:
        path = Path(path).resolve()
        try:
            return str(path.relative_to(REPO))
        except ValueError:
            return str(path)

    def data_dir(self, *need: str) -> Path:
        """The data directory (``--data``, ``$L2O_DATA``, or ``../shared/data``) holding each of ``need``
        (alternatives separated by ``|``); a :class:`UsageError` naming what is missing."""
        if self.args.data:
            candidates = [self.args.data]
        elif os.environ.get("L2O_DATA"):
            candidates = [Path(os.environ["L2O_DATA"])]
        else:
            candidates = [REPO.parent / "shared" / "data"]
        for d in candidates:
            if all(any((d / alt).exists() for alt in item.split("|")) for item in need):
                return d.resolve()
        wanted = ", ".join(item.replace("|", " or ") for item in need)
        raise UsageError(f"the {self.suite} suite needs {wanted} under a data directory; none found in "
                         f"{', '.join(map(str, candidates))} (give --data DIR or set L2O_DATA)")


# -- functions shared by the suites ---------------------------------------------------------------------------------

def _compare_metrics(report: dict[str, Any]) -> dict[str, Any]:
    adam = report["results"].get("adam", {}).get("final_loss_mean")
    return {name: {"lr": r["lr"], "final_loss_mean": r["final_loss_mean"], "final_loss_std": r["final_loss_std"],
                   "vs_adam": r["final_loss_mean"] / adam if adam else None, "curve": r["curve"]}
            for name, r in report["results"].items()}


def _over_seeds(per_seed: list[dict[str, Any]], key: str = "final_loss_mean") -> dict[str, Any]:
    """Per rule: mean and std over seeds of each seed's ``key`` and of its ratio to Adam."""
    out = {}
    for name in per_seed[0]:
        values = [m[name][key] for m in per_seed if m[name].get(key) is not None]
        ratios = [m[name]["vs_adam"] for m in per_seed if m[name].get("vs_adam") is not None]
        out[name] = {f"{key}_over_seeds": statistics.fmean(values) if values else None,
                     f"{key}_std_over_seeds": statistics.stdev(values) if len(values) > 1 else 0.0,
                     "vs_adam_over_seeds": statistics.fmean(ratios) if ratios else None,
                     "seeds": len(values)}
    return out


def _meta_train(r: Runner, task: str, seed: int, extra: list[str]) -> Path:
    """``l2o meta-train`` (or ``--rule``) for one seed; appends its row and returns the checkpoint."""
    if r.args.rule is not None:
        return r.args.rule.resolve()
    ckpt, js, png = r.runs / f"{task}_s{seed}.pt", r.art / f"meta_train_s{seed}.json", r.art / f"meta_train_s{seed}.png"
    wall = r.l2o("meta-train", "--task", task, "--out", ckpt, "--seed", seed, "--device", r.args.device,
                 "--json", js, "--plot", r.figure(png), *extra)
    rep = json.loads(js.read_text())
    r.add("meta-train", seed=seed, wall_s=wall, files=[ckpt, js, png],
          config={"task": task, "train_config": rep["train_config"], "task_config": rep["task_config"]},
          metrics={k: rep.get(k) for k in ("meta_steps", "skipped_steps", "best_epoch", "best_val_loss", "seconds")})
    return ckpt


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _fmt(value: Any, spec: str = ".4g") -> str:
    return "–" if value is None else format(value, spec)


# -- the suites ---------------------------------------------------------------------------------------------------

def suite_quadratic(r: Runner) -> str:
    """Meta-train on random quadratics (the paper's setup) and compare with lr-tuned baselines at 100 and 200 steps."""
    fast = r.fast
    train_extra = ["--epochs", 4, "--horizon", 10, "--truncation", 5, "--validate-every", 2,
                   "--num-functions", 16] if fast else []
    compare_extra = ["--num-tasks", 64, "--num-tuning-tasks", 32, "--num-functions", 16] if fast else []
    horizons = (20,) if fast else (100, 200)  # fast: one compare (each command costs seconds of imports)
    seeds = [None] if r.args.rule is not None else r.args.seeds
    per_h: dict[int, list[dict[str, Any]]] = {h: [] for h in horizons}
    for seed in seeds:
        ckpt = _meta_train(r, "quadratic", seed, train_extra)
        tag = "rule" if seed is None else f"s{seed}"
        for h in horizons:
            js, png = r.art / f"compare_h{h}_{tag}.json", r.art / f"compare_h{h}_{tag}.png"
            wall = r.l2o("compare", "--task", "quadratic", "--rule", ckpt, "--horizon", h, "--seed", COMPARE_SEED,
                         "--device", r.args.device, "--json", js, "--plot", r.figure(png), *compare_extra)
            rep = json.loads(js.read_text())
            metrics = _compare_metrics(rep)
            per_h[h].append(metrics)
            r.add(f"compare-h{h}", seed=seed, wall_s=wall, files=[js, png], metrics=metrics,
                  config={"task": "quadratic", "horizon": h, "num_tasks": rep["num_tasks"], "rule": str(ckpt),
                          "tuning_seed": COMPARE_SEED, "eval_seed": COMPARE_SEED + 10_000,
                          "lr_grid": "1e-4..1, 4 per decade", "num_functions": 16 if fast else 128})
    lines = []
    for h in horizons:
        if len(per_h[h]) > 1:
            agg = _over_seeds(per_h[h])
            r.add(f"compare-h{h}-over-seeds", seed=list(seeds), wall_s=0.0, metrics=agg, command=None,
                  config={"task": "quadratic", "horizon": h, "seeds": list(seeds)})
            rows = [(n, _fmt(a["final_loss_mean_over_seeds"]), _fmt(a["final_loss_mean_std_over_seeds"], ".3g"),
                     _fmt(a["vs_adam_over_seeds"], ".2f")) for n, a in agg.items()]
            lines.append(f"\nquadratic, {h} steps, {len(seeds)} seeds\n"
                         + _table(("rule", "mean loss (mean over seeds)", "std over seeds", "vs Adam"), rows))
        else:
            m = per_h[h][0]
            rows = [(n, _fmt(v["lr"], ".3g"), f"{_fmt(v['final_loss_mean'])} ± {_fmt(v['final_loss_std'], '.3g')}",
                     _fmt(v["vs_adam"], ".2f")) for n, v in m.items()]
            lines.append(f"\nquadratic, {h} steps\n" + _table(("rule", "tuned lr", "mean loss ± std", "vs Adam"), rows))
    return "\n".join(lines)


def suite_mnist(r: Runner) -> str:
    """Meta-train on MNIST MLPs, then the generalisation study (benchmarks/mnist_generalisation.py)."""
    if r.args.device != "cpu":
        raise UsageError("the mnist suite runs on the CPU only (MNIST tasks cannot move to a device yet)")
    data = r.data_dir("mnist/train-images-idx3-ubyte.gz|train-images-idx3-ubyte.gz")
    fast = r.fast
    train_extra = ["--data", data] + (["--epochs", 2, "--horizon", 6, "--truncation", 3, "--validate-every", 2]
                                      if fast else [])
    gen_extra = ["--cases", "base", "--num-tasks", 4, "--num-tuning-tasks", 2, "--networks-per-task", 2] if fast else []
    seeds = [None] if r.args.rule is not None else r.args.seeds
    table_rows: list[tuple[str, ...]] = []
    for seed in seeds:
        ckpt = _meta_train(r, "mnist", seed, train_extra)
        gen_dir = r.art / ("generalisation_rule" if seed is None else f"generalisation_s{seed}")
        jsonl = gen_dir / "mnist_generalisation.jsonl"
        before = len(jsonl.read_text().splitlines()) if jsonl.is_file() else 0
        r.script("mnist_generalisation.py", "--data", data, "--rule", f"learned={ckpt}", "--out-dir", gen_dir,
                 "--seed", COMPARE_SEED, "--threads", r.args.threads, *gen_extra)
        for line in jsonl.read_text().splitlines()[before:]:
            row = json.loads(line)
            png = gen_dir / f"mnist_{row['case']}.png"
            r.figure(png)
            r.add(f"generalisation-{row['case']}", seed=seed, wall_s=row["wall_s"], files=[png],
                  config={**row["config"], "num_tasks": row["num_tasks"], "num_tuning_tasks": row["num_tuning_tasks"],
                          "rule": str(ckpt), "tuning_seed": row["seed"], "eval_seed": row["seed"] + 10_000},
                  metrics=row["results"])
            for name, res in row["results"].items():
                table_rows.append((str(seed), row["case"], name, _fmt(res["lr"], ".3g"),
                                   f"{_fmt(res['test_loss_mean'], '.3f')} ± {_fmt(res['test_loss_std'], '.3f')}",
                                   _fmt(res["vs_adam"], ".2f")))
    return "\n" + _table(("seed", "case", "rule", "tuned lr", "test loss ± std", "vs Adam"), table_rows)


def _plot_adaptation(reports: dict[str, dict[str, Any]], path: Path, title: str, key: str = "loss_mean") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for label, rep in reports.items():
        ev = rep["eval"]
        ax.plot(ev["steps"], ev[key], marker="o", label=label)
    ax.set_xlabel("adaptation steps on the support set")
    ax.set_ylabel("held-out query " + ("accuracy" if key.startswith("accuracy") else "loss"))
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _maml_rows(r: Runner, task: str, variants: dict[str, list[Any]], extra: list[Any]) -> tuple[str, dict[str, Any]]:
    """Run ``l2o maml`` for every variant and seed; rows, a summary table and the last seed's reports."""
    reports: dict[str, Any] = {}
    table_rows = []
    for seed in r.args.seeds:
        for name, flags in variants.items():
            ckpt, js, png = (r.runs / f"{name}_s{seed}.pt", r.art / f"{name}_s{seed}.json",
                             r.art / f"{name}_s{seed}.png")
            wall = r.l2o("maml", "--task", task, "--out", ckpt, "--seed", seed, "--device", r.args.device,
                         "--json", js, "--plot", r.figure(png), *flags, *extra)
            rep = json.loads(js.read_text())
            ev = rep["eval"]
            metrics = {"algorithm": rep["algorithm"], "query_loss_mean": ev["loss_mean"],
                       "query_loss_std": ev["loss_std"], "eval_tasks": ev["num_tasks"],
                       "best_val_loss": rep["best_val_loss"], "best_iteration": rep["best_iteration"],
                       "skipped": rep["skipped"], "seconds": rep["seconds"]}
            if "accuracy_mean" in ev:
                metrics.update(accuracy_mean=ev["accuracy_mean"], accuracy_std=ev["accuracy_std"])
            r.add(name, seed=seed, wall_s=wall, files=[ckpt, js, png], metrics=metrics,
                  config={"task": task, "variant": name, "flags": [str(f) for f in flags], "iterations": rep["iterations"],
                          "inner_steps": rep["inner_steps"], "first_order": rep["first_order"],
                          "train_config": rep["config"], "task_config": rep["task_config"]})
            reports[rep["algorithm"]] = rep
            k = min(rep["inner_steps"], len(ev["loss_mean"]) - 1)
            acc = f"{100 * ev['accuracy_mean'][-1]:.1f}%" if "accuracy_mean" in ev else "–"
            table_rows.append((str(seed), rep["algorithm"], str(k), f"{ev['loss_mean'][0]:.3f}",
                               f"{ev['loss_mean'][k]:.3f} ± {ev['loss_std'][k]:.3f}",
                               f"{ev['loss_mean'][-1]:.3f} ({ev['steps'][-1]})", acc, f"{rep['seconds']:.0f} s"))
    table = _table(("seed", "algorithm", "k (inner steps)", "query loss, 0 steps", "after k ± std",
                    "after the last eval step (steps)", "accuracy, last step", "train time"), table_rows)
    return "\n" + table, reports


def suite_maml_sine(r: Runner) -> str:
    """MAML, first-order MAML and Meta-SGD on sine regression (``l2o maml``), and the speed of one meta-iteration."""
    variants = {"maml": [], "fomaml": ["--first-order"], "metasgd": ["--inner-rule", "metasgd"]}
    extra = ["--iterations", 5, "--validate-every", 5, "--num-val-tasks", 2, "--eval-tasks", 20, "--eval-steps", 3,
             "--meta-batch", 5] if r.fast else []
    summary, reports = _maml_rows(r, "sine", variants, extra)
    _plot_adaptation(reports, r.figure(r.art / "adaptation.png"), "sine regression: held-out MSE vs adaptation steps")
    js = r.art / "speed.json"
    wall = r.script("maml_sine.py", "--speed", "--json", js, "--threads", r.args.threads,
                    *(["--repeats", 2, "--warmup", 1, "--impls", FAST_MAML_IMPLS] if r.fast else []))
    speed = json.loads(js.read_text())
    rows = []
    for row in speed["rows"]:
        r.add(f"speed-inner-steps-{row['inner_steps']}", seed=None, wall_s=wall, files=[js],
              config={"meta_batch": speed["meta_batch"], "inner_steps": row["inner_steps"], "repeats": speed["repeats"],
                      "second_order": True},
              metrics={k: row[k] for k in ("l2o_ms", "plain_ms", "speedup")})
        rows.append((str(row["inner_steps"]), f"{row['plain_ms']:.2f} ms", f"{row['l2o_ms']:.2f} ms",
                     f"{row['speedup']:.2f}×"))
    return summary + "\n\none second-order meta-iteration (meta-batch 25)\n" + _table(
        ("inner steps", "plain loop", "l2o", "speed-up"), rows)


def suite_maml_omniglot(r: Runner) -> str:
    """5-way 1-shot MAML on Omniglot (``l2o maml --task omniglot``): held-out accuracy after adaptation."""
    data = r.data_dir("omniglot/images_background.zip|images_background.zip",
                      "omniglot/images_evaluation.zip|images_evaluation.zip")
    variants = {"maml-5way-1shot": ["--ways", 5, "--shots", 1]}
    extra = ["--data", data] + (["--iterations", 2, "--meta-batch", 2, "--channels", 4, "--query-shots", 2,
                                 "--first-order", "--validate-every", 1, "--num-val-tasks", 1, "--eval-tasks", 4]
                                if r.fast else [])
    summary, reports = _maml_rows(r, "omniglot", variants, extra)
    _plot_adaptation(reports, r.figure(r.art / "accuracy.png"), "Omniglot 5-way 1-shot: held-out accuracy",
                     key="accuracy_mean")
    return summary


def _plot_speed(rows: list[tuple[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 0.6 + 0.5 * len(rows)))
    labels, values = [lbl for lbl, _ in rows], [v for _, v in rows]
    ax.barh(labels, values)
    ax.axvline(1.0, color="k", lw=0.8)
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.2f}×", va="center")
    ax.set_xlabel("speed-up of l2o (reference time / l2o time; > 1 is faster)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def suite_speed(r: Runner) -> str:
    """Meta-training epoch vs a plain loop, one drop-in optimizer step vs its floor, one MAML meta-iteration."""
    if r.args.device != "cpu":
        raise UsageError("the speed suite times the CPU implementations only; run it with --device cpu")
    fast, threads = r.fast, r.args.threads
    bars: list[tuple[str, float]] = []
    table: list[tuple[str, ...]] = []

    js = r.art / "speed_meta_train.json"
    wall = r.script("speed_meta_train.py", "--json", js, "--threads", threads,
                    *(["--repeats", 1, "--warmup", 0, "--settings", "default"] if fast else []))
    for row in json.loads(js.read_text()):
        r.add(f"meta-train-epoch-{row['setting']}", seed=None, wall_s=wall, files=[js],
              config={"problem": "128 quadratics x 100 inner steps, truncation 20, first order",
                      "setting": row["setting"], "applied": row["applied"], "repeats": row["repeats"]},
              metrics={k: row[k] for k in ("plain_ms", "library_ms", "speedup")})
        bars.append((f"meta-train epoch ({row['setting']})", row["speedup"]))
        table.append((f"meta-training epoch, {row['setting']}", f"plain loop {row['plain_ms']:.1f} ms",
                      f"{row['library_ms']:.1f} ms", f"{row['speedup']:.2f}×"))

    js = r.art / "speed_step.json"
    wall = r.script("speed_step.py", "--json", js, "--threads", threads,
                    *(["--sizes", 64, 64, 10, "--repeats", 1, "--warmup", 0, "--no-profile", "--mm-size", 256,
                       "--copy-mib", 16] if fast else []))
    step = json.loads(js.read_text())
    r.add("optimizer-step", seed=None, wall_s=wall, files=[js],
          config={"sizes": step["sizes"], "params": step["params"], "rule": step["rule"], "repeats": step["repeats"]},
          metrics={"learned_step_ms": 1e3 * step["learned_step_s"], "adam_step_ms": 1e3 * step["adam_step_s"],
                   "floor_ms": 1e3 * step["floor_s"], "floor_bound": step["floor_bound"],
                   "learned_over_floor": step["learned_over_floor"], "learned_over_adam": step["learned_over_adam"],
                   "mm_gflops": step["mm_gflops"], "copy_gb_per_s": step["copy_gb_per_s"]})
    bars.append(("optimizer step vs its floor", 1.0 / step["learned_over_floor"]))
    table.append((f"LearnedOptimizer.step(), {step['params']:,} params", f"floor {1e3 * step['floor_s']:.1f} ms",
                  f"{1e3 * step['learned_step_s']:.1f} ms", f"{step['learned_over_floor']:.1f}× the floor"))

    js = r.art / "maml_sine_speed.json"
    wall = r.script("maml_sine.py", "--speed", "--json", js, "--threads", threads,
                    *(["--repeats", 2, "--warmup", 1, "--impls", FAST_MAML_IMPLS] if fast else []))
    maml = json.loads(js.read_text())
    for row in maml["rows"]:
        r.add(f"maml-sine-iteration-k{row['inner_steps']}", seed=None, wall_s=wall, files=[js],
              config={"meta_batch": maml["meta_batch"], "inner_steps": row["inner_steps"], "repeats": maml["repeats"]},
              metrics={k: row[k] for k in ("l2o_ms", "plain_ms", "speedup")})
        bars.append((f"MAML sine iteration, K={row['inner_steps']}", row["speedup"]))
        table.append((f"MAML sine meta-iteration, {row['inner_steps']} inner step(s)", f"plain loop {row['plain_ms']:.2f} ms",
                      f"{row['l2o_ms']:.2f} ms", f"{row['speedup']:.2f}×"))
    _plot_speed(bars, r.figure(r.art / "speed.png"))
    return "\n" + _table(("benchmark", "reference", "l2o", "ratio"), table)


def suite_generalist(r: Runner) -> str:
    """The held-out suite (benchmarks/generalist.py): users' own models trained through ``torch.optim`` and
    ``l2o.LearnedOptimizer``, tuned baselines, every shipped rule and every ``--rule``; one row per task."""
    if r.args.device != "cpu":
        raise UsageError("the generalist suite runs on the CPU only (it times optimizers on this machine's cores)")
    js, md = r.art / "generalist.json", r.art / "generalist.md"
    argv: list[Any] = ["--json", js, "--markdown", md, "--out-dir", r.art, "--threads", r.args.threads,
                       "--seeds", ",".join(map(str, r.args.seeds))]
    for rule in r.args.rules:  # (a file as an absolute path: the script runs in the repository root)
        argv += ["--rule", Path(rule).resolve() if Path(rule).is_file() else rule]
    if r.args.tasks:
        argv += ["--tasks", r.args.tasks]
    if r.args.data:
        argv += ["--data", r.args.data]
    wall = r.script("generalist.py", *argv, *(["--fast"] if r.fast else []))
    report = json.loads(js.read_text())
    for name, task in report["tasks"].items():
        config = {k: task.get(k) for k in ("title", "model", "data", "held_out", "steps", "batch_size", "params",
                                              "source")}
        config.update(seeds=task["seeds"], tuning_seed=report["config"]["tuning_seed"],
                      rules=report["config"]["rules"])
        if task.get("skipped"):
            r.add(f"task-{name}", seed=task["seeds"], wall_s=0.0, files=[js], config=config,
                  metrics={"skipped": task["skipped"]})
            continue
        png = r.figure(Path(task["figure"]))
        config["tuning"] = {k: {"grid": t["grid"], "val_loss": t["val_loss"], "best_lr": t["best_lr"],
                                "at_grid_edge": t["at_grid_edge"]} for k, t in task["tuning"].items()}
        metrics = {opt: {"lr": res["lr"], **res["summary"]} for opt, res in task["optimizers"].items()}
        r.add(f"task-{name}", seed=task["seeds"], wall_s=task["wall_s"], files=[js, md, png], config=config,
              metrics=metrics)
    return "\n" + md.read_text() + f"\n(generalist.py ran {wall:.0f} s)"


SUITE_FUNCTIONS: dict[str, Callable[[Runner], str]] = {
    "quadratic": suite_quadratic, "mnist": suite_mnist, "maml-sine": suite_maml_sine,
    "maml-omniglot": suite_maml_omniglot, "speed": suite_speed, "generalist": suite_generalist,
}


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integer seeds such as 0,1,2, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct comma-separated seeds such as 0,1,2, got {text!r}")
    return seeds


def _device(text: str) -> str:
    name = text.strip().lower()
    if name in ("cpu", "cuda") or (name.startswith("cuda:") and name[5:].isdigit()):
        return name
    raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _generalist_usage(args: argparse.Namespace) -> str | None:
    """What is wrong with the generalist suite's ``--rule`` and ``--tasks``, or None."""
    import l2o

    shipped = [entry["name"] for entry in l2o.list_pretrained()]
    for rule in args.rules:
        if rule not in shipped and not Path(rule).is_file():
            return (f"--rule {rule}: neither a shipped rule ({', '.join(shipped) or 'none shipped'}) nor an existing "
                    "checkpoint file")
    if args.tasks is not None:
        sys.path.insert(0, str(BENCH))
        from generalist_tasks import task_names_error

        error = task_names_error([t.strip() for t in args.tasks.split(",") if t.strip()])
        if error:
            return f"--tasks {args.tasks}: {error}"
    return None


def build_parser() -> argparse.ArgumentParser:
    """The command line of this script."""
    p = argparse.ArgumentParser(prog="benchmarks/run.py", description=__doc__.split("\n\n")[0],
                                epilog="examples:\n" + "\n".join(line.strip() for line in __doc__.splitlines()[2:9]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", required=True, choices=SUITES, help="the suite to run")
    p.add_argument("--fast", action="store_true",
                   help="shrink everything (tiny meta-training, few tasks, few repeats): a smoke test, not a result")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="where <suite>.jsonl and <suite>/ (figures, JSON) go (default benchmarks/results; "
                        "with --fast runs/benchmarks-fast/results, so smoke runs never mix with results)")
    p.add_argument("--runs-dir", type=Path, default=None,
                   help="where checkpoints go (default runs/benchmarks; with --fast runs/benchmarks-fast)")
    p.add_argument("--seeds", type=_seeds, default=None,
                   help="meta-training seeds, comma-separated (default 0); several add a mean ± std over seeds row; "
                        "generalist: the reported seeds (default 0,1,2; --fast: 0)")
    p.add_argument("--rule", action="append", default=[], metavar="PATH_OR_NAME",
                   help="quadratic/mnist: evaluate this checkpoint instead of meta-training one; generalist: a further "
                        "rule to evaluate (a shipped name or a checkpoint path), repeatable")
    p.add_argument("--tasks", default=None, help="generalist: comma-separated task names (default: all)")
    p.add_argument("--data", type=Path, default=None,
                   help="mnist/maml-omniglot/generalist: data directory (default $L2O_DATA, else ../shared/data)")
    p.add_argument("--threads", type=_positive, default=1, help="torch threads of every command (default 1)")
    p.add_argument("--device", type=_device, default="cpu",
                   help="cpu (default) or cuda[:N] for the l2o commands of the quadratic and maml suites")
    p.add_argument("--progress", action="store_true", help="show the commands' progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    default_root = REPO / "runs" / "benchmarks-fast" if args.fast else None
    args.out_dir = args.out_dir or (default_root / "results" if args.fast else BENCH / "results")
    args.runs_dir = args.runs_dir or (default_root if args.fast else REPO / "runs" / "benchmarks")
    args.seeds = args.seeds or ([0, 1, 2] if args.suite == "generalist" and not args.fast else [0])
    args.rules, args.rule = list(args.rule), None
    if args.rules and args.suite not in ("quadratic", "mnist", "generalist"):
        print(f"run.py: error: --rule applies to the quadratic, mnist and generalist suites, not {args.suite}",
              file=sys.stderr)
        return 2
    if args.tasks is not None and args.suite != "generalist":
        print(f"run.py: error: --tasks applies to the generalist suite, not {args.suite}", file=sys.stderr)
        return 2
    if args.suite in ("quadratic", "mnist") and args.rules:
        if len(args.rules) > 1:
            print(f"run.py: error: the {args.suite} suite evaluates one --rule checkpoint, got {len(args.rules)}",
                  file=sys.stderr)
            return 2
        args.rule = Path(args.rules[0])
        if not args.rule.is_file():
            print(f"run.py: error: --rule {args.rule} does not exist", file=sys.stderr)
            return 2
    if args.suite == "generalist":
        problem = _generalist_usage(args)
        if problem:
            print(f"run.py: error: {problem}", file=sys.stderr)
            return 2
    start = time.perf_counter()
    try:
        runner = Runner(args)
        summary = SUITE_FUNCTIONS[args.suite](runner)
    except UsageError as exc:
        print(f"run.py: error: {exc}", file=sys.stderr)
        return 2
    except SuiteError as exc:
        print(f"run.py: failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("run.py: interrupted", file=sys.stderr)
        return 130
    print(summary)
    print(f"\nsuite {args.suite}{' (fast)' if args.fast else ''}: {len(runner.rows)} rows appended to "
          f"{runner._rel(runner.jsonl)} in {time.perf_counter() - start:.0f}s; figures: "
          + (", ".join(runner._rel(f) for f in runner.figures) or "none"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
