"""The suite end to end without a framework: the reference column passes every case; a
deliberately broken backend fails with a message naming case, backend and error; the
layout transforms agree with SPEC.md's table; the runner's subprocess path works."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from unorm import reference as ref
from unorm._core.registry import plugin_names
from unorm.conformance import layouts
from unorm.conformance.adapter import (
    BACKENDS,
    CHECKOUT,
    PACKAGE,
    load_adapter,
    load_adapter_module,
)
from unorm.conformance.cases import AGCCase, all_cases, select
from unorm.conformance.data import agc_inputs, logical_unit_axes
from unorm.conformance.worker import run_cases
from unorm.spec import LAYER_KINDS, output_unit_axes

_reference = load_adapter_module("reference")


def test_the_reference_column_passes_every_case() -> None:
    results = run_cases(load_adapter("reference"))
    assert len(results) == len(all_cases())
    assert [r.message() for r in results if r.status != "pass"] == []


class _BiasedFeed(_reference.ReferenceAdapter):
    name = "broken-biased"

    def bn_build(self, config, gamma, beta):  # type: ignore[no-untyped-def]
        layer = super().bn_build(config, gamma, beta)
        layer.spec = layer.spec.replace(running_var="biased")
        return layer


class _UpdatedTwice(_reference.ReferenceAdapter):
    name = "broken-twice"

    def bn_step(self, layer, x, dy, mode):  # type: ignore[no-untyped-def]
        if mode != "eval" and layer.running is not None:
            stats = ref.batch_stats(np.asarray(x, np.float64), layer.spec.axis)
            layer.running = ref.update_running_stats(layer.running, stats, momentum=0.1)
        return super().bn_step(layer, x, dy, mode)


class _RankBasedAGC(_reference.ReferenceAdapter):
    """The common mistake: axis 0 is the unit of every tensor of rank >= 2."""

    name = "broken-axis"

    def agc(self, params, *, clipping, eps, exclude, unit_axes=None):  # type: ignore[no-untyped-def]
        axes = {p.name: 0 for p in params}
        return ref.agc_clip_all(
            {p.name: p.grad for p in params},
            {p.name: p.weight for p in params},
            axes,
            clipping=clipping,
            eps=eps,
            exclude=tuple(exclude),
        )


class _TimmEverywhere(_reference.ReferenceAdapter):
    """Scaled WS with timm's eps handling whatever the case asks for."""

    name = "broken-ws-style"

    def ws_conv(self, config, x, weight, gain, bias, dy):  # type: ignore[no-untyped-def]
        return super().ws_conv(dataclasses.replace(config, style="timm"), x, weight, gain, bias, dy)


@pytest.mark.parametrize(
    ("adapter", "patterns", "quantity"),
    [
        (_BiasedFeed(), ["bn/seq/*"], "running_var@"),
        (_UpdatedTwice(), ["bn/rank2", "bn/momentum/none"], "num_batches_tracked@1"),
        (_RankBasedAGC(), ["agc/conv_transpose/*"], "up.weight"),
        (_TimmEverywhere(), ["ws/deepmind/small-weights", "ws/deepmind/eps/1e-2"], ""),
    ],
    ids=["biased-running-var", "stats-updated-twice", "wrong-agc-axis", "wrong-ws-style"],
)
def test_a_broken_backend_fails_loudly(adapter, patterns: list[str], quantity: str) -> None:  # type: ignore[no-untyped-def]
    results = run_cases(adapter, patterns)
    assert results and all(r.status == "fail" for r in results)
    for r in results:
        message = r.message()
        assert message.startswith(f"FAIL {r.case} [{adapter.name}]: {quantity}")
        assert "max abs err" in message and r.max_abs is not None and r.max_abs > 0


