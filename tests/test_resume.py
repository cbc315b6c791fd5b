"""Reliable meta-training: resumable runs, crash-safe saves, faults, safe loading, bad inputs.

Every run here is tiny (3-d quadratics, horizon 10, truncation 5, 4 LSTM units), so the subprocess
tests cost mostly the interpreter's start-up.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import l2o.meta.trainer as trainer_module
import l2o.pretrained as pretrained
from l2o import CheckpointError, LSTMRule, load_rule, save_rule
from l2o.checkpoints import (TRAINING_STATE_FORMAT, TRAINING_STATE_VERSION, atomic_save, load_checkpoint,
                             load_training_state)
from l2o.cli import main
from l2o.meta import MetaTrainConfig, MetaTrainingError, meta_train
from optimizees.quadratic import QuadraticFamily, QuadraticTask
from tests.helpers import NaNAfterFamily, NaNTask, RandomNaNFamily

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread, as `l2o meta-train` uses: these tiny problems are overhead-bound and two
    threads on a shared 2-core machine made them ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(**kw) -> MetaTrainConfig:
    return MetaTrainConfig(**{"epochs": 4, "horizon": 10, "truncation": 5, "validate_every": 2, "seed": 3, **kw})


def _rule() -> LSTMRule:
    torch.manual_seed(0)
    return LSTMRule(hidden_size=4)


def _family() -> QuadraticFamily:
    return QuadraticFamily(dim=3, num_functions=8)


def _assert_same_tree(a, b, where="state"):
    """Bitwise equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_same_tree(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _assert_same_result(a, b):
    assert (a.meta_steps, a.skipped_steps, a.best_epoch, a.best_val_loss) == \
           (b.meta_steps, b.skipped_steps, b.best_epoch, b.best_val_loss)
    assert a.history == b.history
    _assert_same_tree(a.rule.state_dict(), b.rule.state_dict(), "rule")


def _comparable(state: dict) -> dict:
    """A training state without the wall-clock time it records."""
    out = dict(state)
    out["counters"] = {k: v for k, v in state["counters"].items() if k != "seconds"}
    return out


@pytest.fixture
def recorded_states(monkeypatch, tmp_path):
    """Copies of every training state a run writes, by meta-step (while ``record`` is on)."""
    states: dict[int, Path] = {}
    directory = tmp_path / "recorded"
    directory.mkdir()
    real = trainer_module.save_training_state
    control = {"record": True}

    def spy(path, state):
        out = real(path, state)
        if control["record"]:
            step = state["counters"]["meta_step"]
            states[step] = shutil.copy(path, directory / f"step{step}.pt")
        return out

    monkeypatch.setattr(trainer_module, "save_training_state", spy)
    return states, control


# ---------------------------------------------------------------------------------------------
# Resume == uninterrupted, in process


@pytest.mark.parametrize("kind", ["quadratic", "with-nan-tasks"])
def test_resume_from_any_meta_step_is_bitwise_identical(tmp_path, recorded_states, kind):
    """Training states written at meta-step k (mid-horizon for odd k: 2 truncations per horizon)
    continue exactly like the run that never stopped: weights, best weights, history, counters,
    Adam state and generators."""
    states, control = recorded_states

    def family():
        return _family() if kind == "quadratic" else RandomNaNFamily(_family(), p=0.3, limit=0.3)

    reference = meta_train(_rule(), family(), _config(epochs=5), progress=False)
    full = meta_train(_rule(), family(), _config(epochs=5), progress=False,
                      checkpoint_path=tmp_path / "run.state.pt", checkpoint_every=1)
    _assert_same_result(reference, full)  # writing training states does not perturb the run
    if kind != "quadratic":
        assert full.skipped_steps > 0  # the skip counters are part of what is resumed
    assert sorted(states) == list(range(1, full.meta_steps + 1))
    final = load_training_state(states[full.meta_steps])
    assert final["counters"]["epoch"] == 5 and final["current"] is None
    assert any(load_training_state(p)["current"] is not None for p in states.values())  # some mid-horizon

    control["record"] = False
    for k in sorted({1, 2, 3, 4, full.meta_steps - 1}):
        out = tmp_path / f"resumed{k}.state.pt"
        resumed = meta_train(_rule(), family(), _config(epochs=5), progress=False, resume=states[k],
                             checkpoint_path=out, checkpoint_every=1)
        assert resumed.resumed_at == k
        _assert_same_result(reference, resumed)
        _assert_same_tree(_comparable(final), _comparable(load_training_state(out)), f"final state after resume at {k}")


def test_resuming_a_finished_run_returns_its_result(tmp_path):
    path = tmp_path / "s.pt"
    done = meta_train(_rule(), _family(), _config(), progress=False, checkpoint_path=path, checkpoint_every=3)
    again = meta_train(LSTMRule(hidden_size=4), _family(), _config(), progress=False, resume=path)
    _assert_same_result(done, again)
    assert again.resumed_at == done.meta_steps


# ---------------------------------------------------------------------------------------------
# SIGKILL in the middle of `l2o meta-train`, then --resume


CLI_ARGS = ["--task", "quadratic", "--dim", "3", "--num-functions", "8", "--horizon", "10", "--truncation", "5",
            "--hidden-size", "4", "--validate-every", "5", "--seed", "3", "--no-progress"]


def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_rule(tmp_path, capsys):
    out, state = tmp_path / "killed.pt", tmp_path / "killed.pt.state.pt"
    epochs = 60  # 120 meta-steps: the first training state appears at meta-step 3 (mid-horizon)
    command = [sys.executable, "-m", "l2o", "meta-train", *CLI_ARGS, "--epochs", str(epochs), "--out", str(out),
               "--checkpoint-every", "3"]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        finished_early = proc.poll() is not None
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert not finished_early, f"the run ended before it could be killed (rc {proc.returncode})"
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    killed_at = load_training_state(state)["counters"]["meta_step"]
    assert 3 <= killed_at < 2 * epochs and killed_at % 3 == 0

    resumed = subprocess.run([*command, "--resume", str(state)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at meta-step" in resumed.stdout and "skipped 0" in resumed.stdout

    reference = tmp_path / "reference.pt"
    assert main(["meta-train", *CLI_ARGS, "--epochs", str(epochs), "--out", str(reference)]) == 0
    capsys.readouterr()
    got, want = load_checkpoint(out), load_checkpoint(reference)
    _assert_same_tree(want["state_dict"], got["state_dict"], "rule weights")
    for key in ("meta_steps", "skipped_steps", "best_epoch", "best_val_loss"):
        assert got["provenance"][key] == want["provenance"][key], key
    assert got["provenance"]["resumed_at_meta_step"] >= killed_at
    assert load_training_state(state)["counters"]["epoch"] == epochs  # the resumed run kept checkpointing


# ---------------------------------------------------------------------------------------------
# A process killed during a save leaves the previous file intact


_KILL_DURING_SAVE = textwrap.dedent("""
    import io, os, signal, sys
    import torch
    from l2o import LSTMRule, save_rule
    from l2o.meta import MetaTrainConfig, meta_train
    from optimizees.quadratic import QuadraticFamily

    torch.set_num_threads(1)
    what, where, path = sys.argv[1:4]
    die_at = 1 if what == "rule" else 3          # the rule file exists already; the state: its 3rd save
    calls = {"save": 0, "replace": 0}
    real_save, real_replace = torch.save, os.replace

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def save(obj, f, *args, **kwargs):
        calls["save"] += 1
        if where == "mid-write" and calls["save"] == die_at:
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            data = buf.getvalue()
            f.write(data[: len(data) // 2])       # half of the new file is on disk...
            f.flush()
            os.fsync(f.fileno())
            die()                                # ...when the process dies
        return real_save(obj, f, *args, **kwargs)

    def replace(src, dst):
        calls["replace"] += 1
        if where == "before-rename" and calls["replace"] == die_at:
            die()                                # the new file is complete but not yet renamed
        return real_replace(src, dst)

    torch.save, os.replace = save, replace
    if what == "rule":
        torch.manual_seed(1)
        save_rule(path, LSTMRule(hidden_size=5))
    else:
        torch.manual_seed(0)
        meta_train(LSTMRule(hidden_size=4), QuadraticFamily(dim=3, num_functions=8),
                   MetaTrainConfig(epochs=4, horizon=10, truncation=5, validate_every=2, seed=3),
                   progress=False, checkpoint_path=path, checkpoint_every=1)
    sys.exit("not killed")
""")


@pytest.mark.parametrize("where", ["mid-write", "before-rename"])
@pytest.mark.parametrize("what", ["rule", "training-state"])
def test_kill_during_a_save_leaves_the_previous_file_intact(tmp_path, what, where):
    path = tmp_path / "file.pt"
    if what == "rule":
        original = _rule()
        save_rule(path, original)
        before = path.read_bytes()
    script = tmp_path / "kill_during_save.py"
    script.write_text(_KILL_DURING_SAVE)
    proc = subprocess.run([sys.executable, str(script), what, where, str(path)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    strays = [p for p in tmp_path.iterdir() if p.name.startswith(".file.pt.") and p.name.endswith(".tmp")]
    assert len(strays) == 1 and strays[0].stat().st_size > 0  # it really died inside the save
    if what == "rule":
        assert path.read_bytes() == before
        _assert_same_tree(original.state_dict(), load_rule(path).state_dict())
    else:
        state = load_training_state(path)  # the 2nd training state, complete and resumable
        assert state["counters"]["meta_step"] == 2
        reference = meta_train(_rule(), _family(), _config(), progress=False)
        _assert_same_result(reference, meta_train(_rule(), _family(), _config(), progress=False, resume=path))


def test_atomic_save_syncs_file_and_directory_and_cleans_up(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)), real_fsync(fd)))
    path = atomic_save({"x": torch.arange(3)}, tmp_path / "sub" / "a.pt")
    assert synced == [False, True]  # the data, then the directory entry of the rename
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not the 0600 of a mkstemp file
    before = path.read_bytes()
    with pytest.raises(Exception):
        atomic_save({"x": lambda: 0}, path)  # unpicklable: fails inside torch.save
    assert path.read_bytes() == before and [p.name for p in path.parent.iterdir()] == ["a.pt"]
    with pytest.raises(IsADirectoryError):
        atomic_save({}, tmp_path)


# ---------------------------------------------------------------------------------------------
# Faults: NaN/Inf tasks mid-meta-training


class InfTask(QuadraticTask):
    """A quadratic whose loss becomes +inf once |θ| grows past ``limit``."""

    def __init__(self, W, y, limit: float) -> None:
        super().__init__(W, y)
        self.limit = limit

    def loss(self, params, batch=None):
        out = super().loss(params, batch)
        return out * torch.where(params["theta"].abs().amax(-1) > self.limit, float("inf"), 1.0)


class EveryOtherBadFamily:
    """Every 2nd task turns NaN or Inf once |θ| passes 0.05: some inner steps in, mid-horizon."""

    name = "every-other-bad"

    def __init__(self, bad: str) -> None:
        self.base, self.bad, self.count = _family(), bad, 0

    def sample(self, generator):
        task = self.base.sample(generator)
        self.count += 1
        if self.count % 2:
            return task
        return (NaNTask if self.bad == "nan" else InfTask)(task.W, task.y, limit=0.05)

    def config(self) -> dict:
        return {"bad": self.bad}


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_non_finite_tasks_mid_training_are_skipped_and_reported(capsys, bad):
    rule = _rule()
    result = meta_train(rule, EveryOtherBadFamily(bad), _config(epochs=6, validate_every=0), progress=True)
    assert result.skipped_steps >= 3
    assert all(torch.isfinite(p).all() for p in result.rule.parameters())
    assert f"skipped={result.skipped_steps}" in capsys.readouterr().err  # the progress bar's last postfix


def test_cli_summary_reports_skipped_meta_steps(tmp_path, capsys, monkeypatch):
    import l2o.cli.common as cli

    monkeypatch.setattr(cli, "task_families", lambda: {"quadratic": lambda a: EveryOtherBadFamily("nan")})
    out = tmp_path / "q.pt"
    # output scale 1: the rule's first steps are large enough that the bad tasks reach |θ| > 0.05 within the horizon
    code = main(["meta-train", *CLI_ARGS, "--epochs", "6", "--output-scale", "1", "--out", str(out)])
    stdout = capsys.readouterr().out
    skipped = load_checkpoint(out)["provenance"]["skipped_steps"]
    assert code == 0 and skipped >= 3
    assert f"skipped {skipped} of them (non-finite meta-loss or meta-gradient" in stdout
    assert all(torch.isfinite(v).all() for v in load_checkpoint(out)["state_dict"].values())


def test_too_many_consecutive_skips_stop_and_keep_the_last_good_state(tmp_path, recorded_states):
    states, _ = recorded_states
    path = tmp_path / "s.pt"
    rule = _rule()
    with pytest.raises(MetaTrainingError, match="3 consecutive"):
        meta_train(rule, NaNAfterFamily(_family(), good=3), _config(epochs=20, validate_every=0, max_consecutive_skips=3),
                   progress=False, checkpoint_path=path, checkpoint_every=1)
    last = max(states)
    assert path.read_bytes() == states[last].read_bytes()  # the last state written, untouched
    state = load_training_state(path)
    assert state["counters"]["meta_step"] == 3 * 2 + 2 and state["counters"]["consecutive_skips"] == 2
    weights = state["meta_params"]["rule"]
    assert all(torch.isfinite(v).all() for v in weights.values())
    _assert_same_tree(weights, rule.state_dict())  # the skipped meta-steps never reached the weights


def test_cli_consecutive_skips_exit_1_naming_the_intact_state(tmp_path, capsys, monkeypatch):
    import l2o.cli.common as cli

    # the family's first 2 draws are the validation tasks, the next 2 the first training tasks
    monkeypatch.setattr(cli, "task_families", lambda: {"quadratic": lambda a: NaNAfterFamily(_family(), good=4)})
    out = tmp_path / "q.pt"
    code = main(["meta-train", *CLI_ARGS, "--epochs", "40", "--out", str(out), "--checkpoint-every", "1"])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "20 consecutive" in err and f"intact in {out}.state.pt" in err
    state = load_training_state(f"{out}.state.pt")  # 2 good tasks (2 meta-steps each), then 19 skips
    assert not out.exists() and state["counters"]["meta_step"] == 2 * 2 + 19


# ---------------------------------------------------------------------------------------------
# Safe loading: malicious pickles, formats, versions, mismatched runs


class _CreatesFile:
    """Unpickling this creates ``path`` (proof that code ran)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _write_malicious(path: Path, marker: Path, form: str, payload: dict) -> None:
    data = {**payload, "evil": _CreatesFile(marker)}
    if form == "torch.save":
        torch.save(data, path)
    else:
        with open(path, "wb") as fh:
            pickle.dump(data, fh)
    with open(path, "rb") as fh:  # the payload is live: an unsafe load does create the file
        torch.load(fh, weights_only=False) if form == "torch.save" else pickle.load(fh)
    assert marker.exists()
    marker.unlink()


@pytest.mark.parametrize("form", ["torch.save", "pickle"])
def test_malicious_checkpoint_and_training_state_are_refused(tmp_path, capsys, form):
    marker = tmp_path / "pwned"
    ckpt, state = tmp_path / "evil.pt", tmp_path / "evil.state.pt"
    _write_malicious(ckpt, marker, form, {"format": "l2o.rule", "format_version": 1})
    _write_malicious(state, marker, form, {"format": TRAINING_STATE_FORMAT, "format_version": TRAINING_STATE_VERSION,
                                           "trainer": "meta_train"})
    with pytest.raises(CheckpointError, match="refusing to load .*can run code"):
        load_rule(ckpt)
    with pytest.raises(CheckpointError, match="refusing to load .*can run code"):
        load_training_state(state)
    with pytest.raises(CheckpointError, match="refusing to load"):
        meta_train(_rule(), _family(), _config(), progress=False, resume=state)
    code = main(["meta-train", *CLI_ARGS, "--epochs", "4", "--out", str(tmp_path / "x.pt"), "--resume", str(state)])
    err = capsys.readouterr().err
    assert code == 2 and "refusing to load" in err and len(err.strip().splitlines()) == 1
    code = main(["compare", "--task", "quadratic", "--rule", str(ckpt)])
    assert code == 2 and "refusing to load" in capsys.readouterr().err
    assert not marker.exists()


def test_malicious_pretrained_index_and_entry_are_refused(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    index = tmp_path / "index.json"
    monkeypatch.setattr(pretrained, "INDEX_PATH", index)
    _write_malicious(index, marker, "pickle", {"format_version": 1, "rules": []})  # a pickle as the index
    with pytest.raises(CheckpointError, match="not valid JSON"):
        pretrained.load_pretrained("quadratic")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        pretrained.list_pretrained()
    evil = tmp_path / "evil.pt"  # a pickle as an indexed checkpoint, with the right checksum
    _write_malicious(evil, marker, "torch.save", {"format": "l2o.rule", "format_version": 1})
    entry = {"name": "evil", "file": "evil.pt", "sha256": pretrained.sha256_file(evil), "description": "d",
             "task": "quadratic", "config": {"hidden_size": 4}, "command": "none"}
    index.write_text(json.dumps({"format_version": 1, "rules": [entry]}))
    with pytest.raises(CheckpointError, match="refusing to load"):
        pretrained.load_pretrained("evil")
    assert not marker.exists()


@pytest.fixture
def state_path(tmp_path):
    path = tmp_path / "s.pt"
    meta_train(_rule(), _family(), _config(epochs=2), progress=False, checkpoint_path=path, checkpoint_every=1)
    return path


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d.update(format_version=3), "format_version 3; this l2o reads format_version 2"),
    (lambda d: d.update(format="l2o.rule"), "not an l2o training state.*found a dict with format 'l2o.rule'"),
    (lambda d: d.update(trainer="maml"), "written by the 'maml' trainer"),
    (lambda d: d["meta_params"].update(init={}), r"meta-params of \['init', 'rule'\]"),
    (lambda d: d["meta_params"]["rule"].pop("out_bias"), "meta-params 'rule': expected tensors"),
    (lambda d: d["counters"].update(meta_step="7"), "'meta_step' should be int"),
    (lambda d: d["counters"].update(epoch=99), "do not fit"),
    (lambda d: d.update(generators={"train": torch.zeros(3, dtype=torch.uint8), "torch_global": torch.zeros(3)}),
     "malformed"),
])
def test_malformed_training_states_are_refused(tmp_path, state_path, mutate, match):
    data = load_training_state(state_path)
    mutate(data)
    torch.save(data, tmp_path / "bad.pt")
    rule = _rule()
    before = {k: v.clone() for k, v in rule.state_dict().items()}
    with pytest.raises(CheckpointError, match=match):
        meta_train(rule, _family(), _config(epochs=2), progress=False, resume=tmp_path / "bad.pt")
    _assert_same_tree(before, rule.state_dict())  # a refused resume leaves the rule as it was


def test_resume_with_a_different_run_is_refused_naming_the_fields(state_path):
    with pytest.raises(CheckpointError, match=r"config\.epochs \(in the file 2, now 3\).*rule\.config\.hidden_size"):
        meta_train(LSTMRule(hidden_size=5), _family(), _config(epochs=3), progress=False, resume=state_path)
    with pytest.raises(CheckpointError, match=r"task_family\.config\.dim"):
        meta_train(_rule(), QuadraticFamily(dim=4, num_functions=8), _config(epochs=2), progress=False, resume=state_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        meta_train(_rule(), _family(), _config(epochs=2), progress=False, resume=state_path.with_name("nope.pt"))
    with pytest.raises(CheckpointError, match="not an l2o training state"):
        load_training_state(save_rule(state_path.with_name("rule.pt"), _rule()))
    truncated = state_path.with_name("truncated.pt")
    truncated.write_bytes(state_path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="truncated"):
        load_training_state(truncated)


def test_a_family_that_redraws_a_different_task_is_refused(tmp_path, recorded_states):
    """Resuming mid-horizon redraws the task; a family with hidden state would redraw another one."""
    states, _ = recorded_states

    class Drifting:
        name = "drifting"

        def __init__(self):
            self.count = 0

        def sample(self, generator):
            self.count += 1
            task = _family().sample(generator)
            return QuadraticTask(task.W + self.count, task.y)

    meta_train(_rule(), Drifting(), _config(epochs=1, validate_every=0), progress=False,
               checkpoint_path=tmp_path / "s.pt", checkpoint_every=1)
    assert load_training_state(states[1])["current"] is not None
    family = Drifting()
    family.count = 5
    with pytest.raises(CheckpointError, match="drew a different task"):
        meta_train(_rule(), family, _config(epochs=1, validate_every=0), progress=False, resume=states[1])


# ---------------------------------------------------------------------------------------------
# Bad inputs: named errors in Python, one line and exit 2 on the command line


@pytest.mark.parametrize("kwargs, error, match", [
    ({"checkpoint_every": 2}, ValueError, "checkpoint_path and checkpoint_every go together"),
    ({"checkpoint_path": "x.pt"}, ValueError, "checkpoint_path and checkpoint_every go together"),
    ({"checkpoint_path": "x.pt", "checkpoint_every": 0}, ValueError, "checkpoint_every must be a positive integer"),
    ({"checkpoint_path": "x.pt", "checkpoint_every": 1.5}, ValueError, "checkpoint_every must be a positive integer"),
    ({"checkpoint_path": 3, "checkpoint_every": 1}, TypeError, "checkpoint_path must be a str"),
    ({"resume": 3}, TypeError, "resume must be the path of a training state"),
    ({"callback": "print"}, TypeError, "callback must be callable"),
    ({"config": {"epochs": 2}}, TypeError, "config must be a MetaTrainConfig"),
    ({"config": MetaTrainConfig(seed=1.5)}, ValueError, "seed must be an integer"),
    ({"config": MetaTrainConfig(meta_lr_final="small")}, ValueError, "meta_lr_final must be a positive number"),
    ({"config": MetaTrainConfig(meta_lr=1e-5)}, ValueError,
     r"meta_lr_final \(0.0001\) is above meta_lr \(1e-05\): the schedule decays"),
    ({"config": MetaTrainConfig(second_order="yes")}, ValueError, "second_order must be True or False"),
    ({"family": object()}, TypeError, "family must be a task family"),
    ({"rule": torch.nn.Linear(2, 2)}, TypeError, "rule must be an l2o rule"),
])
def test_meta_train_bad_arguments_are_named(tmp_path, monkeypatch, kwargs, error, match):
    monkeypatch.chdir(tmp_path)
    args = {"rule": _rule(), "family": _family(), "config": _config(), "progress": False, **kwargs}
    rule, family, config = args.pop("rule"), args.pop("family"), args.pop("config")
    with pytest.raises(error, match=match):
        meta_train(rule, family, config, **args)
    assert not (tmp_path / "x.pt").exists()


def test_checkpoint_path_that_is_a_directory_is_refused(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        meta_train(_rule(), _family(), _config(), progress=False, checkpoint_path=tmp_path, checkpoint_every=1)


@pytest.mark.parametrize("extra, match", [
    (["--state", "s.pt"], "--state needs --checkpoint-every N"),
    (["--checkpoint-every", "2", "--state", "x.pt"], "both be written to x.pt"),
    (["--checkpoint-every", "2", "--state", "."], "is a directory"),
    (["--resume", "missing.state.pt"], "training state 'missing.state.pt' does not exist"),
])
def test_cli_bad_resume_flags_are_one_line_exit_2(tmp_path, capsys, monkeypatch, extra, match):
    monkeypatch.chdir(tmp_path)
    code = main(["meta-train", *CLI_ARGS, "--epochs", "2", "--out", "x.pt", *extra])
    err = capsys.readouterr().err
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.pt").exists()


def test_cli_resume_with_other_arguments_is_one_line_exit_2(tmp_path, capsys):
    out = tmp_path / "q.pt"
    assert main(["meta-train", *CLI_ARGS, "--epochs", "2", "--out", str(out), "--checkpoint-every", "1"]) == 0
    capsys.readouterr()
    code = main(["meta-train", *CLI_ARGS, "--epochs", "3", "--out", str(out), "--resume", f"{out}.state.pt"])
    err = capsys.readouterr().err
    assert code == 2 and "config.epochs (in the file 2, now 3)" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv", [["--checkpoint-every", "0"], ["--checkpoint-every", "x"]])
def test_cli_checkpoint_every_must_be_positive(argv):
    with pytest.raises(SystemExit) as exc:
        main(["meta-train", "--task", "quadratic", "--out", "x.pt", *argv])
    assert exc.value.code == 2
