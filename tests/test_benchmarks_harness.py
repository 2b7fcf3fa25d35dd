"""Tests of the benchmark harness (``benchmarks/``): timing, results files, report, CLI."""

from __future__ import annotations

import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks import bench_numpy, report
from benchmarks import run as run_cli
from benchmarks.harness import (
    SCHEMA_VERSION,
    Benchmark,
    Result,
    machine_info,
    measure,
    memory_bandwidth,
    read_results,
    write_results,
)

ROOT = Path(__file__).resolve().parents[1]  # benchmarks/ is run from the repository root


def logging_bench(log: list[str], bytes_moved: int | None = None) -> Benchmark:
    """A benchmark whose sides append "u" / "n" to ``log`` and return "U" / "N"."""

    def unorm() -> str:
        log.append("u")
        return "U"

    def native() -> str:
        log.append("n")
        return "N"

    return Benchmark("probe", "test", {"n": 1}, unorm, native, bytes_moved=bytes_moved)


def test_measure_warms_up_then_alternates_the_order_each_repeat() -> None:
    log: list[str] = []
    result = measure(logging_bench(log), repeats=4, warmup=2, min_time=0.0, number=3)
    warm = ["u", "n", "u", "n"]
    rounds = [["u"] * 3 + ["n"] * 3, ["n"] * 3 + ["u"] * 3] * 2
    assert log == warm + [call for r in rounds for call in r]
    assert len(result.unorm_samples) == len(result.native_samples) == 4
    assert (result.unorm_number, result.native_number) == (3, 3)
    assert log.count("u") == log.count("n") == 2 + 4 * 3


def test_measure_warmup_count_adds_calls_before_timing() -> None:
    counts = {}
    for warmup in (0, 3):
        log: list[str] = []
        measure(logging_bench(log), repeats=1, warmup=warmup, min_time=0.0, number=1)
        counts[warmup] = log
    assert counts[0] == ["u", "n"]
    assert counts[3] == ["u", "n"] * 3 + ["u", "n"]


def test_measure_syncs_every_return_value() -> None:
    returned: list[int] = []
    synced: list[object] = []

    def unorm() -> int:
        returned.append(len(returned))
        return returned[-1]

    bench = Benchmark("s", "test", {}, unorm=unorm, native=lambda: "N", sync=synced.append)
    measure(bench, repeats=2, warmup=1, min_time=0.0, number=2)
    assert [s for s in synced if s != "N"] == returned == list(range(1 + 2 * 2))
    assert synced.count("N") == 1 + 2 * 2


def test_ratio_is_the_ratio_of_medians_and_sees_more_work() -> None:
    bench = Benchmark(
        "sleep", "test", {}, unorm=lambda: time.sleep(0.002), native=lambda: time.sleep(0.0005)
    )
    result = measure(bench, repeats=3, warmup=1, min_time=0.005)
    assert result.unorm_s == statistics.median(result.unorm_samples)
    assert result.native_s == statistics.median(result.native_samples)
    assert result.ratio == result.unorm_s / result.native_s
    assert result.unorm_s >= 0.002 and result.native_s >= 0.0005
    assert result.ratio > 1.5


def test_calibration_makes_each_sample_last_min_time() -> None:
    bench = Benchmark("c", "test", {}, unorm=lambda: time.sleep(0.001), native=lambda: None)
    result = measure(bench, repeats=2, warmup=0, min_time=0.01)
    assert 1 < result.unorm_number <= 20
    assert result.native_number > result.unorm_number  # the no-op needs many more calls
    assert all(s * result.unorm_number >= 0.009 for s in result.unorm_samples)


def test_floor_ratio_uses_bytes_moved_and_bandwidth() -> None:
    bench = Benchmark("f", "test", {}, unorm=lambda: None, native=lambda: None, bytes_moved=10**6)
    with_bw = measure(bench, repeats=1, warmup=0, number=1, bandwidth=1e9)
    assert with_bw.floor_s == pytest.approx(1e-3)
    assert with_bw.floor_ratio == pytest.approx(with_bw.unorm_s / 1e-3)
    without = measure(bench, repeats=1, warmup=0, number=1)
    assert without.floor_s is None and without.floor_ratio is None


