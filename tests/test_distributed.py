"""Meta-batches and distributed meta-training: ``tasks_per_step``, torch.distributed (gloo).

The multi-process tests launch real processes on this machine: one ``torchrun --nproc_per_node 2``
run (module fixture) that meta-trains in learned-optimizer and MAML mode, resumes a state written by
a single process, and runs ``l2o maml --distributed``; and ``l2o meta-train --distributed`` ranks
started directly with torchrun's environment, one of which is killed or stopped. Everything they
train is tiny (3-d quadratics and a 1-8-1 sine MLP), so they cost mostly interpreter start-up.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from l2o import LSTMRule
from l2o.checkpoints import CheckpointError, load_checkpoint, load_init, load_training_state
from l2o.cli import main
from l2o.maml import MAMLInit
from l2o.meta import MetaTrainConfig, MetaTrainingError, meta_train
from l2o.meta.schedules import task_generator
from tests.helpers import hand_maml_query_loss
from l2o.rules import SGD
from l2o.tasks import META
from optimizees.quadratic import QuadraticFamily
from optimizees.sine import SineFamily

REPO = Path(__file__).resolve().parents[1]
LR = 0.01


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The runs the single-process references and the ranks share (the worker script below repeats them).
def _config(**kw) -> MetaTrainConfig:
    return MetaTrainConfig(**{"epochs": 5, "horizon": 10, "truncation": 5, "validate_every": 2, "num_val_tasks": 3,
                              "seed": 3, "tasks_per_step": 2, **kw})


def _rule() -> LSTMRule:
    torch.manual_seed(0)
    return LSTMRule(hidden_size=4)


def _family() -> QuadraticFamily:
    return QuadraticFamily(dim=3, num_functions=8)


def _pes_config() -> MetaTrainConfig:
    """PES particles (one antithetic pair per task) with log-uniform horizons of 5..15 steps."""
    return _config(estimator="pes", es_std=0.05, horizon=15, horizon_schedule="log_uniform", min_horizon=5)


def _sine() -> SineFamily:
    return SineFamily(shots=5, query_shots=5, meta_batch_size=4, hidden=(8,))


def _maml_config(**kw) -> MetaTrainConfig:
    base = dict(epochs=4, horizon=2, truncation=2, meta_lr=1e-2, meta_lr_final=None, max_grad_norm=None,
                validate_every=2, num_val_tasks=3, seed=3, second_order=True, step_weights="final", meta_split=META,
                tasks_per_step=2)
    return MetaTrainConfig(**{**base, **kw})


def _maml_run(**kw):
    torch.manual_seed(0)
    init = MAMLInit(_sine().model())
    result = meta_train(SGD(lr=LR), _sine(), _maml_config(), progress=False, init=init, **kw)
    return result, {k: v.detach().clone() for k, v in init.params().items()}


def _assert_close_tree(a: dict, b: dict, where: str, exact: bool = False) -> None:
    assert a.keys() == b.keys(), where
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), f"{where}[{k!r}]"
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7, msg=lambda m: f"{where}[{k!r}]: {m}")


def _assert_same_history(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-9), k


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)
    return env


# ---------------------------------------------------------------------------------------------
# Meta-batches in one process (fast)


def test_tasks_per_step_is_validated():
    with pytest.raises(ValueError, match="tasks_per_step must be a positive integer"):
        meta_train(_rule(), _family(), _config(tasks_per_step=0), progress=False)
    with pytest.raises(ValueError, match="distributed=True needs torch.distributed to be initialised"):
        meta_train(_rule(), _family(), _config(), progress=False, distributed=True)


def test_task_generators_are_seeded_by_seed_and_global_index():
    draw = lambda seed, i: torch.randn(4, generator=task_generator(seed, i))  # noqa: E731
    assert torch.equal(draw(3, 5), draw(3, 5))
    assert not torch.equal(draw(3, 5), draw(3, 6)) and not torch.equal(draw(3, 5), draw(4, 5))


def _hand_maml_batch(model, family, config) -> dict[str, torch.Tensor]:
    """A meta-batch of MAML written out: task s of epoch e drawn from task_generator(seed, e*T + s),
    the meta-loss the mean over the T tasks (each a mean over its episodes), one Adam step."""
    opt = torch.optim.Adam(model.parameters(), lr=config.meta_lr)
    T = config.tasks_per_step
    for epoch in range(config.epochs):
        total = 0.0
        for s in range(T):
            gen = task_generator(config.seed, epoch * T + s)
            task = family.sample(gen)
            task.init(gen)  # the trainer draws (and discards) the task's own init too
            total = total + hand_maml_query_loss(model, task, config.horizon, LR)
        opt.zero_grad()
        (total / T).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_meta_batch_averages_the_tasks_meta_gradients():
    family = SineFamily(shots=5, query_shots=5, meta_batch_size=3, hidden=(8, 8), dtype=torch.float64)
    torch.manual_seed(0)
    model, twin = family.model(), family.model()
    twin.load_state_dict(model.state_dict())
    config = _maml_config(epochs=3, validate_every=0, tasks_per_step=3)
    init = MAMLInit(model)
    result = meta_train(SGD(lr=LR), family, config, progress=False, init=init)
    assert result.meta_steps == 3
    _assert_close_tree({k: v.detach() for k, v in init.params().items()}, _hand_maml_batch(twin, family, config),
                       "theta0")


def test_meta_batch_resumes_bitwise_from_mid_horizon(tmp_path):
    state, copy = tmp_path / "s.pt", tmp_path / "at3.pt"

    def keep_state_at_3(metrics):  # after epoch 1 (meta-step 4) the file holds meta-step 3: mid-horizon
        if metrics["epoch"] == 1.0:
            shutil.copy(state, copy)

    full = meta_train(_rule(), _family(), _config(), progress=False, checkpoint_path=state, checkpoint_every=3,
                      callback=keep_state_at_3)
    data = load_training_state(copy)
    assert data["counters"]["meta_step"] == 3 and data["world_size"] == 1
    assert [t["index"] for t in data["current"]["tasks"]] == [2, 3]
    resumed = meta_train(_rule(), _family(), _config(), progress=False, resume=copy)
    _assert_close_tree(full.rule.state_dict(), resumed.rule.state_dict(), "rule", exact=True)
    assert full.history == resumed.history and resumed.resumed_at == 3


def test_training_states_of_format_version_1_are_refused_naming_the_version(tmp_path):
    """Version 1 files drew a single task from one shared stream; this l2o cannot continue them."""
    path = tmp_path / "s.pt"
    config = _config(epochs=2, tasks_per_step=1)
    meta_train(_rule(), _family(), config, progress=False, checkpoint_path=path, checkpoint_every=1)
    data = load_training_state(path)
    data["format_version"] = 1
    torch.save(data, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match=r"format_version 1; this l2o reads format_version 2 \(written by "
                                              r"l2o 0\.1\.0.*start the run again\)"):
        meta_train(_rule(), _family(), config, progress=False, resume=tmp_path / "old.pt")


@pytest.mark.parametrize("env, argv, match", [
    ({}, ["--distributed"], "--distributed needs the environment torchrun sets"),
    ({"WORLD_SIZE": "2"}, [], "--distributed was not given"),
])
def test_cli_distributed_usage_errors_are_one_line_exit_2(tmp_path, capsys, monkeypatch, env, argv, match):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code = main(["meta-train", "--task", "quadratic", "--out", str(tmp_path / "x.pt"), "--epochs", "1", *argv])
    err = capsys.readouterr().err
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# Two gloo ranks under torchrun == one process running the same global meta-batch


_WORKER = textwrap.dedent('''
    import shutil, sys
    from pathlib import Path
    import torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[2])
    from tests.test_distributed import _config, _family, _maml_run, _pes_config, _rule
    from l2o.cli import main
    from l2o.meta import meta_train
    from l2o.meta.distributed import end_distributed_process

    torch.set_num_threads(1)
    out, single_state = Path(sys.argv[1]), Path(sys.argv[3])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    report = {}
    sys.stderr = open(out / f"stderr{rank}.txt", "w")  # each rank's progress output apart

    try:
        meta_train(_rule(), _family(), _config(tasks_per_step=3), progress=False, distributed=True)
    except ValueError as exc:
        report["indivisible"] = str(exc)

    # learned-optimizer mode, writing training states (rank 0 only); keep the one of meta-step 3
    state = out / f"rank{rank}.state.pt"
    def keep(metrics):
        if rank == 0 and metrics["epoch"] == 1.0:
            shutil.copy(state, out / "w2_at3.state.pt")
    result = meta_train(_rule(), _family(), _config(), progress=True, distributed=True, checkpoint_path=state,
                        checkpoint_every=3, callback=keep)
    report["learned"] = {"rule": result.rule.state_dict(), "history": result.history, "meta_steps": result.meta_steps}

    # resume, on 2 ranks, a state written by a single process (mid-horizon, meta-step 3)
    resumed = meta_train(_rule(), _family(), _config(), progress=False, distributed=True, resume=single_state)
    report["resumed"] = {"rule": resumed.rule.state_dict(), "history": resumed.history, "at": resumed.resumed_at}

    # MAML mode
    result, theta0 = _maml_run(distributed=True)
    report["maml"] = {"init": theta0, "history": result.history}

    # PES: the particles of the meta-batch spread over the ranks
    result = meta_train(_rule(), _family(), _pes_config(), progress=False, distributed=True)
    report["pes"] = {"rule": result.rule.state_dict(), "history": result.history, "meta_steps": result.meta_steps}

    # the CLI on the already initialised process group: rank 0 alone writes --out and --json
    code = main(["maml", "--task", "sine", "--out", str(out / f"cli{rank}.pt"), "--json", str(out / f"cli{rank}.json"),
                 "--iterations", "3", "--meta-batch", "4", "--shots", "5", "--query-shots", "5",
                 "--validate-every", "2", "--num-val-tasks", "3", "--eval-tasks", "8", "--eval-steps", "1",
                 "--no-progress", "--distributed", "--tasks-per-step", "2"])
    report["cli_code"] = code
    torch.save(report, out / f"report{rank}.pt")
    sys.stderr.close()
    dist.destroy_process_group()
    end_distributed_process(0)  # skip interpreter finalisation (a gloo teardown race aborts it)
''')


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Single-process references, then one ``torchrun --nproc_per_node 2`` launch of the worker."""
    out = tmp_path_factory.mktemp("two_ranks")
    refs = {}
    state = out / "single.state.pt"

    def keep(metrics):
        if metrics["epoch"] == 1.0:
            shutil.copy(state, out / "w1_at3.state.pt")

    refs["learned"] = meta_train(_rule(), _family(), _config(), progress=False, checkpoint_path=state,
                                 checkpoint_every=3, callback=keep)
    refs["maml"] = _maml_run()
    refs["pes"] = meta_train(_rule(), _family(), _pes_config(), progress=False)
    script = out / "worker.py"
    script.write_text(_WORKER)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), str(script), str(out), str(REPO), str(out / "w1_at3.state.pt")]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=out, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    reports = [torch.load(out / f"report{r}.pt", weights_only=True) for r in (0, 1)]
    return {"out": out, "refs": refs, "reports": reports, "stderr": proc.stderr, "seconds": time.perf_counter() - start}


