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

Usage: ``./dev env | main | test [pytest args...] | demo | lockstep | port-check | zoo-check
| gpu``.

``./dev gpu`` is for a machine with an NVIDIA GPU only (never CI): it builds no
environment and runs the checkout from source with the interpreter that runs it (or
``UNORM_GPU_PYTHON``), which must hold a CUDA build of the framework, numpy and pytest
(see :func:`gpu_job`). It exits 3 with a message when no GPU is visible.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
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
    # The package as users install it (tools/wheelcheck.py): built once, into this folder,
    # then installed and tested in a fresh environment beside each project environment's.
    dist = Path(tempfile.mkdtemp(prefix="unorm-dist-"))
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
        wheel = [env.python, ROOT / "tools" / "wheelcheck.py", "--runs", ",".join(env.runs)]
        steps.append(("installed wheel", [*wheel, "--dist", dist]))
        for label, cmd in steps:
            start = time.monotonic()
            code = run(cmd, env=job_env(env))
            took = time.monotonic() - start
            log(f"{env.name}: {label} {'passed' if code == 0 else 'FAILED'} ({took:.0f} s)")
            if code != 0:
                failures.append(f"{env.name}: {label}")
    shutil.rmtree(dist, ignore_errors=True)
    # Porting between environments: every ordered pair of frameworks, through files.
    if cross_environment("port_check") != 0:
        failures.append("port check across environments")
    # Real architectures from other people's code, every ordered pair, through files.
    if cross_environment("zoo_check") != 0:
        failures.append("zoo port check across environments")
    if failures:
        log("FAILED: " + "; ".join(failures))
        return 1
    log("all environments passed")
    return 0


