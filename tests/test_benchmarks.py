"""The benchmark suite entry point (benchmarks/run.py): a fast quadratic suite end to end, its JSON
Lines rows, and its usage errors."""

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
    (["--suite", "speed", "--rule", "x.pt"], "--rule applies to the quadratic and mnist suites"),
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
