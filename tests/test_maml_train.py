"""MAML mode of the trainer (``meta_train(init=...)``) and ``l2o maml``."""

from __future__ import annotations

import json
import math

import pytest
import torch

from l2o.checkpoints import CheckpointError, load_init, load_rule, save_rule
from l2o.cli import main
from l2o.maml import MAMLInit
from l2o.meta import MetaTrainConfig, meta_train
from l2o.meta.schedules import task_generator
from l2o.rules import SGD, MetaSGD
from l2o.tasks import META
from optimizees.sine import SineFamily
from tests.helpers import hand_maml_query_loss

LR = 0.01


def _config(**kw) -> MetaTrainConfig:
    base = dict(epochs=3, horizon=2, truncation=2, meta_lr=1e-2, meta_lr_final=None, max_grad_norm=None,
                validate_every=0, seed=3, second_order=True, step_weights="final", meta_split=META)
    return MetaTrainConfig(**{**base, **kw})


def _hand_maml(model, family, config, first_order: bool) -> dict[str, torch.Tensor]:
    """MAML written out: per task, K SGD steps on the support set, query loss, Adam on θ0."""
    opt = torch.optim.Adam(model.parameters(), lr=config.meta_lr)
    for epoch in range(config.epochs):
        gen = task_generator(config.seed, epoch)  # task s of round e has index e * tasks_per_step + s
        task = family.sample(gen)
        task.init(gen)  # the trainer draws (and discards) the task's own init too
        opt.zero_grad()
        hand_maml_query_loss(model, task, config.horizon, LR, first_order).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("first_order", [False, True])
def test_maml_mode_equals_maml_written_out(first_order):
    family = SineFamily(shots=5, query_shots=5, meta_batch_size=3, hidden=(8, 8), dtype=torch.float64)
    torch.manual_seed(0)
    model = family.model()
    twin = family.model()
    twin.load_state_dict(model.state_dict())
    config = _config(second_order=not first_order)
    init = MAMLInit(model)
    result = meta_train(SGD(lr=LR), family, config, progress=False, init=init)
    expected = _hand_maml(twin, family, config, first_order)
    assert result.init is init and result.meta_steps == 3
    for k, v in init.params().items():
        torch.testing.assert_close(v.detach(), expected[k], rtol=1e-10, atol=1e-12)
        assert not torch.equal(v.detach(), dict(family.model().named_parameters())[k].detach())


def test_metasgd_rates_and_init_are_both_meta_trained():
    family = SineFamily(shots=5, query_shots=5, meta_batch_size=4, hidden=(8,))
    torch.manual_seed(0)
    model = family.model()
    rule = MetaSGD(model, lr=LR)
    before_rule = {k: v.clone() for k, v in rule.state_dict().items()}
    before_init = {k: v.detach().clone() for k, v in model.named_parameters()}
    meta_train(rule, family, _config(horizon=1, truncation=1), progress=False, init=MAMLInit(model))
    assert all(not torch.equal(v, before_rule[k]) for k, v in rule.state_dict().items())
    assert all(not torch.equal(v.detach(), before_init[k]) for k, v in model.named_parameters())


def test_maml_validation_reads_the_query_loss_after_adaptation():
    family = SineFamily(shots=5, query_shots=5, meta_batch_size=4, hidden=(8,))
    torch.manual_seed(0)
    init = MAMLInit(family.model())
    result = meta_train(SGD(lr=LR), family, _config(epochs=4, validate_every=2, num_val_tasks=2), progress=False,
                        init=init)
    assert result.history["val_epoch"] == [2.0, 4.0] and all(math.isfinite(v) for v in result.history["val_loss"])


def test_maml_mode_resumes_bitwise(tmp_path):
    import shutil

    family = SineFamily(shots=5, query_shots=5, meta_batch_size=4, hidden=(8,))
    state, copy = tmp_path / "s.pt", tmp_path / "at3.pt"

    def keep_state_after_3(metrics):
        if metrics["epoch"] == 2.0:  # the 3rd meta-iteration is done and its state written
            shutil.copy(state, copy)

    def run(**kw):
        torch.manual_seed(0)
        init = MAMLInit(family.model())
        meta_train(SGD(lr=LR), family, _config(epochs=6, validate_every=2), progress=False, init=init, **kw)
        return {k: v.detach().clone() for k, v in init.params().items()}

    full = run(checkpoint_path=state, checkpoint_every=3, callback=keep_state_after_3)
    assert copy.is_file()
    resumed = run(resume=copy)
    assert all(torch.equal(resumed[k], full[k]) for k in full)
    assert not all(torch.equal(resumed[k], v.detach()) for k, v in family.model().named_parameters())