def test_two_ranks_equal_one_process_learned_optimizer(two_ranks):
    """Two ranks train what one process trains: after 10 meta-steps (5 epochs of a meta-batch of 2 quadratics, 2
    truncations each) the LSTM weights of both ranks equal those of one process with the same
    global meta-batch and task seeds; so do the meta-loss and validation histories."""
    ref = two_ranks["refs"]["learned"]
    for rank, report in enumerate(two_ranks["reports"]):
        got = report["learned"]
        assert got["meta_steps"] == ref.meta_steps == 10
        _assert_close_tree(ref.rule.state_dict(), got["rule"], f"rank {rank} rule")
        _assert_same_history(ref.history, got["history"])
    assert len(ref.history["val_loss"]) == 3  # validation (3 tasks split 2 + 1 over the ranks) ran


def test_two_ranks_equal_one_process_pes(two_ranks):
    """PES particles spread over the ranks (each rank runs its tasks' antithetic pairs) give the
    rule and histories of one process running them all."""
    ref = two_ranks["refs"]["pes"]
    for rank, report in enumerate(two_ranks["reports"]):
        got = report["pes"]
        assert got["meta_steps"] == ref.meta_steps
        _assert_close_tree(ref.rule.state_dict(), got["rule"], f"rank {rank} rule")
        _assert_same_history(ref.history, got["history"])


