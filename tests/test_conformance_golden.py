"""The golden file guards the NumPy reference against silent drift."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from unorm import reference as ref
from unorm.conformance import golden


def test_the_reference_still_computes_the_golden_values() -> None:
    assert golden.GOLDEN_PATH.name == "reference-v2.npz"
    assert golden.check_golden() == []


def test_a_drifting_reference_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    original = ref.update_running_stats

    def drifted(*args, **kwargs):  # type: ignore[no-untyped-def]
        kwargs["unbiased"] = False  # as if someone made the feed biased
        return original(*args, **kwargs)

    monkeypatch.setattr(ref, "update_running_stats", drifted)
    problems = golden.check_golden()
    assert any(p.startswith("seq/canonical/var") for p in problems)
    assert not any(p.startswith("seq/keras") for p in problems)  # already biased


def test_a_written_set_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "g.npz"
    golden.write_golden(path)
    assert golden.check_golden(path) == []
    with np.load(path) as data:
        assert "in:bn/x" in data.files and "out:agc/clipped_conv" in data.files
