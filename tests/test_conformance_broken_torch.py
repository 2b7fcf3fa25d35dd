"""Breaking the real PyTorch backend makes the suite fail, naming case, backend and error."""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.torch
pytest.importorskip("torch")

from unorm._core.layer_kinds import KernelLayout  # noqa: E402
from unorm._torch import agc as torch_agc  # noqa: E402
from unorm._torch.batchnorm import BatchNorm  # noqa: E402
from unorm.conformance.adapter import load_adapter  # noqa: E402
from unorm.conformance.worker import run_cases  # noqa: E402


def _assert_fails(patterns: list[str], quantity: str) -> None:
    results = run_cases(load_adapter("torch"), patterns)
    assert results and all(r.status == "fail" for r in results), [r.message() for r in results]
    for r in results:
        assert r.message().startswith(f"FAIL {r.case} [torch]: {quantity}")
        assert r.max_abs is not None and r.max_abs > 0


def test_running_statistics_updated_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    commit = BatchNorm._commit

    def twice(self: BatchNorm, mean: Any, var: Any) -> None:
        commit(self, mean, var)
        commit(self, mean, var)

    monkeypatch.setattr(BatchNorm, "_commit", twice)
    _assert_fails(["bn/momentum/none"], "num_batches_tracked@1")


def test_rank_based_agc_axis(monkeypatch: pytest.MonkeyPatch) -> None:
    # A rank rule takes axis 0 of every weight: a transposed convolution then looks as if
    # its layout were (O/g, I, *k).
    rank_rule = {**torch_agc._LAYOUTS, "conv_transpose": KernelLayout("b a k")}
    monkeypatch.setattr(torch_agc, "_LAYOUTS", rank_rule)
    _assert_fails(["agc/conv_transpose/*"], "")
