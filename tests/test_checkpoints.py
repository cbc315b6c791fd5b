"""Checkpoints are data: round trip, and refusal of anything unsafe or malformed."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from l2o import CheckpointError, LSTMRule, MLPRule, init_inner, load_rule, save_rule, unroll
from l2o.checkpoints import FORMAT_VERSION, load_checkpoint
from l2o.rules import Adam
from optimizees.quadratic import QuadraticFamily


def _trajectory(rule):
    task = QuadraticFamily(num_functions=4).sample(torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        return unroll(rule, task, init_inner(rule, task, gen), steps=10, generator=gen).losses


@pytest.mark.parametrize("make", [lambda: LSTMRule(preprocess="log_sign", hidden_size=7, output_scale=0.5),
                                  lambda: Adam(lr=0.03, betas=(0.8, 0.99)),
                                  lambda: MLPRule(hidden_size=5, residual=False, instance_dims=1, total_steps=10)])
def test_round_trip_gives_identical_unroll(tmp_path, make):
    torch.manual_seed(0)
    rule = make()
    path = save_rule(tmp_path / "r.pt", rule, {"task": "quadratic", "seed": 3})
    loaded = load_rule(path)
    assert type(loaded) is type(rule) and loaded.config() == rule.config()
    assert torch.equal(_trajectory(rule), _trajectory(loaded))
    data = load_checkpoint(path)
    assert data["format_version"] == FORMAT_VERSION and data["provenance"]["seed"] == 3
    assert "l2o_version" in data["provenance"] and isinstance(data["provenance"]["torch_version"], str)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = marker
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"format": "l2o.rule", "payload": evil}, fh)
    with pytest.raises(CheckpointError, match="refusing"):
        load_rule(path)
    assert not marker.exists()
    torch.save({"format": "l2o.rule", "payload": evil}, tmp_path / "evil2.pt")
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refusing"):
        load_rule(tmp_path / "evil2.pt")
    assert not marker.exists()


def _valid(tmp_path):
    torch.manual_seed(0)
    return load_checkpoint(save_rule(tmp_path / "ok.pt", LSTMRule(hidden_size=4)))


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d.update(format_version=99), "format_version 99"),
    (lambda d: d.update(format="something"), "not an l2o rule checkpoint"),
    (lambda d: d.update(rule="transformer"), "unknown rule 'transformer'"),
    (lambda d: d["config"].update(hidden_size=5), "shape"),
    (lambda d: d["config"].update(colour="red"), "does not accept"),
    (lambda d: d["state_dict"].pop("out_bias"), "expected keys"),
    (lambda d: d.update(config="nope"), "'config' should be a dict"),
])
def test_malformed_checkpoints_are_refused(tmp_path, mutate, match):
    data = _valid(tmp_path)
    mutate(data)
    torch.save(data, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=match):
        load_rule(tmp_path / "bad.pt")


def test_missing_truncated_and_non_dict_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_rule(tmp_path / "nope.pt")
    good = save_rule(tmp_path / "ok.pt", LSTMRule(hidden_size=4))
    (tmp_path / "trunc.pt").write_bytes(good.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated|not a torch.save"):
        load_rule(tmp_path / "trunc.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not an l2o rule checkpoint"):
        load_rule(tmp_path / "list.pt")


def test_provenance_must_be_plain_data(tmp_path):
    with pytest.raises(TypeError, match="provenance"):
        save_rule(tmp_path / "x.pt", LSTMRule(hidden_size=4), {"task": object()})
    assert not (tmp_path / "x.pt").exists()


def test_save_rule_names_swapped_arguments(tmp_path):
    with pytest.raises(TypeError, match=r"save_rule\(path, rule\)"):
        save_rule(LSTMRule(hidden_size=4), tmp_path / "x.pt")
    with pytest.raises(TypeError, match="must be an l2o Rule, got Linear"):
        save_rule(tmp_path / "x.pt", torch.nn.Linear(2, 2))
    assert not (tmp_path / "x.pt").exists()


def test_save_replaces_atomically(tmp_path):
    path = save_rule(tmp_path / "r.pt", LSTMRule(hidden_size=4))
    save_rule(path, Adam(lr=0.5))
    assert isinstance(load_rule(path), Adam)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.pt"]
