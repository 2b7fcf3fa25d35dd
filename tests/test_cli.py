"""The ``unorm`` command: --version, info and selfcheck."""

from __future__ import annotations

import subprocess
import sys

import pytest

import unorm
from unorm import cli


def _unorm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "unorm", *args], capture_output=True, text=True, timeout=600
    )


def test_version() -> None:
    done = _unorm("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"unorm {unorm.__version__}"


def test_selfcheck_passes_and_reports_every_check() -> None:
    done = _unorm("selfcheck")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 failed" in done.stdout
    assert done.stdout.count("ok  ") >= 20


def test_framework_status_reports_missing_modules_without_raising() -> None:
    ok, detail = cli.framework_status("no_such_framework_xyz")
    assert not ok and "No module named" in detail
    ok, detail = cli.framework_status("numpy")
    assert ok and detail.split(".")[0].isdigit()


def test_info_lists_every_framework() -> None:
    done = _unorm("info")
    assert done.returncode == 0, done.stderr
    for name in cli.FRAMEWORKS:
        assert f"  {name}" in done.stdout
    assert "environment:" in done.stdout


def test_unknown_command_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["conform"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
