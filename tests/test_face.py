"""The package's face: the main jobs by name, and names kept for one version after a move."""

from __future__ import annotations

import pytest

import l2o


def test_the_main_jobs_are_on_the_face():
    from l2o.meta import MetaTrainConfig, compare, meta_train

    assert l2o.meta_train is meta_train and l2o.MetaTrainConfig is MetaTrainConfig and l2o.compare is compare
    for name in l2o.__all__:
        assert getattr(l2o, name) is not None, name
    assert "RULES" not in l2o.__all__


def test_moved_names_warn_and_still_work():
    from l2o.rules import RULES

    with pytest.warns(DeprecationWarning, match=r"l2o\.RULES is deprecated .* use l2o\.rules\.RULES"):
        assert l2o.RULES is RULES
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        l2o.nope