def test_two_ranks_equal_one_process_maml(two_ranks):
    ref_result, ref_theta0 = two_ranks["refs"]["maml"]
    for rank, report in enumerate(two_ranks["reports"]):
        _assert_close_tree(ref_theta0, report["maml"]["init"], f"rank {rank} theta0")
        _assert_same_history(ref_result.history, report["maml"]["history"])
    assert not all(torch.equal(ref_theta0[k], v.detach()) for k, v in _sine().model().named_parameters())


def test_world_size_must_divide_the_meta_batch(two_ranks):
    for report in two_ranks["reports"]:
        assert "tasks_per_step (3) must be a multiple of the number of ranks (2)" in report["indivisible"]


def test_rank_0_alone_writes_the_gathered_training_state_and_shows_progress(two_ranks):
    out = two_ranks["out"]
    assert (out / "rank0.state.pt").is_file() and not (out / "rank1.state.pt").exists()
    state = load_training_state(out / "w2_at3.state.pt")
    assert state["world_size"] == 2 and state["counters"]["meta_step"] == 3
    assert [t["index"] for t in state["current"]["tasks"]] == [2, 3]  # both ranks' tasks in progress
    assert len(state["generators"]["torch_global_by_rank"]) == 2
    assert "meta-train quadratic" in (out / "stderr0.txt").read_text()  # progress=True on both ranks
    assert "meta-train" not in (out / "stderr1.txt").read_text()
    # `l2o maml --distributed`: rank 0 wrote the checkpoint and the report, rank 1 nothing
    assert [r["cli_code"] for r in two_ranks["reports"]] == [0, 0]
    assert (out / "cli0.pt").is_file() and not (out / "cli1.pt").exists() and not (out / "cli1.json").exists()
    provenance = load_checkpoint(out / "cli0.pt")["provenance"]
    assert provenance["world_size"] == 2 and provenance["train_config"]["tasks_per_step"] == 2
    assert json.loads((out / "cli0.json").read_text())["config"]["tasks_per_step"] == 2


