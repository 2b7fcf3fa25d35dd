"""Check unorm as users get it: built, installed, and tested outside the source tree.

Standard library only; ``./dev test`` runs it in every project environment (with that
environment's interpreter) after the environment's own tests:

1. build the sdist from the checkout's files, then the wheel *from the sdist* (so a file
   the sdist forgets is missing from the wheel too), with setuptools' PEP 517 hooks;
2. create a fresh virtual environment and install the wheel into it (no dependencies:
   the frameworks are this environment's, linked in by a ``.pth`` file, as a user's own
   environment already holds its framework);
3. in a copy of the checkout without ``unorm/``, so every ``import unorm`` is the
   installed package, run the framework-free tests and those of the conformance suite
   (which read its package data: golden file, xfail lists), import each framework module
   this environment runs, and run ``unorm conformance`` from a folder outside any checkout
   on this environment's columns.

Usage: ``python tools/wheelcheck.py --runs torch,keras [--dist DIR]`` (``DIR`` keeps the
built files for a second environment, which then reuses them).

Example:
    $ .venvs/current/bin/python tools/wheelcheck.py --runs torch,keras
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: Tests that need no framework: with the conformance suite's, they read the package's
#: data and entry points. Each framework's own are run by ``unorm conformance`` here.
PACKAGE_TESTS = (
    "tests/test_imports.py",
    "tests/test_cli.py",
    "tests/test_spec.py",
    "tests/test_reference.py",
    "tests/test_reference_masked.py",
    "tests/test_conformance_cases.py",
    "tests/test_conformance_golden.py",
    "tests/test_conformance_reference.py",
    "tests/test_conformance_report.py",
    "tests/test_conformance_tolerance.py",
    "tests/test_conformance_xfail.py",
    "tests/test_port_checkpoint.py",
)

#: A few cases of every kind for each column ``unorm conformance`` runs here.
CONFORMANCE_CASES = ("bn/rank2", "bn/masked/axis-last", "agc/conv/rank4", "error/rank1")


def log(message: str) -> None:
    print(f"[wheel] {message}", flush=True)


def run(cmd: list[str | Path], **kwargs: object) -> None:
    """Run ``cmd``, raising ``SystemExit`` with its output when it fails."""
    args = [str(c) for c in cmd]
    done = subprocess.run(args, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        sys.stdout.write(done.stdout[-4000:])
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"[wheel] FAILED ({done.returncode}): {' '.join(map(str, cmd))}")


def source_files(root: Path) -> list[str]:
    """The checkout's files as git sees them: tracked, and untracked but not ignored."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=root, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return [name for name in listed.split("\0") if name and (root / name).is_file()]


def copy_tree(root: Path, into: Path, skip: str | None = None) -> None:
    """Copy the checkout's files (:func:`source_files`) into ``into``, leaving out the
    top-level folder ``skip``."""
    for name in source_files(root):
        if skip is not None and name.split("/", 1)[0] == skip:
            continue
        target = into / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target)


def _hook(hook: str, source: Path, out: Path) -> Path:
    """Call setuptools' PEP 517 ``hook`` in ``source``; return the file it wrote."""
    code = f"from setuptools import build_meta as b; print(b.{hook}({str(out)!r}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=source, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"[wheel] FAILED: {hook} in {source}")
    return out / done.stdout.strip().splitlines()[-1]


def build(out: Path) -> tuple[Path, Path]:
    """The sdist from the checkout's files, then the wheel from the unpacked sdist."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        tree = Path(folder) / "tree"
        copy_tree(ROOT, tree)
        sdist = _hook("build_sdist", tree, out)
        with tarfile.open(sdist) as archive:
            archive.extractall(Path(folder) / "sdist", filter="data")
        (unpacked,) = (Path(folder) / "sdist").iterdir()
        wheel = _hook("build_wheel", unpacked, out)
    return sdist, wheel


def site_packages(python: Path | str) -> str:
    """The site-packages folder of interpreter ``python``."""
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    return done.stdout.strip()


def fresh_environment(folder: Path, wheel: Path) -> Path:
    """A new virtual environment holding the wheel, with this environment's packages
    (the frameworks, NumPy, pytest) linked in behind it; returns its interpreter."""
    venv.create(folder, with_pip=False)
    python = folder / "bin" / "python"
    # This environment's site-packages, after the fresh one's own: its .pth files (the
    # editable install of the checkout among them) are not processed from there.
    Path(site_packages(python), "frameworks.pth").write_text(site_packages(sys.executable) + "\n")
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
         "--quiet", "--disable-pip-version-check", wheel])  # fmt: skip
    return python


def check_installed(python: Path, tree: Path, runs: list[str], env: dict[str, str]) -> None:
    """The tests, imports and conformance run of the module docstring, with ``python``."""
    where = subprocess.run(
        [str(python), "-c", "import json, unorm; print(json.dumps(unorm.__file__))"],
        capture_output=True, text=True, cwd=tree, env=env, check=True,
    ).stdout  # fmt: skip
    location = Path(json.loads(where))
    if ROOT in location.parents or tree in location.parents:
        raise SystemExit(f"[wheel] FAILED: unorm imports from {location}, not the wheel")
    log(f"unorm imports from {location.parent}")
    tests = [t for t in PACKAGE_TESTS if (tree / t).exists()]
    run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=tree, env=env)
    log(f"{len(tests)} test files passed against the installed package")
    for framework in runs:
        run([python, "-c", f"import unorm.{framework}"], cwd=tree, env=env)
    log(f"imported {', '.join(f'unorm.{f}' for f in runs)}")
    elsewhere = tree.parent / "elsewhere"
    elsewhere.mkdir()
    columns = ["reference", *(c for f in runs for c in (f, f"{f}-native"))]
    unorm = python.parent / "unorm"
    cmd: list[str | Path] = [unorm, "conformance", "run"]
    for column in columns:
        cmd += ["--backend", column]
    for case in CONFORMANCE_CASES:
        cmd += ["--case", case]
    run(cmd, cwd=elsewhere, env=env)
    if not (elsewhere / "conformance-report.md").exists():
        raise SystemExit("[wheel] FAILED: unorm conformance wrote no report")
    log(f"unorm conformance ran {', '.join(columns)} outside the checkout")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", required=True, help="the frameworks this environment runs")
    parser.add_argument("--dist", type=Path, default=None, help="keep (or reuse) built files")
    args = parser.parse_args(argv)
    runs = [r for r in args.runs.split(",") if r]
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        dist = args.dist or work / "dist"
        wheels = sorted(dist.glob("unorm-*.whl")) if dist.exists() else []
        if wheels:
            wheel = wheels[-1]
            log(f"reusing {wheel.name}")
        else:
            sdist, wheel = build(dist)
            log(f"built {sdist.name} and, from it, {wheel.name}")
        python = fresh_environment(work / "venv", wheel)
        tree = work / "tree"
        copy_tree(ROOT, tree, skip="unorm")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["PATH"] = f"{python.parent}{os.pathsep}{env.get('PATH', '')}"
        check_installed(python, tree, runs, env)
    log(f"passed ({time.monotonic() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
