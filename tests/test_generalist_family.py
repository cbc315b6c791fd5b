"""The generalist meta-training distribution (optimizees.generalist) and the sequence family."""

from __future__ import annotations

import math

import pytest
import torch

from l2o.tasks import META, TRAIN
from l2o.unroll import loss_and_grads
from optimizees.generalist import COMPONENTS, generalist_family, random_convnet, random_mlp
from optimizees.sequence import MarkovChain, sequence_family
from optimizees.transformer import TransformerLanguageModel
from tests.conformance import check_task


@pytest.fixture(scope="module")
def family(shared_data_dir):
    return generalist_family(shared_data_dir)


def test_every_component_is_drawn_and_its_tasks_conform(family):
    names = {}
    for seed in range(60):
        g = torch.Generator().manual_seed(seed)
        task = family.sample(g)
        key = type(task).__name__ + ":" + type(getattr(task, "model", task)).__name__
        names[key] = task
    assert {"ModuleTask:Sequential", "ModuleTask:GRULanguageModel", "QuadraticTask:QuadraticTask"} <= set(names)
    for task in names.values():
        check_task(task)
        held_out = task.sample_batch(META, torch.Generator().manual_seed(0))
        assert torch.isfinite(task.loss(task.init(torch.Generator().manual_seed(0)), held_out)).all()


def test_tasks_are_redrawn_identically_from_the_generator(family):
    for seed in (0, 7, 19):
        a = family.sample(torch.Generator().manual_seed(seed))
        b = family.sample(torch.Generator().manual_seed(seed))
        pa, pb = a.init(torch.Generator().manual_seed(1)), b.init(torch.Generator().manual_seed(1))
        assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
        ba, bb = a.sample_batch(TRAIN, torch.Generator().manual_seed(2)), b.sample_batch(TRAIN, torch.Generator().manual_seed(2))
        assert torch.equal(a.loss(pa, ba), b.loss(pb, bb))


def test_no_test_image_is_in_any_task(shared_data_dir):
    """MNIST tasks read the first 50,000 training images and 1000 of the others (held out);
    Omniglot tasks read only the meta-training characters."""
    from optimizees.mlp import MNISTData

    mnist = MNISTData(shared_data_dir)
    fam = generalist_family(shared_data_dir, components={"mnist-mlp": 1.0, "omniglot-conv": 1.0})
    for seed in range(10):
        task = fam.sample(torch.Generator().manual_seed(seed))
        data = task.batch_fn
        if data.x.shape[0] == 50_000:
            assert torch.equal(data.x.reshape(50_000, -1), mnist.train_x)
            assert torch.equal(data.held_out[0].reshape(1000, -1), mnist.val_x[:1000])
        else:
            assert data.x.shape[0] in (5 * 15, 10 * 15, 20 * 15)


def test_random_architectures_vary():
    shapes = {tuple(p.shape for p in random_mlp(784, 10, torch.Generator().manual_seed(s)).parameters())
              for s in range(30)}
    assert len(shapes) > 5
    convs = {tuple(p.shape for p in random_convnet(10, torch.Generator().manual_seed(s)).parameters()) for s in range(30)}
    assert len(convs) > 3
    out = random_convnet(7, torch.Generator().manual_seed(0))(torch.zeros(2, 1, 28, 28))
    assert out.shape == (2, 7)