def test_cli_maml_on_two_ranks_equals_one_process(two_ranks, tmp_path, capsys):
    out = tmp_path / "one.pt"
    code = main(["maml", "--task", "sine", "--out", str(out), "--iterations", "3", "--meta-batch", "4", "--shots", "5",
                 "--query-shots", "5", "--validate-every", "2", "--num-val-tasks", "3", "--eval-tasks", "8",
                 "--eval-steps", "1", "--no-progress", "--tasks-per-step", "2"])
    capsys.readouterr()
    assert code == 0
    _assert_close_tree(load_init(out), load_init(two_ranks["out"] / "cli0.pt"), "theta0")


def test_resume_across_world_sizes(two_ranks):
    """A mid-horizon training state written by one process, resumed on 2 ranks, and one written by
    2 ranks, resumed in one process, both finish like the uninterrupted run (tasks are drawn by
    global index, and the state holds every task in progress)."""
    ref = two_ranks["refs"]["learned"]
    for rank, report in enumerate(two_ranks["reports"]):
        assert report["resumed"]["at"] == 3
        _assert_close_tree(ref.rule.state_dict(), report["resumed"]["rule"], f"W=1 -> W=2, rank {rank}")
        _assert_same_history(ref.history, report["resumed"]["history"])
    resumed = meta_train(_rule(), _family(), _config(), progress=False, resume=two_ranks["out"] / "w2_at3.state.pt")
    assert resumed.resumed_at == 3
    _assert_close_tree(ref.rule.state_dict(), resumed.rule.state_dict(), "W=2 -> W=1")
    _assert_same_history(ref.history, resumed.history)