def test_init_with_the_wrong_model_is_refused():
    family = SineFamily(shots=5, query_shots=5, meta_batch_size=2, hidden=(8,))
    other = SineFamily(hidden=(4,)).model()
    with pytest.raises(ValueError, match="learned initialisation's"):
        meta_train(SGD(lr=LR), family, _config(), progress=False, init=MAMLInit(other))
    with pytest.raises(TypeError, match="init must be an nn.Module"):
        meta_train(SGD(lr=LR), family, _config(), progress=False, init=object())


def test_checkpoint_carries_the_init(tmp_path):
    model = SineFamily(hidden=(8,)).model()
    path = save_rule(tmp_path / "m.pt", SGD(lr=LR), init=MAMLInit(model).params())
    loaded = load_init(path)
    assert loaded.keys() == dict(model.named_parameters()).keys()
    assert all(torch.equal(loaded[k], v.detach()) for k, v in model.named_parameters())
    plain = save_rule(tmp_path / "r.pt", SGD(lr=LR))
    with pytest.raises(CheckpointError, match="no learned initialisation"):
        load_init(plain)


def test_cli_maml_sine(tmp_path, capsys):
    out, js = tmp_path / "sine.pt", tmp_path / "sine.json"
    code = main(["maml", "--task", "sine", "--out", str(out), "--json", str(js), "--iterations", "30",
                 "--validate-every", "10", "--eval-tasks", "50", "--eval-steps", "3", "--no-progress",
                 "--plot", str(tmp_path / "sine.png")])
    assert code == 0
    report = json.loads(js.read_text())
    ev = report["eval"]
    assert report["algorithm"] == "MAML" and ev["num_tasks"] == 50 and len(ev["loss_mean"]) == 4
    assert ev["loss_mean"][1] < ev["loss_mean"][0]  # one adaptation step helps
    assert isinstance(load_rule(out), SGD) and set(load_init(out)) == set(dict(SineFamily().model().named_parameters()))
    assert "held-out query loss after 1 step(s)" in capsys.readouterr().out
    assert (tmp_path / "sine.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_maml_meta_lr_decay_reaches_the_trainer(tmp_path):
    js = tmp_path / "d.json"
    code = main(["maml", "--task", "sine", "--out", str(tmp_path / "d.pt"), "--json", str(js), "--iterations", "4",
                 "--validate-every", "2", "--eval-tasks", "4", "--meta-lr-final", "1e-4", "--no-progress"])
    assert code == 0
    config = json.loads(js.read_text())["config"]
    assert config["meta_lr"] == 1e-3 and config["meta_lr_final"] == 1e-4


@pytest.mark.parametrize("argv, match", [
    (["maml", "--task", "rosenbrock", "--out", "x.pt"], "unknown task 'rosenbrock' for maml"),
    (["maml", "--task", "sine", "--out", "x.pt", "--state", "s.pt"], "--state needs --checkpoint-every"),
])
def test_cli_maml_bad_input(tmp_path, capsys, monkeypatch, argv, match):
    monkeypatch.chdir(tmp_path)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.pt").exists()


def test_cli_maml_omniglot_smoke(shared_data_dir, tmp_path):
    """A tiny real-data Omniglot run through the CLI: trains, evaluates accuracy on held-out characters."""
    js = tmp_path / "o.json"
    code = main(["maml", "--task", "omniglot", "--data", str(shared_data_dir), "--out", str(tmp_path / "o.pt"),
                 "--json", str(js), "--iterations", "2", "--meta-batch", "2", "--channels", "4", "--query-shots", "2",
                 "--first-order", "--validate-every", "1", "--num-val-tasks", "1", "--eval-tasks", "4", "--no-progress"])
    assert code == 0
    ev = json.loads(js.read_text())["eval"]
    assert ev["num_tasks"] == 4 and len(ev["accuracy_mean"]) == 4
    assert all(0.0 <= a <= 1.0 for a in ev["accuracy_mean"])


def test_zero_last_layer_zeroes_only_the_output_head():
    from l2o.cli.maml import zero_last_linear

    model = SineFamily(hidden=(8, 8)).model()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    zero_last_linear(model)
    for k, v in model.named_parameters():
        if k.startswith("net.4."):  # the last Linear of 1-8-8-1
            assert not v.any()
        else:
            assert torch.equal(v, before[k])
