"""The `l2o` command line: help, the quadratic workflow end to end, and one-line errors (exit 2 for bad
usage, 1 for failures while running, tracebacks behind --debug)."""

from __future__ import annotations

import argparse
import re
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from l2o.cli import main
import l2o
from l2o.checkpoints import load_checkpoint, load_rule


def _run(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
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
    (["meta-train", "--task", "rosenbrock", "--out", "x.pt"], "unknown task 'rosenbrock'; known tasks: generalist, mnist, quadratic"),
    (["meta-train", "--task", "quadratic", "--out", "x.pt", "--horizon", "10", "--truncation", "20"], "longer than the horizon"),
    (["compare", "--task", "quadratic", "--rule", "missing.pt"], "does not exist"),
    (["compare", "--task", "quadratic", "--pretrained", "nope"], "unknown pretrained rule 'nope'"),
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


def test_compare_pretrained_is_the_shipped_checkpoint(tmp_path, capsys):
    """``--pretrained NAME`` compares the shipped rule: the same learned row as ``--rule`` on its file."""
    import l2o.pretrained

    entry = next(e for e in l2o.list_pretrained() if e["name"] == "quadratic")
    shipped = Path(l2o.pretrained.__file__).parent / entry["file"]
    sizes = ["--horizon", "6", "--num-tasks", "5", "--num-tuning-tasks", "4", "--num-functions", "4"]
    reports = []
    for source in (["--pretrained", "quadratic"], ["--rule", str(shipped)]):
        js = tmp_path / f"{len(reports)}.json"
        code, out, _ = _run(capsys, "compare", "--task", "quadratic", *source, *sizes, "--no-progress", "--json", str(js))
        assert code == 0 and "learned" in out
        reports.append(json.loads(js.read_text()))
    assert reports[0]["rule"] == "pretrained 'quadratic'"
    assert reports[0]["results"]["learned"]["curve"] == reports[1]["results"]["learned"]["curve"]


def test_malformed_checkpoint_is_one_line_exit_2(tmp_path, capsys):
    torch.save({"format": "l2o.rule", "format_version": 7}, tmp_path / "old.pt")
    code, _, err = _run(capsys, "compare", "--task", "quadratic", "--rule", str(tmp_path / "old.pt"))
    assert code == 2 and "format_version 7" in err


# --- consistent subcommands, evaluate, list-pretrained, --device, progress, --json/--plot, exit codes ---

COMMANDS = ["meta-train", "compare", "evaluate", "list-pretrained", "maml"]
TINY_TRAIN = ["--task", "quadratic", "--epochs", "2", "--horizon", "10", "--truncation", "5", "--validate-every", "1",
              "--num-functions", "8", "--hidden-size", "6", "--no-progress", "--seed", "3"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_help_has_examples(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "example" in out and f"l2o {command}" in out.split("example", 1)[1]


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(command in out for command in COMMANDS)


def test_list_pretrained(tmp_path, capsys):
    code, out, _ = _run(capsys, "list-pretrained", "--json", str(tmp_path / "p.json"))
    header = out.splitlines()[0].split()
    assert code == 0 and header[:3] == ["name", "task", "description"] and "training command" in out.splitlines()[0]
    assert "quadratic" in out and "l2o meta-train" in out
    entries = json.loads((tmp_path / "p.json").read_text())
    assert [e["name"] for e in entries] == [e["name"] for e in __import__("l2o").list_pretrained()]


def test_meta_train_json_plot_and_summary_table(tmp_path, capsys):
    ckpt, js, png = tmp_path / "q.pt", tmp_path / "q.json", tmp_path / "q.png"
    code, out, _ = _run(capsys, "meta-train", *TINY_TRAIN, "--out", str(ckpt), "--json", str(js), "--plot", str(png))
    assert code == 0 and "best validation loss" in out and "meta-steps" in out
    report = json.loads(js.read_text())
    assert report["meta_steps"] == 4 and report["seed"] == 3 and report["device"] == "cpu"
    assert len(report["history"]["epoch_loss"]) == 2 and report["out"] == str(ckpt)
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert report["train_config"]["second_order"] is True  # the quadratic default


def test_meta_train_first_or_second_order(tmp_path, capsys):
    """--first-order overrides the quadratic default (second order) and changes the trained rule;
    giving both flags is a one-line usage error."""
    weights = {}
    for flag in ("--first-order", "--second-order"):
        js = tmp_path / f"{flag}.json"
        assert _run(capsys, "meta-train", *TINY_TRAIN, flag, "--out", str(tmp_path / f"{flag}.pt"), "--json", str(js))[0] == 0
        assert json.loads(js.read_text())["train_config"]["second_order"] is (flag == "--second-order")
        weights[flag] = torch.load(tmp_path / f"{flag}.pt", weights_only=True)["state_dict"]
    assert any(not torch.equal(weights["--first-order"][k], weights["--second-order"][k]) for k in weights["--first-order"])
    with pytest.raises(SystemExit) as exit_info:
        main(["meta-train", *TINY_TRAIN, "--first-order", "--second-order", "--out", str(tmp_path / "x.pt")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "not allowed with argument" in err and len(err.strip().splitlines()) == 1


def test_meta_train_nesterov_residual(tmp_path, capsys):
    """--nesterov-lr builds the rule with the NAG residual (its config and learned step size land in
    the checkpoint); a momentum outside [0, 1) is a one-line usage error that writes nothing."""
    ckpt = tmp_path / "nag.pt"
    argv = ["meta-train", *TINY_TRAIN, "--nesterov-lr", "0.05", "--nesterov-momentum", "0.8", "--zero-init-output"]
    assert _run(capsys, *argv, "--out", str(ckpt))[0] == 0
    data = torch.load(ckpt, weights_only=True)
    assert data["config"]["nesterov_lr"] == 0.05 and data["config"]["nesterov_momentum"] == 0.8
    assert "log_nesterov_lr" in data["state_dict"]
    code, _, err = _run(capsys, *argv[:-5], "--nesterov-lr", "0.05", "--nesterov-momentum", "1.5",
                        "--out", str(tmp_path / "bad.pt"))
    assert code == 2 and "nesterov_momentum" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad.pt").exists()


def test_meta_train_rnnprop_betas(tmp_path, capsys):
    """--rnnprop-betas reaches the rule (and its checkpoint); a malformed pair or a rate outside [0, 1)
    is a one-line usage error that writes nothing."""
    ckpt = tmp_path / "adam.pt"
    argv = ["meta-train", *TINY_TRAIN, "--preprocess", "rnnprop", "--adam-lr", "0.05", "--zero-init-output"]
    assert _run(capsys, *argv, "--rnnprop-betas", "0.9,0.999", "--out", str(ckpt))[0] == 0
    assert torch.load(ckpt, weights_only=True)["config"]["rnnprop_betas"] == [0.9, 0.999]
    for bad, message in (("0.9", "two numbers separated by a comma"), ("0.9,x", "expected a number"),
                         ("0.9,1.0", "rnnprop_betas[1]")):
        code, _, err = _run(capsys, *argv, "--rnnprop-betas", bad, "--out", str(tmp_path / "bad.pt"))
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "bad.pt").exists()


def test_threads_default_depends_on_the_task(tmp_path, capsys):
    """--threads: 1 on quadratics and for --distributed, up to 2 on MNIST; an explicit value wins."""
    from l2o.cli.common import default_threads

    assert default_threads("quadratic") == 1 and default_threads("mnist", distributed=True) == 1
    assert default_threads("mnist") == min(2, len(os.sched_getaffinity(0)))
    for extra, expected in (([], 1), (["--threads", "2"], 2)):
        ckpt = tmp_path / f"q{len(extra)}.pt"
        assert _run(capsys, "meta-train", *TINY_TRAIN, *extra, "--out", str(ckpt))[0] == 0
        assert torch.load(ckpt, weights_only=True)["provenance"]["cpu"]["threads"] == expected


def test_evaluate_matches_compare_learned_row(tmp_path, capsys):
    """`evaluate` runs the rule on the held-out tasks `compare` uses (same seeds), without tuning baselines."""
    ckpt = tmp_path / "q.pt"
    assert _run(capsys, "meta-train", *TINY_TRAIN, "--out", str(ckpt))[0] == 0
    sizes = ["--horizon", "12", "--num-tasks", "20", "--num-functions", "8"]
    code, _, err = _run(capsys, "compare", "--task", "quadratic", "--rule", str(ckpt), *sizes, "--num-tuning-tasks",
                        "8", "--json", str(tmp_path / "c.json"))
    assert code == 0 and "compare: tuning adam" in err  # the progress bar names the rule being tuned
    code, out, err = _run(capsys, "evaluate", "--task", "quadratic", "--rule", str(ckpt), *sizes,
                          "--json", str(tmp_path / "e.json"), "--plot", str(tmp_path / "e.png"))
    assert code == 0 and "loss@12 mean" in out and "evaluate on quadratic" in err
    learned = json.loads((tmp_path / "c.json").read_text())["results"]["learned"]
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["num_tasks"] == 20 and report["seed"] == 20_000 and report["trained_on"] == "quadratic"
    assert report["final_loss_mean"] == pytest.approx(learned["final_loss_mean"], rel=1e-6)
    assert report["final_loss_std"] == pytest.approx(learned["final_loss_std"], rel=1e-6)
    assert report["curve"] == pytest.approx(learned["curve"], rel=1e-6) and len(report["curve_std"]) == 13
    assert (tmp_path / "e.png").read_bytes()[:4] == b"\x89PNG"
    code, out, err = _run(capsys, "evaluate", "--task", "quadratic", "--rule", str(ckpt), *sizes, "--no-progress")
    assert code == 0 and err == ""


def test_evaluate_refuses_a_maml_checkpoint(tmp_path, capsys):
    from l2o.checkpoints import save_rule
    from l2o.rules import SGD

    save_rule(tmp_path / "m.pt", SGD(lr=0.01), {"mode": "maml"}, init={"w": torch.zeros(2)})
    code, _, err = _run(capsys, "evaluate", "--task", "quadratic", "--rule", str(tmp_path / "m.pt"))
    assert code == 2 and "MAML checkpoint" in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
@pytest.mark.parametrize("argv", [
    ["meta-train", "--task", "quadratic", "--out", "x.pt"],
    ["compare", "--task", "quadratic"],
    ["evaluate", "--task", "quadratic", "--rule", "x.pt"],
    ["maml", "--task", "sine", "--out", "x.pt"],
])
def test_device_cuda_without_cuda_is_one_line_exit_2(tmp_path, capsys, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    code, _, err = _run(capsys, *argv, "--device", "cuda")
    assert code == 2 and "CUDA is not available" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize("argv", [["compare", "--task", "quadratic", "--device", "tpu"],
                                  ["compare", "--task", "quadratic", "--plot", "r.gif"],
                                  ["evaluate", "--task", "quadratic"],
                                  ["evaluate", "--task", "quadratic", "--rule", "a.pt", "--pretrained", "quadratic"],
                                  ["compare", "--task", "quadratic", "--rule", "a.pt", "--pretrained", "quadratic"],
                                  ["list-pretrained", "--bogus"]])
def test_new_flags_bad_usage_exit_2(argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


def test_failure_while_running_is_one_line_exit_1(capsys, monkeypatch):
    import l2o.meta

    def boom(*args, **kwargs):
        raise RuntimeError("the device ran out of patience\nsecond line of detail")

    monkeypatch.setattr(l2o.meta, "compare", boom)
    monkeypatch.delenv("L2O_DEBUG", raising=False)
    code, _, err = _run(capsys, "compare", "--task", "quadratic", "--no-progress")
    assert code == 1
    assert err == ("l2o compare: error: RuntimeError: the device ran out of patience "
                   "(run with --debug or L2O_DEBUG=1 for the traceback)\n")


@pytest.mark.parametrize("error", [ValueError, TypeError, RuntimeError, KeyError, OSError])
@pytest.mark.parametrize("command", ["compare", "meta-train"])
def test_errors_raised_while_running_are_failures_exit_1(tmp_path, capsys, monkeypatch, error, command):
    """A ValueError/TypeError (or any other error) raised once the work has started is not bad usage:
    exit 1, one line naming its type, and the hint to see the traceback."""
    import l2o.meta

    def boom(*args, **kwargs):
        raise error("something inside broke")

    monkeypatch.setattr(l2o.meta, "compare" if command == "compare" else "meta_train", boom)
    monkeypatch.delenv("L2O_DEBUG", raising=False)
    argv = ["compare", "--task", "quadratic", "--no-progress"] if command == "compare" else \
        ["meta-train", *TINY_TRAIN, "--out", str(tmp_path / "x.pt")]
    code, _, err = _run(capsys, *argv)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"l2o {command}: error: {error.__name__}: ") and "something inside broke" in err
    assert err.strip().endswith("(run with --debug or L2O_DEBUG=1 for the traceback)") and "Traceback" not in err
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize("how", ["--debug before", "--debug after", "L2O_DEBUG=1", "L2O_DEBUG=0"])
def test_debug_prints_the_traceback(capsys, monkeypatch, how):
    import l2o.meta

    def boom(*args, **kwargs):
        raise ValueError("a bug deep inside\nits second line")

    monkeypatch.setattr(l2o.meta, "compare", boom)
    monkeypatch.delenv("L2O_DEBUG", raising=False)
    argv = ["compare", "--task", "quadratic", "--no-progress"]
    if how == "--debug before":
        argv = ["--debug", *argv]
    elif how == "--debug after":
        argv = [*argv, "--debug"]
    else:
        monkeypatch.setenv("L2O_DEBUG", how.split("=")[1])
    code, _, err = _run(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 1
    assert lines[-1] == "l2o compare: error: ValueError: a bug deep inside (run with --debug or L2O_DEBUG=1 for the traceback)"
    if how == "L2O_DEBUG=0":
        assert len(lines) == 1
    else:
        assert lines[0] == "Traceback (most recent call last):" and "in boom" in err
        assert "ValueError: a bug deep inside" in err and "its second line" in err


def test_interrupt_exits_130(capsys, monkeypatch):
    import l2o.meta

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(l2o.meta, "compare", interrupted)
    code, _, err = _run(capsys, "compare", "--task", "quadratic", "--no-progress")
    assert code == 130 and err == "l2o compare: interrupted\n"


def test_bad_values_checked_before_the_work_are_usage_errors(tmp_path, capsys, monkeypatch):
    """A ValueError from building what the arguments describe (a config, a rule) is bad usage (exit 2,
    one line, no hint), and the work never starts."""
    import l2o.meta
    from l2o.cli.common import UsageError, tasks_per_step

    started = []
    monkeypatch.setattr(l2o.meta, "meta_train", lambda *a, **k: started.append(1))
    code, _, err = _run(capsys, "meta-train", *TINY_TRAIN, "--nesterov-lr", "0.1", "--nesterov-momentum", "1.5",
                        "--out", str(tmp_path / "x.pt"))
    assert code == 2 and err.startswith("l2o meta-train: error: nesterov_momentum must be") and "--debug" not in err
    assert not started and len(err.strip().splitlines()) == 1
    with pytest.raises(UsageError, match="--tasks-per-step 3 must be a multiple of the number of ranks \\(2\\)"):
        tasks_per_step(argparse.Namespace(tasks_per_step=3), 2)
    assert tasks_per_step(argparse.Namespace(tasks_per_step=None), 2) == 2


def test_debug_on_the_command_line_of_the_installed_entry_point(tmp_path):
    """``python -m l2o``: a usage error is one line and exit 2; with --debug its traceback comes first."""
    argv = [sys.executable, "-m", "l2o", "compare", "--task", "quadratic", "--rule", str(tmp_path / "missing.pt")]
    env = {k: v for k, v in os.environ.items() if k != "L2O_DEBUG"}
    plain = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert plain.returncode == 2 and len(plain.stderr.strip().splitlines()) == 1
    assert plain.stderr.startswith("l2o compare: error: checkpoint") and "does not exist" in plain.stderr
    debug = subprocess.run([*argv, "--debug"], capture_output=True, text=True, timeout=300, env=env)
    assert debug.returncode == 2 and debug.stderr.startswith("Traceback (most recent call last):")
    assert debug.stderr.strip().splitlines()[-1] == plain.stderr.strip()


def test_debug_is_in_every_help(capsys):
    for argv in (["--help"], *([c, "--help"] for c in COMMANDS)):
        with pytest.raises(SystemExit):
            main(argv)
        assert "--debug" in capsys.readouterr().out, argv


def test_device_family_moves_tasks():
    """`--device` moves each sampled task with its `to` (checked here on the meta device, without a GPU)."""
    from l2o.cli.common import DeviceFamily, UsageError, on_device
    from optimizees.quadratic import QuadraticFamily
    from optimizees.sine import SineFamily

    meta = torch.device("meta")
    family = on_device(QuadraticFamily(num_functions=4), meta)
    assert isinstance(family, DeviceFamily) and family.name == "quadratic" and family.config()["num_functions"] == 4
    assert family.sample(torch.Generator().manual_seed(0)).W.device == meta
    sine = DeviceFamily(SineFamily(meta_batch_size=3), meta)
    assert sine.evaluation_tasks(num_tasks=5).support[0].device == meta and sine.shots == 10
    assert on_device(QuadraticFamily(), torch.device("cpu")).__class__ is QuadraticFamily

    class NoTo:
        name = "static"

        def sample(self, generator):
            return object()

    with pytest.raises(UsageError, match="cannot be moved to a device"):
        on_device(NoTo(), meta)


@pytest.mark.parametrize("argv", [["meta-train", "--task", "quadratic", "--out", "x.pt", "--bogus"],
                                  ["maml", "--task", "sine", "--out", "x.pt", "--iterations", "0"], ["frobnicate"]])
def test_usage_errors_are_one_line_pointing_at_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("l2o") and "error:" in err and "--help" in err


# --- the generalist rule, estimators and horizon schedules on the command line ---


def test_meta_train_generalist_writes_an_mlp_rule(tmp_path, capsys, shared_data_dir):
    out = tmp_path / "g.pt"
    code = main(["meta-train", "--task", "generalist", "--data", str(shared_data_dir), "--out", str(out),
                 "--epochs", "2", "--horizon", "12", "--min-horizon", "6", "--truncation", "6",
                 "--validate-every", "2", "--num-val-tasks", "2", "--val-horizon", "12", "--tasks-per-step", "2",
                 "--no-progress"])
    assert code == 0
    rule = load_rule(out)
    assert isinstance(rule, l2o.MLPRule)
    provenance = torch.load(out, weights_only=True)["provenance"]
    assert provenance["train_config"]["horizon_schedule"] == "log_uniform"
    assert provenance["train_config"]["objective"] == "log_loss"


def test_meta_train_generalist_components(tmp_path, capsys, shared_data_dir):
    """``--components`` picks the mixture: here only the optional Transformer language models."""
    out = tmp_path / "t.pt"
    code = main(["meta-train", "--task", "generalist", "--data", str(shared_data_dir), "--out", str(out),
                 "--components", "markov-transformer=1", "--epochs", "2", "--horizon", "8", "--min-horizon", "4",
                 "--truncation", "4", "--validate-every", "2", "--num-val-tasks", "1", "--val-horizon", "8",
                 "--tasks-per-step", "2", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    family = torch.load(out, weights_only=True)["provenance"]["task_config"]
    assert "markov-transformer32-v32" in json.dumps(family) and "mnist-mlp" not in json.dumps(family)


def test_components_help_names_the_mixtures_defaults():
    """The help text's default weights are written out by hand (building the parser imports no
    optimizees): they must be the mixture's."""
    from l2o.cli import build_parser
    from optimizees.generalist import COMPONENTS, OPTIONAL_COMPONENTS

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    text = next(a.help for a in sub.choices["meta-train"]._actions if "--components" in a.option_strings)
    assert "(default " + ",".join(f"{k}={v:g}" for k, v in COMPONENTS.items()) + ";" in text
    assert all(name in text for name in OPTIONAL_COMPONENTS)


_SHORT_QUADRATIC = ["--task", "quadratic", "--epochs", "2", "--horizon", "6", "--truncation", "3",
                    "--validate-every", "2", "--num-val-tasks", "1", "--no-progress"]


def test_meta_train_init_from_a_shipped_rule_and_from_a_checkpoint(tmp_path, capsys):
    """``--init-from`` fine-tunes: the run starts from the loaded rule's meta-params (not a fresh
    rule's), keeps its kind and size, and records where it started."""
    from l2o.checkpoints import load_rule
    from l2o.pretrained import list_pretrained, load_pretrained

    first, second = tmp_path / "a.pt", tmp_path / "b.pt"
    assert main(["meta-train", "--out", str(first), "--init-from", "quadratic", "--meta-lr", "1e-6", "--meta-lr-final", "1e-6",
                 *_SHORT_QUADRATIC]) == 0, capsys.readouterr().err
    shipped, tuned = load_pretrained("quadratic"), load_rule(first)
    assert tuned.config() == shipped.config()
    moved = max(float((a - b).abs().max()) for a, b in zip(tuned.parameters(), shipped.parameters()))
    assert 0 < moved < 1e-4  # a few meta-steps at lr 1e-6 from the shipped rule, far from any fresh one
    provenance = torch.load(first, weights_only=True)["provenance"]
    sha = next(e["sha256"] for e in list_pretrained() if e["name"] == "quadratic")
    assert provenance["init_from"] == {"pretrained": "quadratic", "sha256": sha}
    assert main(["meta-train", "--out", str(second), "--init-from", str(first), "--meta-lr", "1e-6", "--meta-lr-final", "1e-6",
                 *_SHORT_QUADRATIC]) == 0, capsys.readouterr().err
    again = torch.load(second, weights_only=True)["provenance"]["init_from"]
    assert again["checkpoint"] == str(first) and again["provenance"]["init_from"]["pretrained"] == "quadratic"


@pytest.mark.parametrize("argv, match", [
    (["--init-from", "quadratic", "--hidden-size", "4"], "--hidden-size shapes a new rule; --init-from quadratic"),
    (["--init-from", "quadratic", "--rule", "mlp", "--layers", "2"], "--rule, --layers shape a new rule"),
    (["--init-from", "no-such-rule"], "neither a shipped rule .* nor a checkpoint file"),
])
def test_meta_train_init_from_refuses_what_it_cannot_honour(tmp_path, capsys, argv, match):
    code = main(["meta-train", "--out", str(tmp_path / "x.pt"), *argv, *_SHORT_QUADRATIC])
    err = capsys.readouterr().err
    assert code == 2 and re.search(match, err) and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.pt").exists()


def test_meta_train_max_step_ratio_sets_the_mlp_rules_bound(tmp_path, capsys):
    from l2o.checkpoints import load_rule

    out = tmp_path / "bounded.pt"
    assert main(["meta-train", "--out", str(out), "--rule", "mlp", "--max-step-ratio", "1.5",
                 *_SHORT_QUADRATIC]) == 0, capsys.readouterr().err
    assert load_rule(out).max_step_ratio == 1.5
    again = tmp_path / "again.pt"
    assert main(["meta-train", "--out", str(again), "--init-from", str(out), "--max-step-ratio", "3",
                 *_SHORT_QUADRATIC]) == 0, capsys.readouterr().err
    assert load_rule(again).max_step_ratio == 3.0
    code = main(["meta-train", "--out", str(tmp_path / "x.pt"), "--rule", "lstm", "--max-step-ratio", "2",
                 *_SHORT_QUADRATIC])
    err = capsys.readouterr().err
    assert code == 2 and "--max-step-ratio bounds the steps of the mlp rule" in err
    assert not (tmp_path / "x.pt").exists()


def test_meta_train_init_from_a_damaged_checkpoint_names_it(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    code = main(["meta-train", "--out", str(tmp_path / "x.pt"), "--init-from", str(bad), *_SHORT_QUADRATIC])
    err = capsys.readouterr().err
    assert code == 2 and f"--init-from {str(bad)!r}: refusing to load" in err and bad.read_bytes() == b"not a checkpoint"


@pytest.mark.parametrize("argv, match", [
    (["--components", "markov-transformer"], "expected NAME=WEIGHT pairs"),
    (["--components", "quadratic=0"], "expected a positive number, got 0.0"),
    (["--components", "quadratic=1,quadratic=2"], "'quadratic' is named twice"),
])
def test_components_flag_rejects_bad_values(tmp_path, capsys, argv, match):
    with pytest.raises(SystemExit) as exc:
        main(["meta-train", "--task", "generalist", "--out", str(tmp_path / "x.pt"), *argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and match in err and len(err.strip().splitlines()) == 1, err


def test_meta_train_with_pes_on_quadratics(tmp_path, capsys):
    out = tmp_path / "q.pt"
    code = main(["meta-train", "--task", "quadratic", "--dim", "3", "--num-functions", "4", "--out", str(out),
                 "--epochs", "2", "--horizon", "10", "--truncation", "5", "--hidden-size", "4", "--first-order",
                 "--estimator", "pes", "--es-std", "0.05", "--tasks-per-step", "2", "--no-progress"])
    assert code == 0
    config = torch.load(out, weights_only=True)["provenance"]["train_config"]
    assert config["estimator"] == "pes" and config["es_std"] == 0.05 and config["tasks_per_step"] == 2


@pytest.mark.parametrize("argv, match", [
    (["meta-train", "--task", "quadratic", "--rule", "mlp", "--output-scale", "0.1", "--out", "x.pt"],
     "--output-scale configure the LSTM rule; drop them with --rule mlp"),
    (["meta-train", "--task", "quadratic", "--estimator", "es", "--second-order", "--out", "x.pt"],
     "second_order .* only estimator='tbptt'"),
    (["compare", "--task", "generalist"], "evaluated on held-out models by benchmarks/generalist.py"),
    (["meta-train", "--task", "quadratic", "--components", "quadratic=1", "--out", "x.pt"],
     "--components chooses the generalist mixture's components; --task quadratic has none"),
    (["meta-train", "--task", "generalist", "--components", "cifar=1", "--out", "x.pt"],
     r"unknown components \['cifar'\]"),
    (["meta-train", "--task", "quadratic", "--meta-lr", "1e-5", "--out", "x.pt"],
     r"meta_lr_final \(0.0001\) is above meta_lr \(1e-05\).*\(--meta-lr-final\)"),
    (["meta-train", "--task", "quadratic", "--min-horizon", "5", "--out", "x.pt"],
     "min_horizon is the shortest horizon of horizon_schedule='log_uniform'"),
])
def test_generalist_and_estimator_usage_errors_are_one_line_exit_2(tmp_path, capsys, monkeypatch, argv, match):
    monkeypatch.chdir(tmp_path)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and re.search(match, err) and len(err.strip().splitlines()) == 1, err
