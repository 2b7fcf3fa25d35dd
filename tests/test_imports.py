"""``import unorm`` must import no framework, and ``import unorm.torch`` no framework but
PyTorch (checked in a fresh interpreter)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

FRAMEWORKS = ["torch", "tensorflow", "keras", "mxnet", "jax"]


def _modules_after(statement: str) -> set[str]:
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def test_import_unorm_imports_no_framework() -> None:
    loaded = _modules_after("import unorm, unorm.spec, unorm.reference, unorm.cli, unorm.selfcheck")
    assert "unorm.reference" in loaded  # the probe did import the package
    assert not {m.split(".")[0] for m in loaded} & set(FRAMEWORKS)


@pytest.mark.torch
@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="PyTorch not installed")
def test_import_unorm_torch_imports_no_other_framework() -> None:
    loaded = _modules_after("import unorm.torch")
    assert "unorm._torch.batchnorm" in loaded and "torch" in loaded  # the probe worked
    assert not {m.split(".")[0] for m in loaded} & {"keras", "tensorflow", "mxnet"}
