"""The BatchNorm-after-training and accumulation cases (``fold/``, ``recalibrate/``,
``frozen/``, ``accumulate/``) in-process on every column this environment runs.

Expected values are the NumPy reference's (the unfolded producer then the inference
BatchNorm, the exact statistics of all samples, the inference formula of a frozen layer,
the exact merge of the micro-batches); the native columns run the frameworks' own tools
(``fuse_conv_bn_eval``, ``swa_utils.update_bn``, ...) and must pass or depart, labelled.
Keras runs a representative subset (its layers cost about 0.4 s a case on two cores).
"""

from __future__ import annotations

import pytest

from unorm.conformance.adapter import load_adapter
from unorm.conformance.worker import run_cases

ALL = ["fold/*", "recalibrate/*", "frozen/*", "accumulate/*"]
#: Every producer kind, unorm's and the native BatchNorm, each operation's main cases.
SUBSET = [
    "fold/conv2d",
    "fold/conv2d/native-bn",
    "fold/conv2d/grouped",
    "fold/depthwise",
    "fold/conv_transpose",
    "fold/dense/native-bn",
    "fold/float64/dense",
    "fold/preset-keras",
    "recalibrate/drift",
    "recalibrate/preset-keras",
    "frozen/fixed",
    "frozen/trainable",
    "frozen/one-value",
    "accumulate/two-steps",
    "accumulate/nan",
    "accumulate/preset-keras",
]


def _results(backend: str, patterns: list[str]) -> dict[str, object]:
    adapter = load_adapter(backend)
    reason = adapter.availability()
    if reason is not None and not adapter.native:
        pytest.skip(reason)
    assert reason is None, reason
    results = run_cases(adapter, patterns)
    assert [r.message() for r in results if r.failed] == []
    if adapter.native:  # a native tool departs (labelled) or passes; never an error
        assert {r.status for r in results} <= {"pass", "departs", "unsupported"}
    return {r.case: r for r in results}


def test_reference_column_runs_every_case() -> None:
    got = _results("reference", ALL)
    assert {r.status for r in got.values()} == {"pass"}  # type: ignore[attr-defined]


@pytest.mark.torch
def test_torch_column() -> None:
    got = _results("torch", ALL)
    assert {r.status for r in got.values()} == {"pass"}  # type: ignore[attr-defined]


@pytest.mark.torch
def test_torch_native_tools() -> None:
    got: dict = _results("torch-native", ALL)
    # fuse_conv_bn_eval / fuse_linear_bn_eval are right on these producers.
    for case in ("fold/conv2d/native-bn", "fold/depthwise/native-bn", "fold/dense/native-bn"):
        assert got[case].status == "pass", got[case].message()
    # update_bn averages per-batch statistics: a labelled departure that matches that rule.
    drift = got["recalibrate/drift"]
    assert drift.status == "departs" and "update_bn" in drift.detail
    assert "matches the reference under that rule" in drift.detail
    # No accumulation in PyTorch: every micro-batch is a step of its own.
    acc = got["accumulate/uneven"]
    assert acc.status == "departs" and "matches the reference under that rule" in acc.detail
    # A BatchNorm kept in eval mode is a frozen one of the torch preset.
    assert got["frozen/trainable"].status == "pass"


@pytest.mark.keras
@pytest.mark.parametrize("backend", ["keras", "keras-native"])
def test_keras_columns(backend: str) -> None:
    got: dict = _results(backend, SUBSET)
    if backend == "keras":
        assert {r.status for r in got.values()} <= {"pass", "xfail"}
        assert got["fold/conv2d"].status == "pass"
    else:
        assert got["fold/conv2d"].status == "unsupported"  # Keras has no fold
        assert got["frozen/trainable"].status == "unsupported"  # trainable=False fixes both


@pytest.mark.mxnet
@pytest.mark.parametrize("backend", ["mxnet", "mxnet-native"])
def test_mxnet_columns(backend: str) -> None:
    got: dict = _results(backend, ALL)
    if backend == "mxnet":
        # MXNet 1.x on CPU has no float16 convolution and no empty arrays.
        lacking = {c for c, r in got.items() if r.status != "pass"}
        assert lacking == {"fold/float16/conv2d", "recalibrate/empty-batch"}
        assert {got[c].status for c in lacking} == {"unsupported"}
    else:
        assert got["recalibrate/uneven"].status == "unsupported"  # Gluon has none
        assert got["frozen/trainable"].status in ("pass", "departs")


@pytest.mark.flax
def test_flax_column() -> None:
    lacks = ["fold/conv2d", "recalibrate/uneven", "accumulate/uneven"]
    got: dict = _results("flax", [*lacks, "frozen/fixed", "frozen/trainable"])
    # unorm.flax has no fold, recalibrate or accumulate: reported, never skipped.
    assert {got[c].status for c in lacks} == {"unsupported"}
    assert got["frozen/fixed"].status == got["frozen/trainable"].status == "pass"


@pytest.mark.torch
def test_a_naive_accumulation_fails_the_torch_column(monkeypatch: pytest.MonkeyPatch) -> None:
    # A merge that leaves out the spread of the micro-batch means (M2 summed alone), as
    # averaging per-batch variances does: the running variance must come out wrong.
    pytest.importorskip("torch")
    from unorm._torch import accumulate as torch_accumulate

    recorder = torch_accumulate.Accumulator
    merged = recorder.merged

    def naive(self):  # type: ignore[no-untyped-def]
        m2s = list(self.m2s)
        out = merged(self)
        if out is None:
            return None
        total, mean, _ = out
        return total, mean, sum(m2s)

    monkeypatch.setattr(recorder, "merged", naive)
    results = run_cases(load_adapter("torch"), ["accumulate/uneven", "accumulate/two-steps"])
    assert [r.status for r in results] == ["fail", "fail"], [r.message() for r in results]
    assert all("running_var" in r.detail for r in results)
