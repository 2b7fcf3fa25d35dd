"""The report, rendered from a synthetic results file: terminal summary, markdown, HTML,
heat map, and the exit status."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from unorm.conformance import cli, report
from unorm.conformance.heatmap import score_of, write_heatmap
from unorm.conformance.results import BackendResults, Result, read_results, write_results


def _synthetic() -> list[BackendResults]:
    def result(case: str, backend: str, status: str, **kw: object) -> Result:
        return Result(case, backend, "batchnorm", "float32", status, **kw)  # type: ignore[arg-type]

    torch = BackendResults(
        "torch", False, "current", "/py", {"torch": "2.13.0"}, True, "", 1.5,
        [
            result("bn/rank2", "torch", "pass", max_abs=1e-7, max_rel=5e-8, ulps=0.8, score=0.01),
            result("bn/rank4", "torch", "fail", detail="running_var@1: max abs err 0.03",
                   worst="running_var@1", max_abs=0.03, max_rel=0.03, ulps=2.5e5, score=750.0),
            result("bn/eps/0", "torch", "xfail", detail="ValueError", xfail_cause="kernel"),
        ],
    )  # fmt: skip
    native = BackendResults(
        "torch-native", True, "current", "/py", {}, True, "", 0.5,
        [
            result("bn/rank2", "torch-native", "pass", max_abs=0.0, max_rel=0.0, ulps=0.0,
                   score=0.0),
            result("bn/rank4", "torch-native", "departs", detail="native departs: skip_nonfinite",
                   max_abs=math.inf, max_rel=math.inf, ulps=math.inf, score=math.inf),
            result("bn/eps/0", "torch-native", "unsupported", detail="no eps 0"),
        ],
    )  # fmt: skip
    mxnet = BackendResults(
        "mxnet",
        False,
        "legacy",
        "",
        {},
        False,
        "unorm.mxnet is not importable yet",
        0.0,
        [result(c, "mxnet", "unavailable", detail="not yet") for c in ("bn/rank2", "bn/rank4")],
    )
    return [torch, native, mxnet]


def test_results_round_trip_through_json(tmp_path: Path) -> None:
    data = _synthetic()
    for d in data:
        write_results(d, tmp_path / f"{d.backend}.json")
    back = [read_results(tmp_path / f"{d.backend}.json") for d in data]
    assert back == data  # inf survives the trip (JSON has none)
    body = json.loads((tmp_path / "torch-native.json").read_text())
    assert body["schema"] == 1 and body["results"][1]["max_abs"] == "inf"


def test_a_file_of_another_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"schema": 99}))
    with pytest.raises(ValueError, match="schema 99"):
        read_results(path)


def test_terminal_summary_names_failures_and_counts() -> None:
    text = report.render_terminal(_synthetic())
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["backend", "env", "pass", "fail"]
    assert "FAIL bn/rank4 [torch]: running_var@1: max abs err 0.03" in text
    assert "mxnet: not available (unorm.mxnet is not importable yet)" in text
    assert "torch-native: 1 case(s) where the native layer departs" in text
    assert lines[-1] == "FAILED: 1 failing result(s) of 5 run"


def test_exit_status_counts_only_real_failures() -> None:
    data = _synthetic()
    assert report.exit_code(data) == 1
    data[0].results[1].status = "xfail"  # departs, unavailable, unsupported, xfail: fine
    assert report.exit_code(data) == 0
    data[0].results[0].status = "xpass"
    assert report.exit_code(data) == 1


def test_a_run_that_ran_nothing_fails_and_says_why() -> None:
    data = _synthetic()
    for d in data:
        d.available = False
        for r in d.results:
            r.status = "unavailable"
    assert report.exit_code(data) == 1
    line = report.verdict(data)
    assert line.startswith("FAILED: nothing ran (environment ")
    assert "--python ENV=PATH" in line


def test_markdown_has_summary_sections_and_matrix() -> None:
    md = report.render_markdown(_synthetic(), image="conformance-report.png")
    assert md.startswith("# unorm conformance report")
    assert "| backend | env | pass | fail |" in md
    assert "## Failures" in md and "`bn/rank4` [torch]" in md
    assert "## Expected failures (xfail)" in md and "cause: kernel" in md
    assert "## Native departures" in md and "native departs: skip_nonfinite" in md
    assert "| case | torch | torch-native | mxnet |" in md
    assert "| `bn/rank2` | pass 1e-07 / 5e-08 / 0.8 ulp | pass 0 / 0 / 0 ulp | n.a. |" in md
    assert "![error / tolerance per case and backend](conformance-report.png)" in md


def test_html_is_self_contained_and_escaped() -> None:
    data = _synthetic()
    data[0].results[1].detail = "<b>&"
    page = report.render_html(data, image=None)
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    assert "&lt;b&gt;&amp;" in page and "<b>&" not in page.replace("<b>FAILED", "")
    assert page.count("<tr><th class=case>") == 3
    assert "FAIL 0.03 / 0.03 / 2.5e+05 ulp" in page


def test_heat_map_scores() -> None:
    assert score_of(Result("c", "b", "agc", "float32", "pass", score=0.0)) == -6.0
    assert score_of(Result("c", "b", "agc", "float32", "fail", score=1e9)) == 3.0
    assert math.isnan(score_of(Result("c", "b", "agc", "float32", "unavailable")))


def test_report_files_are_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    paths = cli.write_report(_synthetic(), tmp_path)
    assert sorted(p.name for p in paths) == [
        "conformance-report.html",
        "conformance-report.md",
        "conformance-report.png",
    ]
    assert (tmp_path / "conformance-report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_heat_map_without_matplotlib_is_skipped_not_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name: str, *args: object, **kwargs: object) -> object:
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert write_heatmap(_synthetic(), tmp_path / "x.png") is False
    paths = cli.write_report(_synthetic(), tmp_path)
    assert [p.name for p in paths] == ["conformance-report.md", "conformance-report.html"]
