"""Build the project's environments and run its jobs in them (standard library only).

Two environments, because MXNet 1.9 needs numpy<1.24 while TensorFlow 2.21 needs
numpy>=1.26 (see README.md, Environments):

- ``current``: PyTorch, Keras 3 + TensorFlow, numpy 2;
- ``legacy``:  MXNet 1.9.1, PyTorch, numpy 1.23.5.

Each is a virtual environment under ``.venvs/<name>`` built from the pinned files under
``backends/`` (top-level pins plus a full lock applied as constraints). Its fingerprint
(the pin files' contents, the [project] table of pyproject.toml and the Python
version) is stored in the
environment; a later run reuses it while the fingerprint matches and rebuilds it when any
pin changes.

Usage: ``./dev env | main | test [pytest args...] | demo | lockstep | port-check``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
# The backends come from their plug-in declarations (unorm/_core/registry.py), which import
# only the standard library: importing them here needs the source tree on the path, not
# an environment (this script runs under the bare python3.11 that builds them).
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from unorm._core.registry import plugins_in_order  # noqa: E402

VENVS = ROOT / ".venvs"
MARKER = "unorm-env.json"


@dataclass(frozen=True)
class Environment:
    """One project environment: its pin files and the frameworks whose tests it runs."""

    name: str
    requirements: str
    lock: str
    constraints: tuple[str, ...] = ()
    lint: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return VENVS / self.name

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    @property
    def runs(self) -> tuple[str, ...]:
        """Backends whose tests run here: the plug-ins that name this environment (each
        plug-in names one; a test skips a backend only in an environment not listing it)."""
        return tuple(p.name for p in plugins_in_order() if p.environment == self.name)


ENVIRONMENTS = (
    Environment(
        "current",
        "backends/envs/current.txt",
        "backends/envs/current.lock.txt",
        lint=True,
    ),
    Environment(
        "legacy",
        "backends/envs/legacy.txt",
        "backends/envs/legacy.lock.txt",
        constraints=("backends/envs/legacy-constraints.txt",),
    ),
)

#: Every backend, in its plug-in's order.
FRAMEWORKS = tuple(p.name for p in plugins_in_order())


def log(message: str) -> None:
    print(f"[dev] {message}", flush=True)


def requirement_files(path: Path) -> list[Path]:
    """``path`` and every file it includes with ``-r``/``-c``, in order."""
    files = [path]
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in ("-r", "-c"):
            files += requirement_files((path.parent / parts[1]).resolve())
    return files


def fingerprint(env: Environment) -> str:
    """Hash of everything that decides what is installed in ``env``."""
    digest = hashlib.sha256(f"python {sys.version_info[:3]}".encode())
    files = requirement_files(ROOT / env.requirements)
    files += [ROOT / env.lock]
    files += [ROOT / c for c in env.constraints]
    for f in files:
        digest.update(f.relative_to(ROOT).as_posix().encode())
        digest.update(f.read_bytes())
    # Only the tables that decide what the editable install provides (dependencies, the
    # console script); tool settings such as pytest's or ruff's need no rebuild.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted = {k: project.get(k) for k in ("build-system", "project")}
    digest.update(json.dumps(wanted, sort_keys=True).encode())
    return digest.hexdigest()


def run(cmd: list[str | Path], env: dict[str, str] | None = None) -> int:
    shown = " ".join(str(c) for c in cmd)
    log(f"$ {shown}")
    return subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env).returncode


def check(cmd: list[str | Path]) -> None:
    if run(cmd) != 0:
        raise SystemExit(f"[dev] failed: {' '.join(str(c) for c in cmd)}")


def built_fingerprint(env: Environment) -> str | None:
    """The fingerprint ``env`` was built with, or None when it is missing or unreadable."""
    try:
        value = json.loads((env.path / MARKER).read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def ensure(env: Environment) -> None:
    """Build ``env`` unless a build with the same fingerprint is already there."""
    wanted = fingerprint(env)
    built = built_fingerprint(env)
    if built == wanted:
        log(f"environment {env.name}: up to date ({env.path.relative_to(ROOT)})")
        return
    log(f"environment {env.name}: {'building' if built is None else 'pins changed, rebuilding'}")
    marker = env.path / MARKER
    start = time.monotonic()
    if env.path.exists():
        shutil.rmtree(env.path)
    check([sys.executable, "-m", "venv", env.path])
    pip: list[str | Path] = [
        env.python,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
    ]
    constraints: list[str | Path] = ["-c", ROOT / env.lock]
    for c in env.constraints:
        constraints += ["-c", ROOT / c]
    check([*pip, "-r", ROOT / env.requirements, *constraints])
    # The project itself, editable and without dependencies: the pins above are the truth.
    check([*pip, "--no-deps", "--no-build-isolation", "-e", ROOT, *constraints])
    marker.write_text(json.dumps({"name": env.name, "fingerprint": wanted}, indent=1))
    log(f"environment {env.name}: built in {time.monotonic() - start:.0f} s")


def job_env(env: Environment) -> dict[str, str]:
    out = dict(os.environ)
    out.update(env.extra_env)
    out["UNORM_RUNS"] = ",".join(env.runs)
    out["PATH"] = f"{env.path / 'bin'}{os.pathsep}{out.get('PATH', '')}"
    out.setdefault("PYTHONHASHSEED", "0")
    return out


def test(extra: list[str]) -> int:
    covered = {fw for env in ENVIRONMENTS for fw in env.runs}
    if covered != set(FRAMEWORKS):
        uncovered = sorted(set(FRAMEWORKS) - covered)
        raise SystemExit(f"[dev] no environment runs the tests of {uncovered}")
    failures: list[str] = []
    for env in ENVIRONMENTS:
        ensure(env)
        steps: list[tuple[str, list[str | Path]]] = []
        if env.lint:
            steps += [
                ("ruff check", [env.python, "-m", "ruff", "check", "."]),
                ("ruff format", [env.python, "-m", "ruff", "format", "--check", "."]),
                ("mypy", [env.python, "-m", "mypy"]),
            ]
        steps.append(("pytest", [env.python, "-m", "pytest", "-q", *extra]))
        for label, cmd in steps:
            start = time.monotonic()
            code = run(cmd, env=job_env(env))
            took = time.monotonic() - start
            log(f"{env.name}: {label} {'passed' if code == 0 else 'FAILED'} ({took:.0f} s)")
            if code != 0:
                failures.append(f"{env.name}: {label}")
    # Porting between environments: every ordered pair of frameworks, through files.
    if cross_environment("port_check") != 0:
        failures.append("port check across environments")
    if failures:
        log("FAILED: " + "; ".join(failures))
        return 1
    log("all environments passed")
    return 0


def main_job(extra: list[str]) -> int:
    """The main job: the reference's self-check in every environment, then the conformance
    suite on every backend (each worker in its backend's environment) and its report.

    ``extra`` goes to ``python -m conformance run`` (e.g. ``--backend torch``).
    """
    code = 0
    for env in ENVIRONMENTS:
        ensure(env)
        log(f"{env.name}: unorm selfcheck")
        code |= run([env.path / "bin" / "unorm", "selfcheck"], env=job_env(env))
    # The runner lives in the first (current) environment, which has matplotlib for the
    # heat map; it starts each backend's worker with that backend's environment's python.
    runner = ENVIRONMENTS[0]
    pythons = [f"--python={env.name}={env.python}" for env in ENVIRONMENTS]
    log("conformance: every backend in its environment (report: conformance-report.md)")
    cmd: list[str | Path] = [runner.python, "-m", "conformance", "run", *pythons, *extra]
    code |= run(cmd, env=job_env(runner))
    return code


def framework_pythons() -> dict[str, Path]:
    """The interpreter that runs each framework: the environment that lists it."""
    return {fw: env.python for env in ENVIRONMENTS for fw in env.runs}


def cross_environment(job: str) -> int:
    """One of tools/crossenv.py's jobs (port check, demo, lock-step) over both environments."""
    import crossenv  # tools/ is on the path: this script lives there

    for env in ENVIRONMENTS:
        ensure(env)
    start = time.monotonic()
    passed = getattr(crossenv, job)(framework_pythons(), ROOT, log)
    log(f"{job}: {'passed' if passed else 'FAILED'} ({time.monotonic() - start:.0f} s)")
    return 0 if passed else 1


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("env", "main", "test", "demo", "lockstep", "port-check"):
        print(__doc__)
        return 2
    if sys.version_info[:2] != (3, 11):
        log(f"warning: Python {sys.version.split()[0]}; the pinned torch wheel needs 3.11")
    command, extra = argv[0], argv[1:]
    if command == "env":
        for env in ENVIRONMENTS:
            ensure(env)
        return 0
    if command == "main":
        return main_job(extra)
    if command in ("demo", "lockstep", "port-check"):
        return cross_environment(command.replace("-", "_"))
    return test(extra)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
