"""The backend plug-ins: one declaration per framework, found by discovery, never by name.

A backend is a private package ``unorm/_<name>/`` whose module ``plugin`` defines
``PLUGIN``, a :class:`BackendPlugin`. The declaration is plain data: reading it imports no
framework (the ``plugin`` module imports only this one), so the conformance runner, the
CLI, ``unorm port``, the dev tool, the benchmarks and the tests can all ask "which
backends are there, in which environment, with which file endings" without importing any
of them. Everything a backend does runs from the modules the declaration names, imported
only when used (einops's ``_backends.py`` works the same way).

The standard-library tools (``tools/devenv.py`` runs under a bare ``python3.11``) read
it too, by putting the repository root on ``sys.path`` and importing this module. That
executes ``unorm/__init__.py``, which imports only :mod:`unorm.spec`; both, and every
``plugin`` module, import nothing but the standard library and ``unorm._core`` (NumPy is
imported inside the functions of :mod:`unorm._core.layer_kinds` that move arrays). So no
loader that bypasses the package is needed, and the package's own import keeps one path;
``tests/test_no_framework_names.py`` checks in a subprocess with NumPy blocked that this
stays true.

Example:
    >>> sorted(p.name for p in plugins())
    ['flax', 'keras', 'mxnet', 'torch']
    >>> [p.name for p in plugins_in_order()]
    ['torch', 'keras', 'mxnet', 'flax']
    >>> plugin("keras").layouts["dense"].unit_axes("dense", 2)
    (1,)
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from .layer_kinds import KernelLayout

__all__ = ["BackendPlugin", "plugin", "plugin_names", "plugins", "plugins_in_order"]


@dataclasses.dataclass(frozen=True)
class BackendPlugin:
    """What the rest of the project needs to know about one backend.

    Attributes:
        name: the backend's name, also its preset's and its conformance column's
            (``torch``); its private package is ``unorm._<name>``.
        title: how people call the framework (``PyTorch``).
        environment: the project environment that runs its tests (``tools/devenv.py``).
        modules: the framework modules it imports (``import unorm`` imports none of them).
        distributions: module -> distribution whose version ``unorm info`` reports.
        native_preset: its native BatchNorm's settings in unorm's convention
            (:class:`unorm.spec.BatchNormSpec` fields); the preset of the same name.
        native_arguments: how its native BatchNorm names its arguments, for
            :meth:`unorm.spec.BatchNormSpec.from_native`: ``"eps"`` or ``"epsilon"``
            names eps, ``momentum_weighs`` is ``"new"`` or ``"old"``, ``affine`` says
            whether one flag stands for center and scale, ``default_axis`` its feature
            axis, ``cumulative_average`` whether its layer takes ``momentum=None`` (the
            cumulative average, :meth:`unorm.spec.BatchNormSpec.native_gaps`).
        layouts: layer kind -> :class:`~unorm._core.layer_kinds.KernelLayout` of its
            weights (the kinds it has).
        file_endings: checkpoint file-name endings of its native formats (``.pt``).
        columns: its conformance columns, each ``backends/<column>/adapter.py``; the
            first is unorm's own, a column ending in ``-native`` its framework's layers.
        public_module: the module users import (``unorm.torch``).
        port_module: the module implementing :class:`unorm._core.port_plan.PortBackend`,
            or None for a backend that cannot port yet (:attr:`ports` is then False:
            ``unorm port`` and the seed-network jobs leave it out).
        models_module: the module of its seed networks (``MODELS``, ``seed(n)``).
        order: its place wherever the backends are listed for people or walked in turn
            (report columns, presets, ``unorm info``, the cross-environment jobs, whose
            first backend trains the demo); :func:`plugins_in_order` sorts by it.
        marker: the pytest marker of its tests.
    """

    name: str
    title: str
    environment: str
    modules: tuple[str, ...]
    distributions: Mapping[str, str]
    native_preset: Mapping[str, Any]
    native_arguments: Mapping[str, Any]
    layouts: Mapping[str, KernelLayout]
    file_endings: tuple[str, ...]
    columns: tuple[str, ...]
    public_module: str
    port_module: str | None
    models_module: str
    order: int

    @property
    def marker(self) -> str:
        """The pytest marker of this backend's tests (its name)."""
        return self.name

    @property
    def ports(self) -> bool:
        """Whether the backend has a port module (checkpoints in and out)."""
        return self.port_module is not None

    @property
    def package(self) -> str:
        """Its private package, ``unorm._<name>``."""
        return f"unorm._{self.name}"

    def load(self, which: str) -> ModuleType:
        """Import one of the modules the declaration names: ``"public"``, ``"port"`` or
        ``"models"`` (this imports the framework). A ``LookupError`` for ``"port"`` where
        the backend has none (:attr:`ports`)."""
        if which == "port" and self.port_module is None:
            raise LookupError(f"{self.title} ({self.name}) has no port module yet")
        module = {
            "public": self.public_module,
            "port": self.port_module,
            "models": self.models_module,
        }[which]
        assert module is not None  # only port_module may be None, refused above
        return importlib.import_module(module)


@functools.cache
def _discover() -> dict[str, BackendPlugin]:
    import unorm

    found: dict[str, BackendPlugin] = {}
    for info in pkgutil.iter_modules(unorm.__path__):
        if not (info.ispkg and info.name.startswith("_") and info.name != "_core"):
            continue
        try:
            module = importlib.import_module(f"unorm.{info.name}.plugin")
        except ModuleNotFoundError as err:
            if err.name == f"unorm.{info.name}.plugin":
                continue  # a private package that is not a backend
            raise
        declared = module.PLUGIN
        if not isinstance(declared, BackendPlugin) or declared.package != module.__package__:
            raise TypeError(f"unorm.{info.name}.plugin.PLUGIN must be its BackendPlugin")
        found[declared.name] = declared
    return dict(sorted(found.items()))


def plugins() -> tuple[BackendPlugin, ...]:
    """Every backend plug-in, sorted by name."""
    return tuple(_discover().values())


def plugins_in_order() -> tuple[BackendPlugin, ...]:
    """Every backend plug-in in its declared :attr:`~BackendPlugin.order` (then by name)."""
    return tuple(sorted(_discover().values(), key=lambda p: (p.order, p.name)))


def plugin_names() -> tuple[str, ...]:
    """The backends' names, sorted."""
    return tuple(_discover())


def plugin(name: object) -> BackendPlugin:
    """The plug-in called ``name``; a ``ValueError`` listing the backends if none is."""
    found = _discover()
    if not isinstance(name, str) or name not in found:
        listed = ", ".join(repr(n) for n in found)
        raise ValueError(f"backend must be one of {listed}, got {name!r}")
    return found[name]
