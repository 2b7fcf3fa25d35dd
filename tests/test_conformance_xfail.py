"""Per-backend xfail files: every entry names a cause, stale entries are errors, and the
statuses they produce."""

from __future__ import annotations

from pathlib import Path

import pytest

from unorm.conformance import xfail
from unorm.conformance.adapter import BACKENDS
from unorm.conformance.cases import all_cases
from unorm.conformance.results import Result
from unorm.conformance.worker import apply_xfail

NAMES = [c.name for c in all_cases()]


def test_the_shipped_files_are_valid() -> None:
    for backend in BACKENDS:
        for entry in xfail.load(backend, NAMES):
            assert entry.cause


def test_an_entry_matching_no_case_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "torch.toml").write_text('[[xfail]]\ncase = "bn/gone/*"\ncause = "old bug"\n')
    with pytest.raises(ValueError, match="'bn/gone/\\*' matches no case"):
        xfail.load("torch", NAMES, tmp_path)


def test_an_entry_needs_a_cause(tmp_path: Path) -> None:
    (tmp_path / "keras.toml").write_text('[[xfail]]\ncase = "bn/rank2"\n')
    with pytest.raises(ValueError, match="names no cause"):
        xfail.load("keras", NAMES, tmp_path)
    with pytest.raises(ValueError, match="unknown keys"):
        xfail.parse('[[xfail]]\ncase = "bn/rank2"\ncause = "x"\nreason = "y"\n', "f.toml")
    with pytest.raises(ValueError, match="not valid TOML"):
        xfail.parse("[[xfail", "f.toml")
    with pytest.raises(ValueError, match="only \\[\\[xfail\\]\\]"):
        xfail.parse('[skip]\ncase = "x"\n', "f.toml")


def test_patterns_and_missing_files(tmp_path: Path) -> None:
    text = '[[xfail]]\ncase = "bn/dtype/bfloat16/*"\ncause = "no bf16 kernel"\n'
    (tmp_path / "mxnet.toml").write_text(text)
    entries = xfail.load("mxnet", NAMES, tmp_path)
    assert xfail.cause_for(entries, "bn/dtype/bfloat16/seq") == "no bf16 kernel"
    assert xfail.cause_for(entries, "bn/rank2") is None
    assert xfail.load("reference", NAMES, tmp_path) == []


@pytest.mark.parametrize(
    ("status", "final"),
    [("fail", "xfail"), ("error", "xfail"), ("pass", "xpass"), ("unsupported", "unsupported")],
)
def test_statuses(status: str, final: str) -> None:
    result = Result("bn/rank2", "torch", "batchnorm", "float32", status)
    out = apply_xfail(result, "known bug", "torch.toml")
    assert out.status == final and out.xfail_cause == "known bug"
    assert out.failed == (final == "xpass")
    unlisted = apply_xfail(Result("bn/rank2", "torch", "batchnorm", "float32", status), None, "")
    assert unlisted.status == status
