"""The conformance cases in-process, on every column whose framework this environment
runs (``./dev main`` runs them in worker subprocesses, one per backend and environment).

Cross-replica cases start helper processes per replica (4-11 s per case for torch on two
cores, 62-70 s for all seven; keras about 40 s), so only a representative pair runs here,
on the torch and keras columns (:data:`SYNC_PAIR`, about 12 s each); ``./dev main`` runs
all of them on every column.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from unorm.conformance import adapter as adapter_module
from unorm.conformance import dtypes
from unorm.conformance.adapter import Adapter, UnormModule, load_adapter
from unorm.conformance.worker import run_cases

IN_PROCESS = ["bn/*", "agc/*", "error/*", "ws/*"]

#: Cross-replica cases run here on the torch and keras columns (in declaration order):
#: replicas holding one value each (1, 1, 1), whose statistics exist only once merged,
#: and channels-last over uneven shards with an empty replica (3, 0, 5); both float32.
#: The other five would cost about 45 s more per column and repeat these paths (even and
#: uneven shards, float64).
SYNC_PAIR = ["sync/one-value-replicas", "sync/axis-last"]


def _run(backend: str) -> None:
    adapter = load_adapter(backend)
    # Unavailable only while the framework is not installed; a unorm module that fails
    # to import raises here and errors the test.
    reason = adapter.availability()
    if reason is not None and not adapter.native:
        pytest.skip(reason)
    assert reason is None, reason
    results = run_cases(adapter, IN_PROCESS)
    assert [r.message() for r in results if r.failed] == []
    ran = [r for r in results if r.status not in ("unsupported", "unavailable")]
    assert len(ran) > 30
    if adapter.native:
        # A native layer departs (labelled) or passes; never an adapter error.
        assert {r.status for r in ran} <= {"pass", "departs"}


@pytest.mark.torch
@pytest.mark.parametrize("backend", ["torch", "torch-native"])
def test_torch_columns(backend: str) -> None:
    _run(backend)


@pytest.mark.keras
@pytest.mark.parametrize("backend", ["keras", "keras-native"])
def test_keras_columns(backend: str) -> None:
    _run(backend)


@pytest.mark.mxnet
@pytest.mark.parametrize("backend", ["mxnet", "mxnet-native"])
def test_mxnet_columns(backend: str) -> None:
    _run(backend)


@pytest.mark.torch
def test_torch_rounds_bfloat16_as_numpy_does() -> None:
    values = np.random.default_rng(0).normal(size=1000) * 10.0 ** np.arange(-5, 5).repeat(100)
    torch_rounded = load_adapter("torch-native").round_to(values, "bfloat16")
    np.testing.assert_array_equal(torch_rounded, dtypes.round_bfloat16(values.astype(np.float32)))


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param("torch", marks=pytest.mark.torch),
        pytest.param("keras", marks=pytest.mark.keras),
    ],
)
def test_sync_cases(backend: str) -> None:
    results = run_cases(load_adapter(backend), SYNC_PAIR)
    assert [(r.case, r.status) for r in results] == [(c, "pass") for c in SYNC_PAIR], [
        r.message() for r in results
    ]
    assert all(r.score is not None and r.score <= 1.0 for r in results)


class _Column(UnormModule, Adapter):
    """A unorm column whose framework is NumPy (always installed) and whose unorm module
    does not import, as a renamed symbol or a bad import in ``unorm.torch`` would not."""

    name = "broken-column"
    framework = "numpy"
    module_name = "unorm._no_such_backend_module"


def test_a_column_whose_unorm_module_fails_to_import_errors() -> None:
    column = _Column()
    with pytest.raises(ImportError, match=r"unorm\._no_such_backend_module"):
        column.availability()
    results = run_cases(column, ["bn/rank2", "agc/rank1"])
    assert [(r.case, r.status) for r in results] == [("bn/rank2", "error"), ("agc/rank1", "error")]
    assert all("cannot load: ModuleNotFoundError" in r.detail for r in results)
    assert all(r.failed for r in results)


def test_a_column_whose_framework_is_not_installed_is_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(
        adapter_module.FRAMEWORK_PACKAGES, "numpy", ("numpy", "no_such_framework_package")
    )
    column = _Column()
    assert column.availability() == (
        "no_such_framework_package not installed here (unorm._no_such_backend_module needs it)"
    )
    results = run_cases(column, ["bn/rank2"])
    assert [(r.status, r.failed) for r in results] == [("unavailable", False)]


@pytest.mark.torch
def test_torch_column_with_an_unimportable_unorm_torch_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # None in sys.modules makes `import unorm.torch` raise ImportError while torch itself
    # imports: the column must error, not report itself unavailable.
    monkeypatch.setitem(sys.modules, "unorm.torch", None)
    column = load_adapter("torch")
    with pytest.raises(ImportError, match=r"unorm\.torch"):
        column.availability()
    (result,) = run_cases(column, ["agc/rank1"])
    assert result.status == "error" and "unorm.torch" in result.detail