def test_random_convnet_normalisation_layers():
    """norm= puts a BatchNorm or GroupNorm(1, C) after every conv, drawn after the architecture, so
    the convs of a seed are those of the plain network; a bad name is refused."""
    for seed in range(6):
        plain = random_convnet(5, torch.Generator().manual_seed(seed))
        convs = [m for m in plain if isinstance(m, torch.nn.Conv2d)]
        for norm, kind in (("batch", torch.nn.BatchNorm2d), ("layer", torch.nn.GroupNorm)):
            net = random_convnet(5, torch.Generator().manual_seed(seed), norm=norm)
            layers = list(net)
            assert [(m.in_channels, m.out_channels) for m in layers if isinstance(m, torch.nn.Conv2d)] == [
                (m.in_channels, m.out_channels) for m in convs]
            after = [layers[i + 1] for i, m in enumerate(layers) if isinstance(m, torch.nn.Conv2d)]
            assert all(isinstance(m, kind) for m in after) and len(after) == len(convs)
            if kind is torch.nn.GroupNorm:
                assert all(m.num_groups == 1 for m in after)
    drawn = {type(m).__name__ for s in range(20)
             for m in random_convnet(5, torch.Generator().manual_seed(s), norm="draw")}
    assert {"BatchNorm2d", "GroupNorm"} <= drawn
    with pytest.raises(ValueError, match="norm must be None, 'draw' or one of 'batch', 'layer'; got 'instance'"):
        random_convnet(5, torch.Generator(), norm="instance")


def test_the_omniglot_normconv_component_meta_trains(shared_data_dir):
    """The optional component: Omniglot convnets with normalisation layers, whose tasks conform and
    meta-train (BatchNorm's batch statistics in the unroll)."""
    import l2o

    mix = generalist_family(shared_data_dir, components={"omniglot-normconv": 1.0})
    assert [f.name for f in mix.families] == [f"omniglot-normconv-{w}way" for w in (5, 10, 20)]
    assert all(f.config()["norm"] == "draw" for f in mix.families)
    assert "norm" not in generalist_family(shared_data_dir, components={"omniglot-conv": 1.0}).families[0].config()
    kinds = set()
    for seed in range(12):
        task = mix.sample(torch.Generator().manual_seed(seed))
        kinds |= {type(m).__name__ for m in task.model.modules()} & {"BatchNorm2d", "GroupNorm"}
        if seed < 2:
            check_task(task)
    assert kinds == {"BatchNorm2d", "GroupNorm"}
    config = l2o.MetaTrainConfig(epochs=2, tasks_per_step=2, horizon=6, truncation=3, meta_split=META,
                                 num_val_tasks=1, validate_every=2, val_horizon=6)
    start = {k: v.clone() for k, v in l2o.MLPRule().state_dict().items()}
    result = l2o.meta_train(l2o.MLPRule(), mix, config, progress=False)
    assert result.meta_steps == 4 and result.skipped_steps == 0
    assert all(math.isfinite(v) for v in result.history["epoch_loss"] + result.history["val_loss"])
    changed = [not torch.equal(a, b) for a, b in zip(result.rule.state_dict().values(), start.values(), strict=True)]
    assert any(changed)  # the meta-gradient reached the rule through the normalised networks


def test_random_mlp_draws_from_the_given_depths_widths_and_activations():
    seen = set()
    for s in range(40):
        net = random_mlp(784, 10, torch.Generator().manual_seed(s), depths=(4, 5, 6), widths=(32, 64),
                         activations=("relu", "gelu", "tanh"))
        linears = [m for m in net if isinstance(m, torch.nn.Linear)]
        acts = {type(m).__name__ for m in net if not isinstance(m, (torch.nn.Linear, torch.nn.Flatten))}
        assert len(linears) - 1 in (4, 5, 6) and {m.out_features for m in linears[:-1]} <= {32, 64}
        assert len(acts) == 1 and acts <= {"ReLU", "GELU", "Tanh"}
        seen.add((len(linears) - 1, linears[0].out_features, acts.pop()))
    assert len(seen) > 8
    # The defaults draw what they always drew: the same generator, the same network.
    a = random_mlp(784, 10, torch.Generator().manual_seed(7))
    b = random_mlp(784, 10, torch.Generator().manual_seed(7), depths=(1, 2, 3), widths=(16, 32, 64, 128),
                   activations=("relu", "tanh", "gelu", "sigmoid", "elu"))
    assert [tuple(p.shape) for p in a.parameters()] == [tuple(p.shape) for p in b.parameters()]
    with pytest.raises(ValueError, match=r"unknown activations \['swish'\]; choose from relu, tanh"):
        random_mlp(784, 10, torch.Generator(), activations=("relu", "swish"))
    with pytest.raises(ValueError, match="depths is empty"):
        random_mlp(784, 10, torch.Generator(), depths=())


