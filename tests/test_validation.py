"""Tests for l2o.validation (the argument checks rules, tasks and trainers share) and for the import
direction it serves: task families use l2o's protocols and utilities, never a trainer."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

import l2o.rules.base
from l2o import validation
from l2o.validation import check_bool, check_float_dtype, check_hyperparameter, check_path, check_positive_int, is_number

REPO = Path(__file__).resolve().parents[1]


def test_is_number_excludes_bools_and_other_types() -> None:
    assert all(is_number(v) for v in (0, -3, 2.5, math.inf, math.nan))
    assert not any(is_number(v) for v in (True, False, "1", None, 1j, torch.tensor(1.0)))


def test_check_hyperparameter_returns_floats_in_range_and_names_the_rest() -> None:
    assert check_hyperparameter("lr", 1) == 1.0 and isinstance(check_hyperparameter("lr", 1), float)
    assert check_hyperparameter("beta", 0.0, low=0.0, high=1.0) == 0.0
    with pytest.raises(TypeError, match=r"lr must be a number, got bool \(True\)"):
        check_hyperparameter("lr", True)
    with pytest.raises(TypeError, match="lr must be a number, got str"):
        check_hyperparameter("lr", "0.1")
    with pytest.raises(ValueError, match=r"beta must be a finite number in \[0.0, 1.0\), got 1.0"):
        check_hyperparameter("beta", 1.0, high=1.0, high_inclusive=False)
    with pytest.raises(ValueError, match=r"lr must be a finite number in \(0.0, inf\), got 0"):
        check_hyperparameter("lr", 0, low=0.0, low_inclusive=False)
    for bad in (math.nan, math.inf, -1e-9):
        with pytest.raises(ValueError, match="eps"):
            check_hyperparameter("eps", bad)


def test_check_positive_int() -> None:
    assert check_positive_int("steps", 3) == 3
    for bad in (0, -1, 2.0, True, "3", None):
        with pytest.raises(ValueError, match=f"steps must be a positive integer, got {bad!r}"):
            check_positive_int("steps", bad)


def test_check_bool_float_dtype_and_path() -> None:
    assert check_bool("fused", False) is False
    for bad in (0, 1, "yes", None):
        with pytest.raises(TypeError, match="fused must be a bool"):
            check_bool("fused", bad)
    assert check_float_dtype("dtype", torch.float64) is torch.float64
    for bad in (torch.int64, "float32", float):
        with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
            check_float_dtype("dtype", bad)
    assert check_path("path", "a.zip") == "a.zip" and check_path("path", Path("a")) == Path("a")
    with pytest.raises(TypeError, match=r"path must be a file path \(str or os.PathLike\), got int \(3\)"):
        check_path("path", 3)


def test_rules_base_still_exports_the_checks() -> None:
    for name in ("check_hyperparameter", "check_positive_int", "check_bool", "check_float_dtype"):
        assert getattr(l2o.rules.base, name) is getattr(validation, name)
        assert name in l2o.rules.base.__all__


def _l2o_imports(path: Path) -> set[str]:
    """The l2o modules a file imports (absolute imports; optimizees never import l2o relatively)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m == "l2o" or m.startswith("l2o.")}


def test_task_families_never_import_a_trainer() -> None:
    files = sorted((REPO / "optimizees").glob("*.py"))
    assert len(files) >= 8
    for path in files:
        for module in _l2o_imports(path):
            assert module != "l2o", f"{path.name} imports the whole package; import the module it needs"
            assert not module.startswith(("l2o.maml", "l2o.meta", "l2o.cli", "l2o.optim")), \
                f"{path.name} imports the trainer or front end {module}"
