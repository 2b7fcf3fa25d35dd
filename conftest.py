"""Test configuration shared by ``tests/``, ``conformance/`` and the doctests in ``unorm/``.

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

FRAMEWORK_MODULES = {"torch": "torch", "keras": "keras", "mxnet": "mxnet"}

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


# Framework modules of the library: their doctests run where the framework's tests run.
collect_ignore = [
    path
    for fw in FRAMEWORK_MODULES
    if not runs_here(fw)
    for path in (f"unorm/{fw}.py", f"unorm/_{fw}", f"unorm/models/{fw}.py")
]
# Helper scripts of a framework's tests (e.g. tests/torch_sync_worker.py) import it.
collect_ignore_glob = [f"tests/{fw}_*.py" for fw in FRAMEWORK_MODULES if not runs_here(fw)]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for fw in FRAMEWORK_MODULES:
            if item.get_closest_marker(fw) and not runs_here(fw):
                item.add_marker(pytest.mark.skip(reason=f"{fw} tests run in another environment"))