def test_the_deep_mlp_component_keeps_pytorch_initialisation(shared_data_dir):
    mix = generalist_family(shared_data_dir, components={"mnist-mlp-deep": 1.0})
    assert [f.name for f in mix.families] == ["mnist-mlp-deep-b32", "mnist-mlp-deep-b128"]
    for s in range(4):
        task = mix.sample(torch.Generator().manual_seed(s))
        check_task(task)
        weights = [v for k, v in task.init(None).items() if k.endswith("weight")]
        assert 5 <= len(weights) <= 7
        bound = 1 / math.sqrt(weights[1].shape[1])  # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        assert float(weights[1].abs().max()) <= bound


@pytest.mark.parametrize("model", ["gru", "transformer"])
def test_sequence_tasks_learn_their_chain(model):
    """A language model trained by Adam for 150 steps approaches its chain's entropy rate on held-out text."""
    torch.manual_seed(0)
    fam = sequence_family(vocab=8, hidden=16, length=12, batch_size=32, model=model)
    task = fam.sample(torch.Generator().manual_seed(3))
    params = {k: v.clone().requires_grad_() for k, v in task.init(torch.Generator()).items()}
    opt = torch.optim.Adam(params.values(), lr=3e-2)
    g = torch.Generator().manual_seed(4)
    held_out = task.batch_fn.held_out
    start = float(task.loss(params, held_out).detach())
    for _ in range(150):
        opt.zero_grad()
        task.loss(params, task.sample_batch(TRAIN, g)).backward()
        opt.step()
    P = task.batch_fn.chain.transitions
    entropy = float(-(P * P.log()).sum(1).mean())
    end = float(task.loss(params, held_out).detach())
    assert end < start - 0.5 and end < entropy + 0.35, (start, end, entropy)


def test_transformer_is_causal_and_initialised_like_gpt2():
    torch.manual_seed(0)
    net = TransformerLanguageModel(vocab=11, dim=32, length=10, layers=2, heads=4)
    tokens = torch.randint(11, (3, 10))
    logits = net(tokens)
    assert logits.shape == (3, 10, 11)
    changed = tokens.clone()
    changed[:, 6] = (changed[:, 6] + 1) % 11
    after = net(changed)
    torch.testing.assert_close(after[:, :6], logits[:, :6], rtol=0, atol=1e-6)  # the past does not see the future
    assert not torch.allclose(after[:, 6:], logits[:, 6:])
    params = {k: v.detach() for k, v in net.named_parameters()}
    assert abs(float(params["blocks.0.fc.weight"].std()) - 0.02) < 0.003
    assert abs(float(params["blocks.1.proj.weight"].std()) - 0.01) < 0.002  # 0.02 / sqrt(2 * layers)
    assert not params["blocks.0.qkv.bias"].any() and torch.equal(params["ln_f.weight"], torch.ones(32))
    with pytest.raises(ValueError, match=r"shape \(B, L\) with L <= 10"):
        net(torch.zeros(2, 11, dtype=torch.long))
    with pytest.raises(ValueError, match="multiple of heads"):
        TransformerLanguageModel(vocab=11, dim=30, length=10, heads=4)


def test_sequence_family_checks_its_model():
    with pytest.raises(ValueError, match="model must be one of gru, transformer, got 'lstm'"):
        sequence_family(model="lstm")
    with pytest.raises(ValueError, match=r"hidden \(30\) must be a multiple of heads \(4\)"):
        sequence_family(model="transformer", hidden=30, heads=4)
    fam = sequence_family(model="transformer", hidden=16, layers=2)
    assert fam.name == "markov-transformer16-v16"
    assert fam.config()["model"] == "transformer" and fam.config()["layers"] == 2
    check_task(fam.sample(torch.Generator().manual_seed(0)))