def test_target_met_compares_ratio_with_target() -> None:
    assert Result("t", "b", {}, 1.0, 1.0, 1.0, target_ratio=1.1).target_met is True
    assert Result("t", "b", {}, 1.2, 1.0, 1.2, target_ratio=1.1).target_met is False
    assert Result("t", "b", {}, 1.2, 1.0, 1.2).target_met is None


def test_added_work_is_measured_against_its_own_floor() -> None:
    bench = Benchmark(
        "a",
        "test",
        {},
        unorm=lambda: time.sleep(0.025),
        native=lambda: time.sleep(0.005),
        added_bytes=20 * 10**6,
        added_target=1.3,
    )
    result = measure(bench, repeats=3, warmup=0, number=1, bandwidth=1e9)
    # unorm - native ~ 20 ms over a 20 ms floor: ~1. The sleeps are long against the few
    # milliseconds a loaded machine oversleeps, so the bounds hold on a busy CI machine.
    assert 0.7 < result.added_floor_ratio < 3.0
    assert result.target_met is (result.added_floor_ratio <= 1.3)
    assert (
        Result("t", "b", {}, 2.0, 1.0, 2.0, added_floor_ratio=1.4, added_target=1.3).target_met
        is False
    )
    # Both targets must hold where both are given; no bandwidth means the target is unknown.
    assert (
        Result(
            "t", "b", {}, 2.0, 1.0, 2.0, target_ratio=1.5, added_floor_ratio=1.0, added_target=1.3
        ).target_met
        is False
    )
    assert Result("t", "b", {}, 2.0, 1.0, 2.0, added_target=1.3).target_met is False
    with pytest.raises(ValueError, match="added_target must be positive"):
        Benchmark("a", "t", {}, unorm=lambda: 0, native=lambda: 0, added_target=0.0)


@pytest.mark.parametrize(
    "kwargs", [{"repeats": 0}, {"warmup": -1}, {"min_time": -0.1}, {"number": 0}]
)
def test_measure_rejects_bad_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        measure(logging_bench([]), **kwargs)


def test_benchmark_rejects_bad_fields() -> None:
    with pytest.raises(ValueError, match="bytes_moved"):
        logging_bench([], bytes_moved=0)
    with pytest.raises(TypeError, match="native"):
        Benchmark("x", "test", {}, unorm=lambda: None, native=None)  # type: ignore[arg-type]


def test_memory_bandwidth_is_positive_and_finite() -> None:
    bandwidth = memory_bandwidth(nbytes=2**20, repeats=2)
    assert math.isfinite(bandwidth)
    assert bandwidth > 1e6  # any machine copies more than a megabyte a second


def test_machine_info_records_processor_cores_and_versions() -> None:
    info = machine_info({"torch": "9.9.9"}, gpu="Test GPU")
    assert info["logical_cores"] == os.cpu_count()
    assert info["frameworks"] == {"torch": "9.9.9"}
    assert info["gpu"] == "Test GPU"
    assert info["numpy"] == np.__version__
    assert info["python"] == ".".join(map(str, sys.version_info[:3]))
    cpuinfo = Path("/proc/cpuinfo")
    models = [
        line.split(":", 1)[1].strip()
        for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
        if line.startswith("model name")
    ]
    if models:
        assert info["processor"] == models[0]
    assert info["processor"]


def probe_result() -> Result:
    return Result(
        "bn_probe", "numpy", {"shape": (2, 3), "dtype": "float32"},
        unorm_s=2e-3, native_s=1e-3, ratio=2.0, floor_s=5e-4, floor_ratio=4.0,
        target_ratio=1.5, bytes_moved=10**6, unorm_samples=[2e-3], native_samples=[1e-3],
    )  # fmt: skip


def test_write_results_writes_the_schema(tmp_path: Path) -> None:
    machine = machine_info({"numpy": np.__version__})
    path = write_results([probe_result()], tmp_path / "sub" / "numpy.json", machine, 1.23e10)
    data = json.loads(path.read_text())
    assert data["schema"] == SCHEMA_VERSION
    created = datetime.datetime.fromisoformat(data["created"])
    assert created.utcoffset() == datetime.timedelta(0)
    assert data["bandwidth_bytes_per_s"] == 1.23e10
    assert data["machine"]["processor"] == machine["processor"]
    (row,) = data["results"]
    assert row["params"] == {"shape": [2, 3], "dtype": "float32"}
    assert (row["ratio"], row["floor_ratio"], row["target_met"]) == (2.0, 4.0, False)


