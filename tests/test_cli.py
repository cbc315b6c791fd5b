"""The `l2o` command line: help, the quadratic workflow end to end, and one-line errors (exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from l2o.cli import main
from l2o.checkpoints import load_checkpoint


def _run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_lists_commands_and_examples():
    proc = subprocess.run([sys.executable, "-m", "l2o", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for word in ("meta-train", "compare", "examples:"):
        assert word in proc.stdout


@pytest.mark.parametrize("command", ["meta-train", "compare"])
def test_subcommand_help(command):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0


def test_meta_train_then_compare(tmp_path, capsys):
    ckpt = tmp_path / "runs" / "q.pt"
    code, out, _ = _run(capsys, "meta-train", "--task", "quadratic", "--out", str(ckpt), "--epochs", "2",
                        "--horizon", "10", "--truncation", "5", "--validate-every", "1", "--num-functions", "8",
                        "--hidden-size", "6", "--no-progress", "--seed", "3")
    assert code == 0 and ckpt.is_file() and "wrote" in out
    data = load_checkpoint(ckpt)
    prov = data["provenance"]
    assert prov["task"] == "quadratic" and prov["seed"] == 3 and prov["meta_steps"] == 4
    assert prov["train_config"]["horizon"] == 10 and data["config"]["hidden_size"] == 6
    report_path, plot_path = tmp_path / "r.json", tmp_path / "r.png"
    code, out, _ = _run(capsys, "compare", "--task", "quadratic", "--rule", str(ckpt), "--horizon", "12",
                        "--num-tasks", "20", "--num-tuning-tasks", "8", "--num-functions", "8",
                        "--json", str(report_path), "--plot", str(plot_path))
    assert code == 0 and "adam" in out and "learned" in out
    report = json.loads(report_path.read_text())
    assert report["horizon"] == 12 and report["num_tasks"] == 20
    assert set(report["results"]) == {"learned", "sgd", "nag", "rmsprop", "adam"}
    for r in report["results"].values():
        assert set(r) >= {"lr", "final_loss_mean", "final_loss_std", "curve"} and len(r["curve"]) == 13
    assert plot_path.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv, match", [
    (["meta-train", "--task", "rosenbrock", "--out", "x.pt"], "unknown task 'rosenbrock'; known tasks: mnist, quadratic"),
    (["meta-train", "--task", "quadratic", "--out", "x.pt", "--horizon", "10", "--truncation", "20"], "longer than the horizon"),
    (["compare", "--task", "quadratic", "--rule", "missing.pt"], "does not exist"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, monkeypatch, argv, match):
    monkeypatch.chdir(tmp_path)
    code, _, err = _run(capsys, *argv)
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize("argv", [["meta-train", "--task", "quadratic", "--out", "x.pt", "--meta-lr", "-1"],
                                  ["meta-train", "--task", "quadratic", "--out", "x.pt", "--preprocess", "magic"],
                                  ["meta-train", "--task", "mnist", "--out", "x.pt", "--mlp-hidden", "20,0"],
                                  ["compare", "--task", "quadratic", "--horizon", "0"], ["frobnicate"]])
def test_argparse_errors_exit_2(argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


def test_malformed_checkpoint_is_one_line_exit_2(tmp_path, capsys):
    torch.save({"format": "l2o.rule", "format_version": 7}, tmp_path / "old.pt")
    code, _, err = _run(capsys, "compare", "--task", "quadratic", "--rule", str(tmp_path / "old.pt"))
    assert code == 2 and "format_version 7" in err
