"""The benchmark suite entry point (benchmarks/run.py): a fast quadratic suite end to end, its JSON
Lines rows, and its usage errors; the held-out generalist suite (benchmarks/generalist.py) in its fast
mode, its skipping of missing data, its divergence flags and its usage errors."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import l2o

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "benchmarks" / "run.py"
ROW_FIELDS = {"suite", "name", "fast", "config", "seed", "l2o_version", "torch_version", "device", "threads",
              "machine", "git", "time", "wall_s", "metrics", "command", "files"}


def _run_suite(tmp_path: Path, suite: str, timeout: int) -> tuple[subprocess.CompletedProcess, list[dict]]:
    out = tmp_path / "results"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(RUN), "--suite", suite, "--fast", "--out-dir", str(out),
                           "--runs-dir", str(tmp_path / "runs")], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (out / f"{suite}.jsonl").read_text().splitlines()
    return proc, [json.loads(line) for line in lines]


def _check_common(row: dict, suite: str) -> None:
    assert set(row) == ROW_FIELDS
    assert row["suite"] == suite and row["fast"] is True
    assert row["l2o_version"] == l2o.__version__ and row["torch_version"] == str(torch.__version__)
    assert row["device"].startswith("cpu") and row["threads"] == 1
    assert isinstance(row["wall_s"], float) and row["wall_s"] >= 0
    for path in row["files"]:
        assert (REPO / path).is_file() or Path(path).is_file(), path


def test_quadratic_suite_fast(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "quadratic.jsonl").write_text('{"earlier": "row"}\n')  # rows are appended, never overwritten
    proc, rows = _run_suite(tmp_path, "quadratic", timeout=240)
    assert rows[0] == {"earlier": "row"}
    rows = rows[1:]
    assert [r["name"] for r in rows] == ["meta-train", "compare-h20"]
    for row in rows:
        _check_common(row, "quadratic")
        assert row["seed"] == 0 and row["command"].startswith("python -m l2o ")
    train, comp = rows
    assert train["metrics"]["meta_steps"] == 8 and train["config"]["train_config"]["seed"] == 0
    assert comp["config"]["horizon"] == 20 and comp["config"]["num_tasks"] == 64
    assert set(comp["metrics"]) == {"learned", "sgd", "nag", "rmsprop", "adam"}
    for name, m in comp["metrics"].items():
        assert math.isfinite(m["final_loss_mean"]) and m["final_loss_std"] >= 0 and len(m["curve"]) == 21
        assert (m["lr"] is None) == (name == "learned")
    assert comp["metrics"]["adam"]["vs_adam"] == pytest.approx(1.0)
    pngs = [f for f in comp["files"] + train["files"] if f.endswith(".png")]
    assert len(pngs) == 2 and all(Path(f).read_bytes()[:4] == b"\x89PNG" for f in pngs)
    assert "| learned |" in proc.stdout and "rows appended" in proc.stdout


@pytest.mark.slow
def test_speed_suite_fast(tmp_path):
    _, rows = _run_suite(tmp_path, "speed", timeout=300)
    names = [r["name"] for r in rows]
    assert names == ["meta-train-epoch-default", "optimizer-step", "maml-sine-iteration-k1", "maml-sine-iteration-k5"]
    for row in rows:
        _check_common(row, "speed")
        assert row["seed"] is None
    assert rows[0]["metrics"]["speedup"] > 0 and rows[1]["metrics"]["learned_over_floor"] > 0
    assert (tmp_path / "results" / "speed" / "speed.png").read_bytes()[:4] == b"\x89PNG"


def _load_run_module():
    spec = importlib.util.spec_from_file_location("benchmarks_run", RUN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv, match", [
    (["--suite", "speed", "--rule", "x.pt"], "--rule applies to the quadratic, mnist and generalist suites"),
    (["--suite", "quadratic", "--rule", "a.pt", "--rule", "b.pt"], "evaluates one --rule checkpoint, got 2"),
    (["--suite", "generalist", "--rule", "no-such-rule"], "neither a shipped rule"),
    (["--suite", "generalist", "--tasks", "mnist-convnet,nope"], "unknown task(s) nope"),
    (["--suite", "speed", "--tasks", "char-gpt"], "--tasks applies to the generalist suite"),
    (["--suite", "quadratic", "--rule", "missing.pt"], "does not exist"),
    (["--suite", "maml-omniglot", "--data", "."], "omniglot/images_background.zip"),
])
def test_usage_errors_exit_2(tmp_path, monkeypatch, capsys, argv, match):
    monkeypatch.chdir(tmp_path)
    run = _load_run_module()
    code = run.main([*argv, "--fast", "--out-dir", str(tmp_path / "r"), "--runs-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r" / "maml-omniglot.jsonl").exists()


@pytest.mark.parametrize("argv", [["--suite", "nope"], ["--suite", "quadratic", "--seeds", "1,1"],
                                  ["--suite", "quadratic", "--device", "gpu"]])
def test_argparse_errors_exit_2(argv):
    run = _load_run_module()
    with pytest.raises(SystemExit) as exc:
        run.main(argv)
    assert exc.value.code == 2


def test_mnist_drop_in_benchmark_smoke(tmp_path, shared_data_dir):
    """benchmarks/mnist_drop_in.py runs the shipped rules and Adam through the user-facing loop and
    writes one finite row per (activation, optimizer)."""
    out = tmp_path / "drop_in.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "mnist_drop_in.py"), "--data", str(shared_data_dir),
                           "--seeds", "1", "--steps", "3", "--json", str(out)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    names = {r["optimizer"] for r in rows}
    assert names == {"adam (lr 0.0316)", "adam (lr 0.0178)", *(f"{rule} (lr {lr})" for rule in ("mnist", "mnist-nag", "mnist-paper")
                                                               for lr in ("1", "0.3"))}
    assert len(rows) == 2 * len(names) and {r["activation"] for r in rows} == {"sigmoid", "relu"}
    assert all(len(r["losses"]) == 1 and math.isfinite(r["mean"]) for r in rows)
    # 3 steps from chance (ln 10 = 2.30): everything but the learned rule at lr 1 on ReLU has learned something
    assert all(r["mean"] < 2.25 for r in rows if not (r["activation"] == "relu" and r["optimizer"] == "mnist-nag (lr 1)"))


# -- the held-out generalist suite ---------------------------------------------------------------------------------

GENERALIST = REPO / "benchmarks" / "generalist.py"
BASELINES = ("adam-1e-3", "adamw-tuned", "sgdm-tuned")


def _mnist_dir(request) -> Path:
    """$L2O_DATA when it holds MNIST, else the shared data directory (skips when absent)."""
    env = os.environ.get("L2O_DATA")
    if env and any((Path(env) / sub / "train-images-idx3-ubyte.gz").is_file() for sub in ("mnist", ".")):
        return Path(env)
    return request.getfixturevalue("shared_data_dir")


def _load_generalist():
    name = "benchmarks_generalist"
    if name not in sys.modules:  # registered first: its dataclasses look their module up there
        spec = importlib.util.spec_from_file_location(name, GENERALIST)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_generalist_suite_fast(tmp_path, request):
    """run.py --suite generalist --fast: every task, every optimizer (baselines and every shipped rule),
    one seed, a few steps; the JSON report, the rows, the figures, finite curves everywhere."""
    data = _mnist_dir(request)
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(RUN), "--suite", "generalist", "--fast", "--data", str(data),
                           "--out-dir", str(out), "--runs-dir", str(tmp_path / "runs")], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "generalist" / "generalist.json").read_text())
    generalist = _load_generalist()
    assert report["config"]["fast"] is True and report["config"]["seeds"] == [0]
    assert report["config"]["tuning_seed"] not in report["config"]["seeds"]
    shipped = [e["name"] for e in l2o.list_pretrained()]
    # a rule with training-progress inputs (the generalist MLP rule) runs twice, the second told the length
    progress = [n for n in shipped if hasattr(l2o.load_pretrained(n), "total_steps")]
    contenders = [c for n in shipped for c in ([n, f"{n}+total_steps"] if n in progress else [n])]
    lstm = [n for n in shipped if n not in progress]
    assert progress == ["generalist-bounded", "generalist", "generalist-base"] and report["config"]["rules"] == contenders
    assert list(report["tasks"]) == list(generalist.TASKS)
    assert len(report["tasks"]) >= 6
    ran = {name: t for name, t in report["tasks"].items() if not t["skipped"]}
    fashion = any((d / "train-images-idx3-ubyte.gz").is_file()
                  for d in (data / "fashion-mnist", Path("/usr/share/datasets/fashion-mnist")))
    assert set(ran) == (set(report["tasks"]) if fashion else {n for n in report["tasks"] if not n.startswith("fashion")})
    rows = [json.loads(line) for line in (out / "generalist.jsonl").read_text().splitlines()]
    assert [r["name"] for r in rows] == [f"task-{n}" for n in report["tasks"]]
    for row in rows:
        _check_common(row, "generalist")
    for name, task in ran.items():
        assert task["steps"] == generalist.FAST_STEPS and task["params"] > 0
        assert set(task["tuning"]) == {"adamw", "sgdm"}
        for tuning in task["tuning"].values():
            assert len(tuning["grid"]) == len(tuning["val_loss"]) == 2 and tuning["best_lr"] in tuning["grid"]
        opts = task["optimizers"]
        assert list(opts) == [*BASELINES, *contenders]
        assert opts["adamw-tuned"]["lr"] == task["tuning"]["adamw"]["best_lr"]
        assert opts["sgdm-tuned"]["lr"] == task["tuning"]["sgdm"]["best_lr"]
        assert opts["adam-1e-3"]["lr"] == 1e-3 and all(opts[r]["lr"] is None for r in contenders)
        for opt, res in opts.items():
            (run,) = res["runs"]
            assert run["seed"] == 0 and run["params"] == task["params"]
            finite = [v for _, v in run["curve"]] + [v for _, v in run["heldout_curve"]]
            assert finite and all(v is not None and math.isfinite(v) for v in finite), (name, opt)
            assert [s for s, _ in run["curve"]] == list(range(1, run["steps_done"] + 1))  # 5 steps: one window each
            assert run["heldout_curve"][0][0] == 0 and isinstance(run["diverged"], bool)
            assert (run["diverged_reason"] is None) == (not run["diverged"])
            assert run["step_ms"] > 0 and run["train_step_ms"] >= run["step_ms"]
            s = res["summary"]
            if not run["diverged"]:
                assert run["steps_done"] == generalist.FAST_STEPS and math.isfinite(run["final_loss"])
                assert s["final_loss_mean"] == run["final_loss"] and s["final_loss_std"] == 0.0
            assert s["diverged_seeds"] == int(run["diverged"]) and s["seeds"] == 1
        adam = opts["adam-1e-3"]["summary"]
        assert adam["vs_adam"] == 1.0 and adam["step_time_vs_adam"] == 1.0 and adam["run_time_vs_adam"] == 1.0
        assert opts["adamw-tuned"]["summary"]["vs_adamw_tuned"] == 1.0
        # bytes of every tensor in opt.state per parameter: Adam 2 floats (+ a step tensor per parameter
        # tensor), SGD-momentum 1 float, the 2x20 LSTM rules at least 80 floats, the MLP rule 4 floats plus
        # its factored row and column vectors
        assert 8.0 < opts["adam-1e-3"]["summary"]["state_bytes_per_param"] < 8.01
        assert opts["sgdm-tuned"]["summary"]["state_bytes_per_param"] == 4.0
        assert all(opts[r]["summary"]["state_bytes_per_param"] >= 320 for r in lstm)
        assert all(16.0 < opts[c]["summary"]["state_bytes_per_param"] < 17.0 for c in contenders
                   if c.split("+")[0] in progress)
        assert Path(task["figure"]).read_bytes()[:4] == b"\x89PNG"
        assert f"### {name}:" in proc.stdout
    assert "| mnist-paper |" in proc.stdout and "held-out loss / tuned AdamW's" in proc.stdout


def test_generalist_missing_data_skips_with_a_message(tmp_path, monkeypatch, capsys):
    """Without MNIST or Fashion-MNIST the image tasks are skipped, each with what is missing and how to
    get it; the text task (data from Python's standard library) still runs; --rule takes a checkpoint."""
    generalist = _load_generalist()
    tasks = sys.modules["generalist_tasks"]
    monkeypatch.setattr(tasks, "DEBIAN_FASHION_DIR", tmp_path / "no-fashion")
    ckpt = tmp_path / "mine.pt"
    l2o.save_rule(ckpt, l2o.load_pretrained("mnist"))
    empty = tmp_path / "empty"
    empty.mkdir()
    js = tmp_path / "g.json"
    code = generalist.main(["--fast", "--no-shipped", "--rule", str(ckpt), "--data", str(empty), "--json", str(js),
                            "--tasks", "mnist-convnet,fashion-resmlp,char-gpt", "--out-dir", str(tmp_path / "o"),
                            "--markdown", str(tmp_path / "g.md")])
    assert code == 0
    report = json.loads(js.read_text())
    convnet, fashion, gpt = (report["tasks"][n] for n in ("mnist-convnet", "fashion-resmlp", "char-gpt"))
    assert "MNIST is not on this machine" in convnet["skipped"] and str(empty) in convnet["skipped"]
    assert "apt-get install dataset-fashion-mnist" in fashion["skipped"]
    assert str(tmp_path / "no-fashion") in fashion["skipped"]
    assert gpt["skipped"] is None and "pydoc_data" in gpt["source"]
    assert list(gpt["optimizers"]) == [*BASELINES, str(ckpt)]
    assert "checkpoint=" in gpt["optimizers"][str(ckpt)]["source"]
    text = (tmp_path / "g.md").read_text()
    assert "### mnist-convnet: skipped" in text and "### char-gpt:" in text
    assert "skipping fashion-resmlp" in capsys.readouterr().out


def test_generalist_no_tuning_screens_rules_against_adam_only(tmp_path, shared_data_dir):
    """--no-tuning: no tuning runs, no tuned baselines; Adam@1e-3 and the rules, and the report says so."""
    generalist = _load_generalist()
    js, md = tmp_path / "g.json", tmp_path / "g.md"
    code = generalist.main(["--fast", "--no-tuning", "--no-shipped", "--rule", "generalist", "--data",
                            str(shared_data_dir), "--tasks", "mnist-deep-mlp", "--json", str(js),
                            "--out-dir", str(tmp_path / "o"), "--markdown", str(md)])
    assert code == 0
    report = json.loads(js.read_text())
    assert report["config"]["tuning"] is False
    task = report["tasks"]["mnist-deep-mlp"]
    assert task["tuning"] == {} and "projected_full_s" not in task
    assert list(task["optimizers"]) == ["adam-1e-3", "generalist", "generalist+total_steps"]
    for res in task["optimizers"].values():
        assert res["summary"]["vs_adamw_tuned"] is None and math.isfinite(res["summary"]["vs_adam"])
    text = md.read_text()
    assert "no tuning (Adam@1e-3 and the rules only: a screen, not the suite)" in text
    assert "held-out loss / Adam@1e-3's" in text and "tuned AdamW's" not in text


def test_generalist_extra_tasks_run_the_fashion_models_on_mnist_only_when_named(tmp_path, shared_data_dir):
    """mnist-bn-convnet and mnist-resmlp are the Fashion-MNIST tasks' models on MNIST: not in the default
    suite, run when named, with the same parameter count as their Fashion-MNIST twins."""
    generalist = _load_generalist()
    tasks = sys.modules["generalist_tasks"]
    assert set(tasks.EXTRA_TASKS).isdisjoint(tasks.TASKS)
    assert list(tasks.ALL_TASKS)[:len(tasks.TASKS)] == list(tasks.TASKS)
    assert [t.name for t in tasks.iter_tasks(None)] == list(tasks.TASKS)
    for extra, twin in (("mnist-bn-convnet", "fashion-bn-convnet"), ("mnist-resmlp", "fashion-resmlp")):
        a, b = tasks.EXTRA_TASKS[extra], tasks.TASKS[twin]
        assert a.make_model is b.make_model and a.loss is b.loss and (a.steps, a.batch_size) == (b.steps, b.batch_size)
    js = tmp_path / "g.json"
    code = generalist.main(["--fast", "--no-tuning", "--no-shipped", "--rule", "generalist", "--data",
                            str(shared_data_dir), "--tasks", "mnist-bn-convnet,mnist-resmlp", "--json", str(js),
                            "--out-dir", str(tmp_path / "o")])
    assert code == 0
    report = json.loads(js.read_text())
    assert list(report["tasks"]) == ["mnist-bn-convnet", "mnist-resmlp"]
    for name, task in report["tasks"].items():
        assert task["skipped"] is None and "MNIST" in task["source"] and "Fashion" not in task["source"]
        torch.manual_seed(0)
        twin = tasks.TASKS[name.replace("mnist", "fashion")]
        assert task["params"] == sum(p.numel() for p in twin.make_model().parameters())
        assert all(math.isfinite(r["final_loss"]) for res in task["optimizers"].values() for r in res["runs"])


def test_generalist_flags_divergence():
    """A run whose loss blows up is flagged (and stopped at a non-finite loss); a sane one is not."""
    generalist = _load_generalist()
    task = generalist.TASKS["char-gpt"]
    splits = task.load(None, True, 4)
    ok = generalist.train(task, splits, lambda ps: torch.optim.Adam(ps, lr=1e-3), 0, 4, factor=2.0, eval_points=2)
    assert not ok["diverged"] and ok["diverged_reason"] is None and ok["steps_done"] == 4
    assert ok["final_loss"] < ok["initial_loss"]  # 4 Adam steps from ln(97) = 4.57 learn the character frequencies
    bad = generalist.train(task, splits, lambda ps: torch.optim.SGD(ps, lr=1e6), 0, 4, factor=2.0, eval_points=2)
    assert bad["diverged"] and ("non-finite" in bad["diverged_reason"] or "above 2 x" in bad["diverged_reason"])
    assert bad["steps_done"] <= 4


@pytest.mark.parametrize("argv, match", [
    (["--rule", "no-such-rule"], "neither a shipped rule"),
    (["--seeds", "0,1", "--tuning-seed", "1"], "tuning must use a separate seed"),
])
def test_generalist_usage_errors_exit_2(tmp_path, capsys, argv, match):
    generalist = _load_generalist()
    code = generalist.main([*argv, "--fast", "--tasks", "char-gpt", "--out-dir", str(tmp_path)])
    assert code == 2 and match in capsys.readouterr().err
    assert not (tmp_path / "generalist.json").exists()


@pytest.mark.parametrize("argv", [["--tasks", "nope"], ["--seeds", "1,1"], ["--steps", "0"]])
def test_generalist_argparse_errors_exit_2(argv):
    with pytest.raises(SystemExit) as exc:
        _load_generalist().main(argv)
    assert exc.value.code == 2


def test_step_scale_of_adam_is_one(tmp_path, capsys):
    """benchmarks/step_scale.py: Adam at lr 1e-3 against its own shadow takes steps of ratio 1 on every
    tensor; the command line prints the table and writes the JSON."""
    spec = importlib.util.spec_from_file_location("benchmarks_step_scale", REPO / "benchmarks" / "step_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.step_scale("char-gpt", "adam", 3, [0, 2, 5])
    assert out["steps"] == [0, 2] and len(out["loss"]) == 2 and out["loss"][1] < out["loss"][0] + 0.5
    assert len(out["ratio"]) == 28  # every parameter tensor of char-gpt
    for ratios in out["ratio"].values():
        assert len(ratios) == 2 and all(abs(r - 1.0) < 1e-4 for r in ratios)
    js = tmp_path / "s.json"
    assert module.main(["--task", "char-gpt", "--rule", "adam", "--steps", "2", "--at", "0,1", "--json", str(js)]) == 0
    assert "wte.weight" in capsys.readouterr().out and json.loads(js.read_text())["rule"] == "adam"
