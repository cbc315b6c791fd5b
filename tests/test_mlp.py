"""MNIST MLP optimizees, the random-scaling wrapper and MNIST meta-training on real data."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from l2o.meta import MetaTrainConfig, meta_train
from l2o.meta.evaluate import run_rule
from l2o.rules import Adam, LSTMRule
from l2o.tasks import META, TRAIN
from l2o.unroll import init_inner, loss_and_grads, unroll
from optimizees.mlp import NUM_TRAIN, MLPFamily, MLPTask, MNISTData
from optimizees.rescaled import RescaledFamily, RescaledTask
from tests.conformance import check_task


def _synthetic(n_train=300, n_eval=50, features=784, seed=0):
    g = torch.Generator().manual_seed(seed)
    train_x = torch.rand(n_train, features, generator=g)  # values in [0, 1)
    eval_x = torch.rand(n_eval, features, generator=g) + 2.0  # values in [2, 3): told apart from train
    return (train_x, torch.randint(10, (n_train,), generator=g), eval_x, torch.randint(10, (n_eval,), generator=g))


@pytest.mark.parametrize("kw", [dict(), dict(hidden=(40,)), dict(hidden=(20, 20)), dict(activation="relu"),
                                dict(activation="tanh", num_networks=3)])
def test_task_conforms(kw):
    check_task(MLPTask(*_synthetic(), batch_size=16, **kw))


def test_param_shapes_and_init_scale():
    task = MLPTask(*_synthetic(), hidden=(20, 20), num_networks=4)
    params = task.init(torch.Generator().manual_seed(0))
    assert {k: tuple(v.shape) for k, v in params.items()} == {
        "w0": (4, 784, 20), "b0": (4, 20), "w1": (4, 20, 20), "b1": (4, 20), "w2": (4, 20, 10), "b2": (4, 10)}
    assert abs(float(params["w0"].std()) * math.sqrt(784) - 1.0) < 0.05
    assert not params["w0"][0].equal(params["w0"][1]), "each network must get its own initial weights"


@pytest.mark.parametrize("activation", ["sigmoid", "relu", "tanh"])
def test_batched_loss_equals_per_network_nn_functional(activation):
    train_x, train_y, eval_x, eval_y = _synthetic()
    task = MLPTask(train_x, train_y, eval_x, eval_y, hidden=(7, 5), activation=activation, num_networks=3)
    gen = torch.Generator().manual_seed(1)
    params = task.init(gen)
    for p in params.values():  # nonzero biases so that they matter
        p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    x, y = task.sample_batch(TRAIN, gen)
    act = {"sigmoid": torch.sigmoid, "relu": torch.relu, "tanh": torch.tanh}[activation]
    losses = task.loss(params, (x, y))
    for b in range(3):
        h = act(F.linear(x[b], params["w0"][b].t(), params["b0"][b]))
        h = act(F.linear(h, params["w1"][b].t(), params["b1"][b]))
        ref = F.cross_entropy(F.linear(h, params["w2"][b].t(), params["b2"][b]), y[b])
        torch.testing.assert_close(losses[b], ref, rtol=1e-5, atol=1e-6)
    # the shared evaluation set gives every network its own loss on the same images
    ev = task.loss(params, task.sample_batch(META, gen))
    assert ev.shape == (3,) and torch.isfinite(ev).all()


def test_minibatches_never_contain_evaluation_images():
    task = MLPTask(*_synthetic(), batch_size=64, num_networks=5)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        x, y = task.sample_batch(TRAIN, gen)
        assert x.shape == (5, 64, 784) and y.shape == (5, 64)
        assert float(x.max()) < 1.0
    ex, _ = task.sample_batch(META, gen)
    assert float(ex.min()) >= 2.0


@pytest.mark.parametrize("bad, match", [
    (dict(activation="swish"), "activation must be one of"),
    (dict(hidden=(20, 0)), "hidden width"),
    (dict(batch_size=0), "batch_size"),
    (dict(num_networks=0), "num_networks"),
])
def test_bad_arguments_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        MLPTask(*_synthetic(), **bad)


def test_rescaled_task_is_the_same_problem_in_other_coordinates():
    task = MLPTask(*_synthetic(), hidden=(6,), num_networks=2)
    fam = RescaledFamily(type("F", (), {"sample": lambda self, g, **k: task, "name": "t"})(), 2.0)
    scaled = fam.sample(torch.Generator().manual_seed(3))
    assert isinstance(scaled, RescaledTask)
    c = torch.cat([v.reshape(-1) for v in scaled.scales.values()])
    assert float(c.min()) >= math.exp(-2.0) and float(c.max()) <= math.exp(2.0) and float(c.std()) > 0.5
    phi0 = scaled.init(torch.Generator().manual_seed(5))
    theta0 = task.init(torch.Generator().manual_seed(5))
    batch = task.sample_batch(TRAIN, torch.Generator().manual_seed(6))
    loss_s, grads_s = loss_and_grads(scaled, phi0, batch)
    loss_t, grads_t = loss_and_grads(task, theta0, batch)
    torch.testing.assert_close(loss_s, loss_t)
    for k in grads_t:  # chain rule: d/dphi f(c * phi) = c * grad f
        torch.testing.assert_close(grads_s[k], scaled.scales[k] * grads_t[k], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="max_log_scale"):
        RescaledFamily(fam, -1.0)


# ------------------------------------------------------------------------------------ real data


@pytest.fixture(scope="module")
def mnist(shared_data_dir) -> MNISTData:
    return MNISTData(shared_data_dir)


def test_mnist_data_splits(mnist):
    assert mnist.train_x.shape == (NUM_TRAIN, 784) and mnist.val_x.shape == (10_000, 784)
    assert mnist.test_x.shape == (10_000, 784) and mnist.test_y.shape == (10_000,)
    assert 0.0 <= float(mnist.train_x.min()) and float(mnist.train_x.max()) <= 1.0
    # train and val are disjoint slices of the 60,000 training images
    assert mnist.train_x.data_ptr() + mnist.train_x.numel() * 4 <= mnist.val_x.data_ptr()
    family = MLPFamily(mnist, num_networks=2)
    task = family.sample(torch.Generator().manual_seed(0))
    assert task.sample_batch(META, None)[0] is mnist.val_x
    assert family.with_eval_split("test").sample(torch.Generator()).sample_batch(META, None)[0] is mnist.test_x
    check_task(task)


def test_adam_trains_the_paper_mlp_on_real_data(mnist):
    family = MLPFamily(mnist, num_networks=4, eval_split="test")
    tasks = [family.sample(torch.Generator().manual_seed(0))]
    curves, final = run_rule(Adam(lr=0.01), tasks, steps=60, seed=0)
    assert curves.shape == (61, 4) and final.shape == (4,)
    assert float(curves[0].mean()) > 2.0 and float(final.mean()) < 0.9  # from chance (ln 10) to learning


def _drop_in_test_loss(mnist, make_opt, activation: type = torch.nn.Sigmoid) -> float:
    """Test loss of an ordinary 784-20-10 ``nn.Sequential`` after 100 real minibatch steps of ``make_opt``."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(784, 20), activation(), torch.nn.Linear(20, 10))
    opt = make_opt(model.parameters())
    gen = torch.Generator().manual_seed(1)
    for _ in range(100):
        idx = torch.randint(NUM_TRAIN, (128,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(mnist.train_x[idx]), mnist.train_y[idx]).backward()
        opt.step()
    with torch.no_grad():
        return float(F.cross_entropy(model(mnist.test_x), mnist.test_y))


def test_pretrained_mnist_rules_train_an_nn_module_as_a_drop_in(mnist):
    """The shipped MNIST rules, through l2o.LearnedOptimizer, train an ordinary sigmoid MLP on real
    minibatches: "mnist" (the Adam residual) and "mnist-nag" clearly better than lr-tuned Adam (its
    tuned lr, 0.0316), "mnist-paper" about as well."""
    import l2o

    adam = _drop_in_test_loss(mnist, lambda ps: torch.optim.Adam(ps, lr=0.0316))
    loss = {name: _drop_in_test_loss(mnist, lambda ps: l2o.LearnedOptimizer(ps, pretrained=name))
            for name in ("mnist", "mnist-nag", "mnist-paper")}
    assert loss["mnist"] < 0.95 * adam, (loss, adam)  # measured 0.297 vs 0.320 (0.93x)
    assert loss["mnist-nag"] < 0.92 * adam, (loss, adam)  # measured 0.274 (0.86x)
    assert loss["mnist-paper"] < 0.35 and loss["mnist-paper"] < 1.03 * adam, (loss, adam)  # measured 0.308


def test_pretrained_mnist_rules_on_relu_networks(mnist):
    """On ReLU networks (never seen in meta-training) "mnist" at its default lr, and "mnist-nag" at
    the documented lr=0.3 (scaling its whole step), beat Adam at its ReLU-tuned lr (0.0178)."""
    import l2o

    adam = _drop_in_test_loss(mnist, lambda ps: torch.optim.Adam(ps, lr=0.0178), torch.nn.ReLU)
    best = _drop_in_test_loss(mnist, lambda ps: l2o.LearnedOptimizer(ps, pretrained="mnist"), torch.nn.ReLU)
    nag = _drop_in_test_loss(mnist, lambda ps: l2o.LearnedOptimizer(ps, pretrained="mnist-nag", lr=0.3), torch.nn.ReLU)
    assert best < 0.95 * adam, (best, adam)  # measured 0.274 vs 0.305 (0.90x)
    assert nag < 0.95 * adam, (nag, adam)  # measured 0.264 (0.87x)


def test_mnist_meta_training_smoke(mnist):
    """A short real-data meta-training with the paper's configuration changes the rule and stays finite."""
    torch.manual_seed(0)
    rule = LSTMRule(hidden_size=8, preprocess="log_sign", output_scale=0.1)
    before = {k: v.clone() for k, v in rule.state_dict().items()}
    family = MLPFamily(mnist, hidden=(10,))
    config = MetaTrainConfig(epochs=2, horizon=6, truncation=3, validate_every=2, num_val_tasks=1)
    result = meta_train(rule, family, config, progress=False)
    assert result.meta_steps == 4 and result.skipped_steps == 0 and math.isfinite(result.best_val_loss)
    changed = [k for k, v in rule.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) == len(before)
    task = family.sample(torch.Generator().manual_seed(1))
    out = unroll(rule, task, init_inner(rule, task, torch.Generator().manual_seed(1)), steps=3,
                 generator=torch.Generator().manual_seed(2))
    assert torch.isfinite(out.losses).all()


def test_cli_meta_train_and_compare_on_mnist(shared_data_dir, tmp_path, capsys):
    import json

    from l2o.checkpoints import load_rule
    from l2o.cli import main

    out = tmp_path / "mnist.pt"
    code = main(["meta-train", "--task", "mnist", "--data", str(shared_data_dir), "--out", str(out), "--epochs", "1",
                 "--horizon", "4", "--truncation", "2", "--hidden-size", "4", "--validate-every", "1", "--no-progress"])
    assert code == 0 and out.exists()
    rule = load_rule(out)
    assert rule.preprocess == "log_sign" and rule.output_scale == 0.1  # the paper's MNIST configuration
    from l2o.cli.common import default_threads
    threads = torch.load(out, weights_only=True)["provenance"]["cpu"]["threads"]
    assert threads == default_threads("mnist") == min(2, len(os.sched_getaffinity(0)))  # MNIST's default
    report_path = tmp_path / "r.json"
    code = main(["compare", "--task", "mnist", "--data", str(shared_data_dir), "--rule", str(out), "--horizon", "3",
                 "--num-tasks", "2", "--num-tuning-tasks", "2", "--num-networks", "2", "--json", str(report_path)])
    assert code == 0
    report = json.loads(report_path.read_text())
    assert set(report["results"]) == {"learned", "sgd", "nag", "rmsprop", "adam"}
    for r in report["results"].values():
        assert len(r["curve"]) == 4 and math.isfinite(r["final_loss_mean"])
    assert "adam" in capsys.readouterr().out


def test_cli_mnist_without_data_names_the_fix(tmp_path, capsys, monkeypatch):
    from l2o.cli import main

    monkeypatch.delenv("L2O_DATA", raising=False)
    code = main(["meta-train", "--task", "mnist", "--data", str(tmp_path), "--out", str(tmp_path / "x.pt")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("l2o meta-train: error: MNIST train files not found")
    assert "train-images-idx3-ubyte" in err and "yann.lecun.com" in err and "Traceback" not in err
    assert not (tmp_path / "x.pt").exists()