def test_report_round_trip_renders_machine_and_table(tmp_path: Path) -> None:
    machine = machine_info({"numpy": np.__version__})
    path = write_results([probe_result()], tmp_path / "numpy.json", machine, 1.23e10)
    text = report.render([path])
    assert text.startswith("## Benchmarks\n")
    assert "| benchmark | params | unorm | native | ratio | rounds | × floor | target |" in text
    assert (
        "| bn_probe | shape=2×3, dtype=float32 | 2.00 ms | 1.00 ms | 2.00 | 2.00-2.00 | 4.0 "
        "| ≤ 1.50 ✗ |" in text
    )
    machine_line = next(line for line in text.splitlines() if line.startswith("**numpy**"))
    assert machine["processor"] in machine_line
    assert f"{machine['logical_cores']} logical cores" in machine_line
    assert "memory copy 12.3 GB/s" in machine_line
    assert f"numpy {np.__version__}" in machine_line
    out = tmp_path / "report.md"
    assert report.main([str(path), "--out", str(out)]) == 0
    assert out.read_text() == text


def test_report_default_files_are_the_results_files_only(tmp_path: Path) -> None:
    machine = machine_info({"numpy": np.__version__})
    kept = write_results([probe_result()], tmp_path / "numpy.json", machine, 1.23e10)
    (tmp_path / "experiment.json").write_text(json.dumps({"runs": []}))
    (tmp_path / "notes.txt").write_text("not json")
    assert report.results_files(tmp_path) == [kept]
    # Named explicitly, a file that is not a results file is an error.
    assert report.main([str(tmp_path / "experiment.json")]) == 2


def test_round_ratios_pair_each_round_and_show_an_order_bias() -> None:
    # Work left running by the first side of a round, timed in the second: every round's
    # ratio swings with the order although the medians look steady.
    result = {
        "unorm_samples": [0.050, 0.052, 0.044, 0.052],
        "native_samples": [0.037, 0.028, 0.040, 0.026],
    }
    assert report.format_round_ratios(result) == "1.10-2.00"
    assert report.format_round_ratios({"unorm_samples": [1.0], "native_samples": [0.0]}) == "–"
    assert report.format_round_ratios({}) == "–"


def test_read_results_rejects_another_schema(tmp_path: Path) -> None:
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"schema": SCHEMA_VERSION + 1, "results": []}))
    with pytest.raises(ValueError, match="schema"):
        read_results(path)


def test_run_unknown_backend_names_the_available_ones(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli.main(["no_such_backend", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "bench_no_such_backend" in err and "numpy" in err


def test_bench_numpy_sides_compute_the_same_thing() -> None:
    for bench in bench_numpy.benchmarks(quick=True):
        unorm, native = np.asarray(bench.unorm()), np.asarray(bench.native())
        np.testing.assert_allclose(unorm, native, rtol=1e-4, atol=1e-5)
    grad, _ = bench_numpy._agc_inputs((128, 128))
    clipped = bench_numpy.agc_clip((128, 128)).unorm()
    changed_rows = int(np.any(clipped != grad, axis=1).sum())
    assert 0 < changed_rows < 128  # both branches of the clip are exercised


def test_run_cli_writes_results_file(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "numpy", "--quick", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = read_results(tmp_path / "numpy.json")
    names = [r["name"] for r in data["results"]]
    assert names == ["batch_norm_inference", "batch_norm_train", "agc_clip"]
    assert data["bandwidth_bytes_per_s"] > 0
    assert data["machine"]["frameworks"] == {"numpy": np.__version__}
    for row in data["results"]:
        assert row["unorm_s"] > 0 and row["native_s"] > 0
        assert row["ratio"] == pytest.approx(row["unorm_s"] / row["native_s"])
        assert row["floor_ratio"] > 0 and len(row["unorm_samples"]) == 3
        assert any(line.startswith(row["name"] + "  ") for line in proc.stdout.splitlines())
