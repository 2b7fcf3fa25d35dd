"""No shared module names a framework in code: every one finds the backends through the
plug-in registry (:mod:`unorm._core.registry`).

A shared module is one that serves every backend: the library's framework-free modules,
the conformance suite, the tools, ``conftest.py`` and the benchmarks' runner, report and
harness. Read with :mod:`ast`, none of them may

1. import a framework (``torch``, ``keras``, ``tensorflow``, ``mxnet``, or any plug-in's
   ``modules``) or a backend's own module (``unorm._<name>``, its public module, its port
   or seed-network module), relatively or absolutely; nor
2. hold a string constant, outside docstrings, that is a framework's or a plug-in's name,
   module, distribution, conformance column or checkpoint file ending (``"torch"``,
   ``"tensorflow-cpu"``, ``"keras-native"``, ``".pt"``, ``"-symbol.json"``), that starts
   with a framework's module path (``"torch.nn"``, ``"unorm._keras.port"``,
   ``"unorm/_mxnet"``), or that is one word (no white space) holding such a name as a
   part of it (``"agc/clipped_dense_keras"``, ``"lenet-torch.safetensors"``).

Prose may name frameworks: docstrings, comments and messages with white space in them.
The framework names come from the registry and from a fixed list, so that a plug-in added
later is covered and a broken registry cannot empty the check.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from unorm._core.registry import plugins

ROOT = Path(__file__).resolve().parents[1]

#: The frameworks, whatever the registry says.
FIXED_FRAMEWORKS = ("torch", "keras", "mxnet", "tensorflow")

#: Names a shared module may still spell, each with why, as (path, value): code outside this
#: change's reach. An entry that no longer occurs fails :func:`test_exemptions_are_used`.
EXEMPT: dict[tuple[str, str], str] = {}


def _module_path(module: str) -> str:
    return module.replace(".", "/")


def _names() -> set[str]:
    names = set(FIXED_FRAMEWORKS)
    for p in plugins():
        names |= {p.name, *p.modules, *p.distributions, *p.distributions.values()}
        names |= {*p.columns, *p.file_endings}
    return names


def _framework_words() -> set[str]:
    """Names that may not appear as a part of a one-word string (frameworks, plug-ins)."""
    return (
        set(FIXED_FRAMEWORKS)
        | {p.name for p in plugins()}
        | {m for p in plugins() for m in p.modules}
    )


def _own_modules() -> set[str]:
    """Module paths that belong to one backend (imports of them, strings starting so)."""
    out: set[str] = set()
    for p in plugins():
        out |= {p.package, p.public_module, p.models_module}
        if p.port_module is not None:  # a backend without a port module yet has none
            out.add(p.port_module)
    return out


def _top_modules() -> set[str]:
    return set(FIXED_FRAMEWORKS) | {m for p in plugins() for m in p.modules}


def shared_modules() -> list[Path]:
    """Every shared module (module docstring), as paths relative to the repository root."""
    own_files = {
        Path(_module_path(m) + ".py") for p in plugins() for m in (p.public_module, p.models_module)
    }
    found = [
        *ROOT.glob("unorm/*.py"),
        *ROOT.glob("unorm/_core/*.py"),
        *ROOT.glob("unorm/models/*.py"),
        *ROOT.glob("unorm/conformance/*.py"),
        *ROOT.glob("tools/*.py"),
        ROOT / "conftest.py",
        *(ROOT / "benchmarks" / f"{name}.py" for name in ("run", "report", "harness")),
    ]
    return sorted(p.relative_to(ROOT) for p in found if p.relative_to(ROOT) not in own_files)


def _docstrings(tree: ast.AST) -> set[int]:
    """Ids of the string constants that are prose: docstrings and other bare string
    statements (attribute docstrings)."""
    return {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    }


def _package_of(path: Path) -> list[str]:
    """The package a module file belongs to (an ``__init__.py``'s is its own folder's)."""
    return list(path.parent.parts)


def _imported(node: ast.Import | ast.ImportFrom, path: Path) -> Iterator[str]:
    """The absolute names an import statement imports (``from a import b``: ``a`` and
    ``a.b``)."""
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
        return
    base = node.module or ""
    if node.level:
        package = _package_of(path)
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, *([base] if base else [])])
    if base:
        yield base
    for alias in node.names:
        yield f"{base}.{alias.name}" if base else alias.name


def _forbidden_import(module: str, own: set[str], tops: set[str]) -> bool:
    if module.split(".")[0] in tops:
        return True
    return any(module == m or module.startswith(m + ".") for m in own)


def _word_pattern(words: set[str]) -> re.Pattern[str]:
    alternatives = "|".join(sorted(map(re.escape, words), key=len, reverse=True))
    return re.compile(rf"(?<![A-Za-z0-9])(?:{alternatives})(?![A-Za-z0-9])")


def _forbidden_string(value: str, names: set[str], prefixes: tuple[str, ...]) -> str | None:
    """Why ``value`` may not appear in a shared module, or None."""
    if value in names:
        return "names a framework or plug-in"
    if value.startswith(prefixes):
        return "starts with a framework's module path"
    if not any(c.isspace() for c in value) and _WORDS.search(value):
        return "holds a framework's name as a part of one word"
    return None


_WORDS = _word_pattern(_framework_words())


def violations(path: Path) -> list[str]:
    """``path:line: what`` for every framework named in code in ``path`` (relative)."""
    tree = ast.parse((ROOT / path).read_text(), filename=str(path))
    prose = _docstrings(tree)
    names, own, tops = _names(), _own_modules(), _top_modules()
    prefixes = tuple(
        [f"{fw}." for fw in tops] + sorted(own) + [_module_path(m) for m in sorted(own)]
    )
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            for module in _imported(node, path):
                if _forbidden_import(module, own, tops):
                    found.append(f"{path}:{node.lineno}: imports {module}")
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in prose
            and (path.as_posix(), node.value) not in EXEMPT
        ):
            why = _forbidden_string(node.value, names, prefixes)
            if why:
                found.append(f"{path}:{node.lineno}: string {node.value!r} {why}")
    return sorted(set(found), key=lambda line: (int(line.split(":")[1]), line))


def test_the_names_come_from_the_registry_too() -> None:
    # The registry is consulted, not only the fixed list: every plug-in and its endings.
    assert {p.name for p in plugins()} >= set(FIXED_FRAMEWORKS) - {"tensorflow"}
    assert {".pt", "-symbol.json", "keras-native", "tensorflow-cpu"} <= _names()
    assert Path("unorm/spec.py") in shared_modules()
    assert Path("unorm/models/__main__.py") in shared_modules()
    assert not {Path(f"unorm/{fw}.py") for fw in ("torch", "keras", "mxnet")} & set(
        shared_modules()
    )


def test_the_check_finds_what_it_forbids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sample = tmp_path / "unorm" / "models" / "sample.py"
    sample.parent.mkdir(parents=True)
    sample.write_text(
        '"""A docstring may say torch, keras and .pt."""\n'
        "from .._keras import port\n"
        "from .. import mxnet\n"
        "from . import torch\n"
        "import tensorflow as tf\n"
        'NAME = "torch"\n'
        'MODULE = "unorm._keras.port"\n'
        'ENDING = "-symbol.json"\n'
        'CASE = "agc/clipped_dense_keras"\n'
        'PROSE = "PyTorch and Keras disagree on the torch axis"\n'
        'FINE = "neutral"\n'
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    lines = [v.split(": ", 1)[1] for v in violations(Path("unorm/models/sample.py"))]
    assert lines == [
        "imports unorm._keras",
        "imports unorm._keras.port",
        "imports unorm.mxnet",
        "imports unorm.models.torch",
        "imports tensorflow",
        "string 'torch' names a framework or plug-in",
        "string 'unorm._keras.port' starts with a framework's module path",
        "string '-symbol.json' names a framework or plug-in",
        "string 'agc/clipped_dense_keras' holds a framework's name as a part of one word",
    ]


@pytest.mark.parametrize("path", shared_modules(), ids=str)
def test_shared_module_names_no_framework(path: Path) -> None:
    found = violations(path)
    assert not found, "a shared module names a framework; read the plug-ins instead:\n" + (
        "\n".join(found)
    )


def test_exemptions_are_used() -> None:
    for (path, value), why in EXEMPT.items():
        tree = ast.parse((ROOT / path).read_text())
        prose = _docstrings(tree)
        held = {
            n.value
            for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in prose
        }
        assert value in held, f"{path} no longer holds {value!r}: drop its exemption ({why})"


def test_the_registry_imports_without_numpy_or_a_framework() -> None:
    # tools/devenv.py runs under a bare python3.11: the registry, reached through
    # unorm/__init__.py, and the tools that read it must need nothing installed.
    blocked = ["numpy", *_top_modules()]
    code = (
        "import json, sys\n"
        f"for name in {blocked!r}: sys.modules[name] = None\n"
        f"sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tools')!r}]\n"
        "from unorm._core.registry import plugins_in_order\n"
        "import devenv, crossenv\n"
        "runs = {e.name: list(e.runs) for e in devenv.ENVIRONMENTS}\n"
        "print(json.dumps([[p.name for p in plugins_in_order()], runs]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    names, runs = json.loads(done.stdout.strip().splitlines()[-1])
    assert sorted(names) == sorted(p.name for p in plugins())
    assert sorted(fw for env in runs.values() for fw in env) == sorted(names)
    assert runs == {
        env: [n for n in names if next(p for p in plugins() if p.name == n).environment == env]
        for env in runs
    }