class _NudgesUnclipped(_reference.ReferenceAdapter):
    """Returns every gradient AGC leaves alone one ulp off: within every float tolerance,
    but not the "unchanged, bit for bit" that SPEC.md section 5 asks for."""

    name = "broken-unchanged"

    def agc(self, params, *, clipping, eps, exclude, unit_axes=None):  # type: ignore[no-untyped-def]
        out = super().agc(params, clipping=clipping, eps=eps, exclude=exclude, unit_axes=unit_axes)
        for p in params:
            kept = out[p.name] == p.grad
            out[p.name] = np.where(kept, np.nextafter(out[p.name], np.inf), out[p.name])
        return out


class _AcceptsBadAGCSettings(_reference.ReferenceAdapter):
    """Clips with the defaults, ignoring names it does not know, when given invalid
    settings instead of raising."""

    name = "broken-agc-settings"

    def agc(self, params, *, clipping, eps, exclude, unit_axes=None):  # type: ignore[no-untyped-def]
        try:
            return super().agc(
                params, clipping=clipping, eps=eps, exclude=exclude, unit_axes=unit_axes
            )
        except ValueError:
            known = [name for name in exclude if name in {p.name for p in params}]
            return super().agc(params, clipping=0.01, eps=1e-3, exclude=known)


def test_a_backend_accepting_invalid_agc_settings_fails() -> None:
    results = run_cases(_AcceptsBadAGCSettings(), ["agc/error/*"])
    assert len(results) == 10
    for r in results:
        assert r.status == "fail" and r.detail.startswith("no error raised (clipping="), r
    # The same cases pass where the settings are checked.
    assert {r.status for r in run_cases(load_adapter("reference"), ["agc/error/*"])} == {"pass"}


class _VagueErrors(_reference.ReferenceAdapter):
    """Refuses every bad setting, but with a message that names nothing."""

    name = "vague-errors"

    def agc(self, params, **kwargs):  # type: ignore[no-untyped-def]
        try:
            return super().agc(params, **kwargs)
        except ValueError:
            raise ValueError("invalid arguments") from None

    def bn_step(self, layer, x, dy, mode):  # type: ignore[no-untyped-def]
        try:
            return super().bn_step(layer, x, dy, mode)
        except ValueError:
            raise ValueError("invalid input") from None


def test_an_error_that_names_nothing_fails() -> None:
    # The same mistake must give the same message on every backend: the parameter named
    # and what was expected, not only the exception type.
    results = run_cases(_VagueErrors(), ["agc/error/*", "error/rank1", "error/integer-input"])
    assert len(results) == 12
    for r in results:
        assert r.status == "fail" and "which does not say" in r.detail, r


@pytest.mark.parametrize(
    ("case", "quantity", "unchanged"),
    [
        # fc.weight (3, 4) is excluded: its 12 values come back as given.
        ("agc/exclude-classifier", "fc.weight", 12),
        # Four units of two values: at, just above, just under and far above the threshold;
        # the unit at it and the one under it (4 values) are left alone.
        ("agc/threshold", "fc.weight", 4),
        ("agc/threshold/float64", "fc.weight", 4),
    ],
)
def test_gradients_left_alone_must_be_unchanged_bit_for_bit(
    case: str, quantity: str, unchanged: int
) -> None:
    (result,) = run_cases(_NudgesUnclipped(), [case])
    assert result.status == "fail"
    assert f"{quantity}: max abs err" in result.detail
    assert f"{unchanged} of {unchanged} values that must come back unchanged differ" in (
        result.detail
    )
    assert result.score == np.inf


