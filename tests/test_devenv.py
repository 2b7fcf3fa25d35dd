"""tools/devenv.py: an environment is reused while its pins are unchanged, rebuilt after."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_devenv() -> ModuleType:
    spec = importlib.util.spec_from_file_location("devenv", ROOT / "tools" / "devenv.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["devenv"] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def devenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    module = _load_devenv()
    shutil.copytree(ROOT / "backends", tmp_path / "backends")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    monkeypatch.setattr(module, "ROOT", tmp_path)
    monkeypatch.setattr(module, "VENVS", tmp_path / ".venvs")
    return module


def _mark_built(devenv: ModuleType, env: object) -> None:
    path = devenv.VENVS / env.name  # type: ignore[attr-defined]
    path.mkdir(parents=True)
    marker = {"name": env.name, "fingerprint": devenv.fingerprint(env)}  # type: ignore[attr-defined]
    (path / devenv.MARKER).write_text(json.dumps(marker))


def test_fingerprint_follows_every_pin_file(devenv: ModuleType) -> None:
    current, legacy = devenv.ENVIRONMENTS
    before = {e.name: devenv.fingerprint(e) for e in (current, legacy)}
    # torch's pins are included by both environments through "-r ../torch/requirements.txt"
    torch_pins = devenv.ROOT / "backends" / "torch" / "requirements.txt"
    torch_pins.write_text(torch_pins.read_text() + "\n# touched\n")
    after = {e.name: devenv.fingerprint(e) for e in (current, legacy)}
    assert after["current"] != before["current"] and after["legacy"] != before["legacy"]
    constraints = devenv.ROOT / "backends" / "envs" / "legacy-constraints.txt"
    constraints.write_text("numpy==1.23.4\n")
    assert devenv.fingerprint(legacy) != after["legacy"]
    assert devenv.fingerprint(current) == after["current"]


def test_tool_settings_do_not_rebuild_but_dependencies_do(devenv: ModuleType) -> None:
    current = devenv.ENVIRONMENTS[0]
    before = devenv.fingerprint(current)
    project = devenv.ROOT / "pyproject.toml"
    project.write_text(project.read_text() + "\n[tool.example]\nsetting = 1\n")
    assert devenv.fingerprint(current) == before
    project.write_text(
        project.read_text().replace(
            'dependencies = ["numpy>=1.23"]', 'dependencies = ["numpy>=1.24"]'
        )
    )
    assert devenv.fingerprint(current) != before


def test_built_environment_is_reused_until_pins_change(
    devenv: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    current = devenv.ENVIRONMENTS[0]
    assert devenv.built_fingerprint(current) is None
    _mark_built(devenv, current)
    commands: list[list[object]] = []
    monkeypatch.setattr(devenv, "check", commands.append)
    devenv.ensure(current)
    assert commands == []  # reused: nothing ran
    lock = devenv.ROOT / current.lock
    lock.write_text(lock.read_text() + "\n# touched\n")
    monkeypatch.setattr(devenv.shutil, "rmtree", lambda path: None)
    devenv.ensure(current)
    assert any("venv" in map(str, c) for c in commands)  # rebuilt
    assert devenv.built_fingerprint(current) == devenv.fingerprint(current)
