"""Test configuration shared by ``tests/`` and the doctests in ``unorm/`` (the conformance
suite, ``unorm/conformance/``, included).

- Hypothesis runs derandomized (a fixed seed) when ``CI`` is set, and prints a
  reproducing blob for every failure.
- ``UNORM_RUNS`` (set by ``./dev``) names the frameworks whose tests this environment
  runs. A test marked ``torch``/``keras``/``mxnet`` skips only where its framework is not
  listed; where it is listed, a framework that fails to import is an error, not a skip.
  Without ``UNORM_RUNS`` (a plain ``pytest`` call) a test runs when its framework imports.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
from hypothesis import HealthCheck, settings

from unorm._core.registry import BackendPlugin, plugins_in_order

#: The module each backend's tests need, by plug-in name (its plug-in's first ``modules``).
FRAMEWORK_MODULES = {p.name: p.modules[0] for p in plugins_in_order()}

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    print_blob=True,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, print_blob=True, max_examples=60)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def runs_here(framework: str) -> bool:
    """Whether this environment runs ``framework``'s tests."""
    listed = os.environ.get("UNORM_RUNS")
    if listed is not None:
        return framework in listed.split(",")
    return importlib.util.find_spec(FRAMEWORK_MODULES[framework]) is not None


def _own_paths(declared: BackendPlugin) -> tuple[str, ...]:
    """The library files of one backend: its public module, its private package, its
    seed networks (the modules its plug-in names) and its conformance columns (with their
    helper scripts, ``unorm/conformance/columns/<name>_*.py``)."""
    public, models = (
        m.replace(".", "/") + ".py" for m in (declared.public_module, declared.models_module)
    )
    columns = f"unorm/conformance/columns/{declared.name}"
    return public, declared.package.replace(".", "/"), models, f"{columns}.py"


def _own_globs(declared: BackendPlugin) -> tuple[str, ...]:
    """Patterns of one backend's test helpers, column helpers and zoo modules (which
    import it; a zoo module's name ends with its framework's, ``unorm/models/zoo/``)."""
    return (
        f"tests/{declared.name}_*.py",
        f"unorm/conformance/columns/{declared.name}_*.py",
        f"unorm/models/zoo/*_{declared.name}.py",
    )


# Framework modules of the library: their doctests run where the framework's tests run.
collect_ignore = [
    path for p in plugins_in_order() if not runs_here(p.name) for path in _own_paths(p)
]
# Helper scripts of a framework's tests (e.g. tests/torch_sync_worker.py) import it.
collect_ignore_glob = [
    pattern for p in plugins_in_order() if not runs_here(p.name) for pattern in _own_globs(p)
]


def pytest_configure(config: pytest.Config) -> None:
    # One marker per backend, from its plug-in, so a new backend needs no pyproject entry.
    for p in plugins_in_order():
        config.addinivalue_line("markers", f"{p.marker}: needs {p.title} ({p.name} tests)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for fw in FRAMEWORK_MODULES:
            if item.get_closest_marker(fw) and not runs_here(fw):
                item.add_marker(pytest.mark.skip(reason=f"{fw} tests run in another environment"))