@pytest.mark.parametrize("layout", [layouts.of(n) for n in plugin_names()], ids=str)
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_layouts_agree_with_the_spec_table(layout: layouts.Layout, kind: str) -> None:
    # Clipping in the backend's layout with SPEC.md's axes must equal clipping in the
    # logical layout and transforming: otherwise a correct backend would be failed.
    for case in select(["agc/*"]):
        assert isinstance(case, AGCCase)
        if case.error:
            continue  # invalid settings: nothing is clipped
        inputs = agc_inputs(case)
        for p in case.params:
            if p.kind != kind or not p.shape:
                continue
            w, g = inputs.weights[p.name], inputs.grads[p.name]
            logical = ref.agc_clip(g, w, logical_unit_axes(p), clipping=case.clipping)
            wb, gb = layout.to_backend(kind, w), layout.to_backend(kind, g)
            axes = output_unit_axes(layout.framework, kind, wb.ndim)
            clipped = ref.agc_clip(gb, wb, axes, clipping=case.clipping)
            back = layout.to_logical(kind, clipped, p.shape)
            # Only the summation order differs: a last-place difference at most.
            np.testing.assert_allclose(back, logical, rtol=1e-6, err_msg=f"{case.name} {p.name}")


def test_every_backend_has_an_adapter_that_loads_without_its_framework() -> None:
    for name, backend in BACKENDS.items():
        adapter = load_adapter(name)
        assert adapter.name == name and adapter.native == backend.native
        assert importlib.util.find_spec(backend.module) is not None


def _conformance(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "unorm.conformance", *args]
    return subprocess.run(cmd, cwd=CHECKOUT, capture_output=True, text=True, timeout=300)


def test_the_runner_runs_a_worker_per_backend_and_writes_the_report(tmp_path: Path) -> None:
    done = _conformance(
        "run",
        "--backend", "reference",
        "--backend", "mxnet",
        "--case", "bn/rank2",
        "--case", "agc/conv/rank4",
        "--out", str(tmp_path),
        "--results", str(tmp_path / "results"),
        "--python", f"current={sys.executable}",
        "--python", f"legacy={tmp_path / 'no-such-python'}",
        tmp_path=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "PASSED: no failing result of 2 run" in done.stdout
    assert "mxnet: not available (the interpreter given for environment 'legacy'" in done.stdout
    body = json.loads((tmp_path / "results" / "reference.json").read_text())
    assert [r["status"] for r in body["results"]] == ["pass", "pass"]
    assert body["versions"]["numpy"] == np.__version__
    md = (tmp_path / "conformance-report.md").read_text()
    assert "| `agc/conv/rank4` | pass" in md
    assert (tmp_path / "conformance-report.html").exists()


def test_the_runner_refuses_a_stale_xfail_entry(tmp_path: Path) -> None:
    stale = PACKAGE / "xfail" / "reference.toml"
    assert not stale.exists()
    stale.write_text('[[xfail]]\ncase = "bn/no-such-case"\ncause = "test"\n')
    try:
        done = _conformance(
            "run", "--backend", "reference", "--out", str(tmp_path), tmp_path=tmp_path
        )
    finally:
        stale.unlink()
    assert done.returncode == 2
    assert "xfail entry 'bn/no-such-case' matches no case" in done.stderr


def test_an_environment_not_built_runs_with_this_interpreter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkout without .venvs (or an installed package) runs each column with the
    suite's own interpreter and says so; an interpreter given but missing is refused."""
    from unorm.conformance import runner

    monkeypatch.delenv("UNORM_CONFORMANCE_PYTHON_LEGACY", raising=False)
    monkeypatch.setattr(runner, "CHECKOUT", tmp_path)
    python, note = runner.interpreter_for("legacy", {})
    assert python == Path(sys.executable)
    assert "environment 'legacy' is not built here" in note and sys.executable in note
    monkeypatch.setattr(runner, "CHECKOUT", None)
    assert runner.interpreter_for("legacy", {})[0] == Path(sys.executable)
    missing = tmp_path / "no-such-python"
    python, note = runner.interpreter_for("legacy", {"legacy": str(missing)})
    assert python is None and str(missing) in note


def test_unorm_conformance_reaches_the_suite(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "unorm", "conformance", "list", "--case", "error/rank1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[:3] == ["error/rank1", "error", "float32"]