# ---------------------------------------------------------------------------------------------
# A rank that dies (or hangs) makes the other fail with a clear error, not hang


@pytest.mark.parametrize("fault", ["SIGKILL", pytest.param("SIGSTOP", marks=pytest.mark.slow)])  # ~10 s, ~20 s
def test_a_dead_or_hung_rank_makes_the_other_fail_with_a_clear_error(tmp_path, fault):
    """Two ``l2o meta-train --distributed`` ranks started with torchrun's environment (no agent that
    would kill the survivors for us); once rank 0 has written a training state, rank 1 is killed
    (SIGKILL: its sockets close) or stopped (SIGSTOP: it hangs). Rank 0 exits 1 with a one-line
    error within the --dist-timeout, and the training state is intact."""
    timeout = 10
    out, state = tmp_path / "q.pt", tmp_path / "q.pt.state.pt"
    argv = [sys.executable, "-m", "l2o", "meta-train", "--task", "quadratic", "--dim", "3", "--num-functions", "8",
            "--horizon", "10", "--truncation", "5", "--hidden-size", "4", "--validate-every", "5", "--seed", "3",
            "--no-progress", "--epochs", "100000", "--out", str(out), "--checkpoint-every", "3", "--distributed",
            "--tasks-per-step", "2", "--dist-timeout", str(timeout)]
    port = str(_free_port())
    procs = [subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=port))
             for r in (0, 1)]
    try:
        deadline = time.monotonic() + 300
        while not state.exists() and all(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert state.exists() and all(p.poll() is None for p in procs), [p.poll() for p in procs]
        procs[1].send_signal(getattr(signal, fault))
        hit = time.monotonic()
        _, err = procs[0].communicate(timeout=timeout + 120)
        waited = time.monotonic() - hit
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert procs[0].returncode == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "distributed meta-training failed on rank 0 of 2 at meta-step" in lines[0], err
    assert "another rank has probably died" in lines[0].lower() and f"{state} is intact" in lines[0]
    assert waited < timeout + 60  # the collective's timeout bounds the wait (SIGKILL: the closed socket, at once)
    data = load_training_state(state)  # intact and resumable
    assert data["counters"]["meta_step"] % 3 == 0 and data["world_size"] == 2
    assert all(torch.isfinite(v).all() for v in data["meta_params"]["rule"].values())
    assert not out.exists()


def test_failed_collective_becomes_meta_training_error(tmp_path):
    """In process: the conversion itself (a gloo error from a collective -> MetaTrainingError)."""
    from l2o.meta.distributed import Distributed

    d = Distributed(False)
    d.step, d.state_path = 7, str(tmp_path / "s.pt")
    (tmp_path / "s.pt").write_bytes(b"x")

    def boom():
        raise RuntimeError("[gloo] Connection closed by peer [127.0.0.1]:1234\nmore")

    with pytest.raises(MetaTrainingError, match=r"rank 0 of 1 at meta-step 7: the test .* Connection closed by peer "
                                                r"\[127.0.0.1\]:1234\). Another rank .*s\.pt is intact"):
        d._call("the test", boom)