def main_job(extra: list[str]) -> int:
    """The main job: the reference's self-check in every environment, then the conformance
    suite on every backend (each worker in its backend's environment) and its report.

    ``extra`` goes to ``python -m unorm.conformance run`` (e.g. ``--backend torch``).
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
    cmd: list[str | Path] = [runner.python, "-m", "unorm.conformance", "run", *pythons, *extra]
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


#: ``./dev gpu`` fits one call on a lent GPU machine: at most 8 minutes in all.
GPU_BUDGET_S = 480.0
#: What ``./dev gpu`` imports besides a backend's framework (the wheels it names).
GPU_NEEDS = ("numpy", "pytest")
#: The exit status of ``./dev gpu`` when there is no GPU to run on.
NO_GPU = 3


def visible_gpus() -> tuple[list[str], str]:
    """The GPUs this machine shows (``nvidia-smi -L`` lines) and, when none, why not.

    Standard library only, so a machine without a GPU is refused before anything is
    imported or built. ``CUDA_VISIBLE_DEVICES`` set to nothing (or -1) hides every GPU.
    """
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hidden is not None and hidden.strip() in ("", "-1"):
        return [], f"CUDA_VISIBLE_DEVICES={hidden!r} hides every GPU"
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return [], "nvidia-smi is not on PATH (no NVIDIA driver on this machine)"
    try:
        done = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [], f"nvidia-smi -L failed: {exc}"
    gpus = [line for line in done.stdout.splitlines() if line.startswith("GPU ")]
    if done.returncode != 0 or not gpus:
        said = (done.stderr or done.stdout).strip()[:300]
        return [], f"nvidia-smi -L listed no GPU (exit status {done.returncode}: {said})"
    return gpus, ""


def _gpu_env(python: Path) -> dict[str, str]:
    out = dict(os.environ)
    # The checkout itself, not an installed copy: this job builds no environment.
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), out.get("PYTHONPATH")]))
    out["PYTHONUNBUFFERED"] = "1"
    out["UNORM_REQUIRE_GPU"] = "1"  # a device test fails instead of skipping
    out.setdefault("PYTHONHASHSEED", "0")
    out["PATH"] = f"{python.parent}{os.pathsep}{out.get('PATH', '')}"
    return out


def _probe(python: Path, code: str, env: dict[str, str], *args: str) -> tuple[int, str]:
    try:
        done = subprocess.run(
            [str(python), "-c", code, *args],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 1, str(exc)
    lines = (done.stdout if done.returncode == 0 else done.stderr).strip().splitlines()
    return done.returncode, lines[-1] if lines else ""


_GPU_OF = (
    "import importlib, sys\n"
    "plugin = importlib.import_module('benchmarks.bench_' + sys.argv[1])\n"
    "gpu = getattr(plugin, 'gpu', None)\n"
    "print((gpu() if callable(gpu) else None) or '')\n"
)


def gpu_backends(python: Path, env: dict[str, str]) -> list[tuple[str, str]]:
    """``(backend, GPU name)`` for every backend whose benchmark plug-in reports a GPU in
    ``python`` (its ``gpu()``); the others are logged with the reason they are left out."""
    found = []
    for plugin in plugins_in_order():
        code, said = _probe(python, _GPU_OF, env, plugin.name)
        if code != 0:
            log(f"gpu: {plugin.name}: left out, its benchmarks do not import here: {said}")
        elif not said:
            log(f"gpu: {plugin.name}: left out, it sees no GPU (a CPU-only build?)")
        else:
            found.append((plugin.name, said))
    return found


def gpu_job(extra: list[str]) -> int:
    """``./dev gpu``: the checks only a GPU can run, in one call of at most 8 minutes.

    For each backend that sees the GPU: ``tests/test_dev_gpu.py`` of that backend (its
    conformance column on the device, half precision and channels-last layouts, AGC on
    device tensors, cross-replica BatchNorm over the GPU's own collective library, each
    against the NumPy reference), then its benchmarks on the device, written to
    ``benchmarks/results/<backend>-cuda.json``. ``extra`` goes to pytest.
    Exits 3 when no GPU is visible, 1 when a step fails or runs out of time.
    """
    deadline = time.monotonic() + GPU_BUDGET_S
    gpus, why = visible_gpus()
    if not gpus:
        print(
            f"[dev] gpu: FAILED: no GPU is visible: {why}. This job runs only on a machine "
            "with an NVIDIA GPU and a CUDA build of the framework (it is not part of CI).",
            file=sys.stderr,
            flush=True,
        )
        return NO_GPU
    python = Path(os.environ.get("UNORM_GPU_PYTHON", sys.executable))
    env = _gpu_env(python)
    log(f"gpu: {'; '.join(gpus)}; python {python}")
    imports = "; ".join(f"import {m}" for m in GPU_NEEDS)
    code, said = _probe(python, imports, env)
    if code != 0:
        print(
            f"[dev] gpu: FAILED: {python} lacks a module this job needs ({said}); it needs "
            f"{', '.join(GPU_NEEDS)} and a CUDA build of the framework (carry them as wheels)",
            file=sys.stderr,
            flush=True,
        )
        return 1
    backends = gpu_backends(python, env)
    if not backends:
        print(
            "[dev] gpu: FAILED: a GPU is visible but no backend's framework sees it here "
            f"({python}); install a CUDA build of the framework",
            file=sys.stderr,
            flush=True,
        )
        return NO_GPU
    failures: list[str] = []
    results = ROOT / "benchmarks" / "results"
    for name, device in backends:
        log(f"gpu: {name} on {device}")
        env_one = {**env, "UNORM_RUNS": name}
        tests = ROOT / "tests" / "test_dev_gpu.py"
        checks: list[str | Path] = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        checks += [tests, "-m", name, *extra]
        if _gpu_step(f"{name}: device checks", checks, env_one, deadline) != 0:
            failures.append(f"{name}: device checks")
        with tempfile.TemporaryDirectory() as folder:
            bench: list[str | Path] = [python, "-m", "benchmarks.run", name, "--out", folder]
            if _gpu_step(f"{name}: benchmarks", bench, env_one, deadline) != 0:
                failures.append(f"{name}: benchmarks")
            else:
                target = results / f"{name}-cuda.json"
                shutil.copyfile(Path(folder) / f"{name}.json", target)
                log(f"gpu: wrote {target.relative_to(ROOT)}")
    if failures:
        log("gpu: FAILED: " + "; ".join(failures))
        return 1
    log("gpu: every device check passed")
    return 0


def _gpu_step(label: str, cmd: list[str | Path], env: dict[str, str], deadline: float) -> int:
    """Run one step within what is left of the job's time; a step out of time fails."""
    left = deadline - time.monotonic()
    if left < 10:
        log(f"gpu: {label}: FAILED, no time left of the {GPU_BUDGET_S:.0f} s budget")
        return 1
    log(f"$ {' '.join(str(c) for c in cmd)}")
    start = time.monotonic()
    try:
        code = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env, timeout=left).returncode
    except subprocess.TimeoutExpired:
        log(f"gpu: {label}: FAILED, stopped after {left:.0f} s (the job's budget)")
        return 1
    took = time.monotonic() - start
    log(f"gpu: {label} {'passed' if code == 0 else 'FAILED'} ({took:.0f} s)")
    return code


def main(argv: list[str]) -> int:
    commands = ("env", "main", "test", "demo", "lockstep", "port-check", "zoo-check", "gpu")
    if not argv or argv[0] not in commands:
        print(__doc__)
        return 2
    if argv[0] == "gpu":  # the interpreter of the GPU machine, whatever its version
        return gpu_job(argv[1:])
    if sys.version_info[:2] != (3, 11):
        log(f"warning: Python {sys.version.split()[0]}; the pinned torch wheel needs 3.11")
    command, extra = argv[0], argv[1:]
    if command == "env":
        for env in ENVIRONMENTS:
            ensure(env)
        return 0
    if command == "main":
        return main_job(extra)
    if command in ("demo", "lockstep", "port-check", "zoo-check"):
        return cross_environment(command.replace("-", "_"))
    return test(extra)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