def test_markov_chains_are_drawn_from_the_generator():
    a = MarkovChain(5, 0.5, torch.Generator().manual_seed(1)).transitions
    b = MarkovChain(5, 0.5, torch.Generator().manual_seed(1)).transitions
    assert torch.equal(a, b) and torch.allclose(a.sum(1), torch.ones(5))


def _stationary(transitions: torch.Tensor) -> torch.Tensor:
    pi = torch.full((transitions.shape[0],), 1.0 / transitions.shape[0], dtype=torch.float64)
    for _ in range(500):
        pi = pi @ transitions.double()
    return pi


def _entropy(p: torch.Tensor) -> float:
    return float(-(p * p.log()).sum())


def test_a_zipf_chain_skews_the_unigrams_and_zero_keeps_the_plain_chain():
    plain = MarkovChain(64, 1.0, torch.Generator().manual_seed(3)).transitions
    expected = (torch.randn(64, 64, generator=torch.Generator().manual_seed(3)) / 1.0).softmax(-1)
    assert torch.equal(MarkovChain(64, 1.0, torch.Generator().manual_seed(3), zipf=0.0).transitions, expected)
    assert torch.equal(plain, expected)
    skewed = MarkovChain(64, 1.0, torch.Generator().manual_seed(3), zipf=1.0).transitions
    assert torch.allclose(skewed.sum(1), torch.ones(64, dtype=skewed.dtype))
    pi_plain, pi_skewed = _stationary(plain), _stationary(skewed)
    # Uniform tokens: the unigram entropy is within 0.1 nats of log V; Zipf's s = 1 takes 0.5 or more off.
    assert _entropy(pi_plain) > math.log(64) - 0.1
    assert _entropy(pi_skewed) < math.log(64) - 0.5
    # The most frequent token is far more frequent than the rarest, in every context.
    assert float(pi_skewed.max() / pi_skewed.min()) > 20 and float(pi_plain.max() / pi_plain.min()) < 5


def test_sequence_family_zipf_is_checked_named_and_recorded():
    with pytest.raises(ValueError, match=r"zipf must be a finite number in \[0.0, inf\), got -1"):
        sequence_family(zipf=-1)
    fam = sequence_family(model="transformer", vocab=24, hidden=16, heads=2, zipf=1.0, length=8, batch_size=4)
    assert fam.name == "zipf-transformer16-v24" and fam.config()["zipf"] == 1.0
    assert "zipf" not in sequence_family().config()  # a plain chain's config is as it was
    task = fam.sample(torch.Generator().manual_seed(0))
    check_task(task)
    tokens, _ = task.sample_batch(TRAIN, torch.Generator().manual_seed(1))
    assert tokens.shape == (4, 8) and int(tokens.max()) < 24


def test_the_zipf_transformer_component(shared_data_dir):
    mix = generalist_family(shared_data_dir, components={"zipf-transformer": 1.0})
    configs = [f.config() for f in mix.families]
    assert [(c["vocab"], c["hidden"], c["layers"], c["heads"], c["batch_size"], c["zipf"]) for c in configs] == [
        (64, 64, 1, 4, 8, 1.0), (128, 64, 1, 4, 8, 1.0)]
    task = mix.sample(torch.Generator().manual_seed(2))
    check_task(task)


def test_unknown_components_are_named(shared_data_dir):
    with pytest.raises(ValueError, match=r"unknown components \['cifar'\]"):
        generalist_family(shared_data_dir, components={"cifar": 1.0})
    assert set(COMPONENTS) == {"mnist-mlp", "mnist-conv", "omniglot-conv", "markov-gru", "quadratic"}
