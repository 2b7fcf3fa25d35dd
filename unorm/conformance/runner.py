"""The runner: every backend in its own environment, a progress bar, then the report.

Each backend's worker runs as ``<python> -m unorm.conformance worker``, so MXNet (numpy
1.23) and Keras (numpy 2) never share a process; results come back
as JSON files (:mod:`conformance.results`). A backend whose environment is missing, or
whose worker dies, is still reported (``unavailable`` / ``error``) so the report always has
every column.

Example:
    >>> python_for("no-such-env", {}) is None
    True
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from unorm.progress import ProgressBar

from .adapter import BACKENDS, CHECKOUT, Backend, work_folder
from .cases import Case, select
from .results import BackendResults, Result, read_results, write_results
from .worker import PROGRESS

__all__ = ["DEFAULT_RESULTS", "python_for", "run_workers"]

#: Where workers write their JSON files unless told otherwise (ignored by git).
DEFAULT_RESULTS = work_folder() / "results" / "conformance"


def python_for(environment: str, overrides: Mapping[str, str]) -> Path | None:
    """The interpreter given for ``environment`` (``--python ENV=PATH``, else
    ``$UNORM_CONFORMANCE_PYTHON_<ENV>``), else the checkout's ``.venvs/<env>/bin/python``;
    None when that does not exist.

    Example:
        >>> python_for("current", {"current": sys.executable}) == Path(sys.executable)
        True
    """
    given = _given(environment, overrides)
    if given:
        path = Path(given)
    elif CHECKOUT is not None:
        path = CHECKOUT / ".venvs" / environment / "bin" / "python"
    else:
        return None
    return path if path.exists() else None


def _given(environment: str, overrides: Mapping[str, str]) -> str | None:
    return overrides.get(environment) or os.environ.get(
        f"UNORM_CONFORMANCE_PYTHON_{environment.upper()}"
    )


def interpreter_for(environment: str, overrides: Mapping[str, str]) -> tuple[Path | None, str]:
    """The interpreter that runs ``environment``'s columns and a note on the choice ("" for
    the environment's own). One given that does not exist is None: those columns are
    unavailable. Where none is given and the environment is not built (always so for an
    installed package), the interpreter running the suite: it runs every column whose
    framework it can import and reports the others unavailable.

    Example:
        >>> interpreter_for("current", {"current": sys.executable})[1]
        ''
    """
    own = python_for(environment, overrides)
    if own is not None:
        return own, ""
    given = _given(environment, overrides)
    if given:
        return None, f"the interpreter given for environment {environment!r} ({given}) is missing"
    where = "is not built here (./dev env builds it)" if CHECKOUT else "is a project checkout's"
    return Path(sys.executable), (
        f"environment {environment!r} {where}: its columns run with {sys.executable} "
        "where their frameworks import"
    )


@dataclasses.dataclass
class _Job:
    backend: Backend
    out: Path
    log: Path
    total: int
    done: int = 0
    last: str = ""
    proc: subprocess.Popen[str] | None = None


def _placeholder(
    backend: Backend, cases: Sequence[Case], status: str, detail: str
) -> BackendResults:
    results = [
        Result(c.name, backend.name, c.kind, getattr(c, "dtype", "float32"), status, detail)
        for c in cases
    ]
    return BackendResults(
        backend.name,
        backend.native,
        backend.environment,
        "",
        {},
        status != "unavailable",
        detail if status == "unavailable" else "",
        0.0,
        results,
    )


def _reader(job: _Job, progress: ProgressBar, tick: threading.Event) -> None:
    assert job.proc is not None and job.proc.stdout is not None
    for line in job.proc.stdout:
        if line.startswith(PROGRESS):
            parts = line.split(maxsplit=4)
            job.done = int(parts[1])
            job.last = parts[4].strip() if len(parts) > 4 else ""
            tick.set()


def _start(job: _Job, python: Path, patterns: Sequence[str]) -> None:
    cmd = [str(python), "-m", "unorm.conformance", "worker", "--backend", job.backend.name]
    cmd += ["--out", str(job.out), "--progress"]
    for p in patterns:
        cmd += ["--case", p]
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's banner is noise here
    env.setdefault("PYTHONHASHSEED", "0")
    env["UNORM_CONFORMANCE_ENV"] = job.backend.environment
    job.out.unlink(missing_ok=True)
    job.log.parent.mkdir(parents=True, exist_ok=True)
    log = job.log.open("w")
    job.proc = subprocess.Popen(
        cmd, cwd=work_folder(), env=env, stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1
    )
    log.close()


def _finish(job: _Job, cases: Sequence[Case], timed_out: bool) -> BackendResults:
    code = job.proc.returncode if job.proc else None
    if code == 0 and job.out.exists():
        return read_results(job.out)
    tail = [ln for ln in job.log.read_text(errors="replace").splitlines() if ln.strip()]
    why = "timed out" if timed_out else f"exited with status {code}"
    detail = f"worker {why}: {tail[-1] if tail else 'no output'} (log: {job.log})"
    return _placeholder(job.backend, cases, "error", detail)


def run_workers(
    backends: Sequence[str],
    patterns: Sequence[str] = (),
    results_dir: Path = DEFAULT_RESULTS,
    pythons: Mapping[str, str] | None = None,
    jobs: int = 2,
    timeout: float = 1800.0,
    stream: IO[str] | None = None,
) -> list[BackendResults]:
    """Run each backend's worker (``jobs`` at a time) and return their results in order."""
    out = stream or sys.stderr
    cases = select(list(patterns) or None)
    queue = [
        _Job(BACKENDS[b], results_dir / f"{b}.json", results_dir / f"{b}.log", len(cases))
        for b in backends
    ]
    progress = ProgressBar(len(cases) * len(queue), out)
    finished: dict[str, BackendResults] = {}
    running: list[tuple[_Job, float, threading.Thread]] = []
    tick = threading.Event()
    pending = list(queue)
    told: set[str] = set()
    while pending or running:
        while pending and len(running) < max(jobs, 1):
            job = pending.pop(0)
            env_name = job.backend.environment
            python, note = interpreter_for(env_name, pythons or {})
            if note and env_name not in told:
                told.add(env_name)
                progress.note(note)
            if python is None:
                finished[job.backend.name] = _placeholder(job.backend, cases, "unavailable", note)
                job.done = job.total
                continue
            _start(job, python, patterns)
            thread = threading.Thread(target=_reader, args=(job, progress, tick), daemon=True)
            thread.start()
            running.append((job, time.monotonic(), thread))
        tick.wait(0.2)
        tick.clear()
        for item in list(running):
            job, started, thread = item
            assert job.proc is not None
            timed_out = time.monotonic() - started > timeout
            if timed_out:
                job.proc.kill()
            if job.proc.poll() is None:
                continue
            thread.join(5)
            running.remove(item)
            job.done = job.total
            data = _finish(job, cases, timed_out)
            finished[job.backend.name] = data
            progress.note(_one_line(data, time.monotonic() - started))
        done = sum(j.done for j in queue)
        label = ", ".join(f"{j.backend.name}: {j.last or 'starting'}" for j, _, _ in running)
        progress.update(done, label)
    progress.update(progress.total, "done")
    if progress.tty:
        progress.note("")
    for data in finished.values():
        write_results(data, results_dir / f"{data.backend}.json")
    return [finished[b] for b in backends]


def _one_line(data: BackendResults, seconds: float) -> str:
    counts = {k: v for k, v in data.counts().items() if v}
    shown = ", ".join(f"{v} {k}" for k, v in counts.items())
    return f"{data.backend:>13}: {len(data.results)} cases in {seconds:.1f} s ({shown})"
