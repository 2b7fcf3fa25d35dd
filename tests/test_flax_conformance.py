"""The conformance cases in-process on the Flax columns: a representative subset (the
whole suite takes minutes on JAX's CPU op-by-op dispatch; ``unorm conformance`` runs it
all), every cross-replica case on ``flax`` (replicas as a ``vmap`` axis, in process)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.flax

pytest.importorskip("flax")

from unorm.conformance.adapter import load_adapter  # noqa: E402
from unorm.conformance.worker import run_cases  # noqa: E402

SUBSET = ["bn/preset-flax/*", "bn/empty/*", "bn/nonfinite/*", "agc/*", "error/*", "ws/*"]


@pytest.mark.parametrize("backend", ["flax", "flax-native"])
def test_flax_columns(backend: str) -> None:
    adapter = load_adapter(backend)
    assert adapter.availability() is None
    results = run_cases(adapter, SUBSET)
    assert [r.message() for r in results if r.failed] == []
    ran = [r for r in results if r.status not in ("unsupported", "unavailable")]
    assert len(ran) > 10
    if adapter.native:  # a native layer departs (labelled) or passes; never an error
        assert {r.status for r in ran} <= {"pass", "departs"}


def test_cross_replica_cases_on_flax() -> None:
    results = run_cases(load_adapter("flax"), ["sync/*"])
    # Cases of another framework's strategy (DDP, multi-worker, Keras data parallel) are
    # unsupported here; every other one passes.
    passed = [r for r in results if r.status == "pass"]
    assert {r.status for r in results} <= {"pass", "unsupported"}, [r.message() for r in results]
    assert len(passed) >= 7
