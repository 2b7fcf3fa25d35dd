"""The benchmark harness every backend's benchmarks plug into (standard library + NumPy only).

A :class:`Benchmark` pairs a unorm operation with its native counterpart, both as
zero-argument callables over inputs the plug-in built beforehand. :func:`measure` times the
two alternately in this process and returns a :class:`Result` with medians and their ratio.
:func:`memory_bandwidth` measures this machine's memory copy bandwidth, which turns a
benchmark's ``bytes_moved`` into a floor: the time the operation would take if it did
nothing but read its inputs and write its outputs once. :func:`machine_info` and
:func:`write_results` record what ran where.

Example:
    >>> bench = Benchmark("add", "numpy", {"n": 3}, unorm=lambda: 1 + 1, native=lambda: 2)
    >>> result = measure(bench, repeats=3, warmup=1, number=10)
    >>> len(result.unorm_samples), len(result.native_samples)
    (3, 3)
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "SCHEMA_VERSION",
    "Benchmark",
    "Result",
    "machine_info",
    "measure",
    "memory_bandwidth",
    "read_results",
    "write_results",
]

#: Version of the results file layout written by :func:`write_results`.
SCHEMA_VERSION = 1

#: Most inner-loop calls per sample that :func:`measure` will choose.
_MAX_NUMBER = 1_000_000


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One comparison: a unorm operation against its native counterpart.

    ``name`` names the operation (``"batch_norm_train"``), ``backend`` the plug-in
    (``"torch"``) and ``params`` what sets its size (JSON-serialisable values, e.g.
    ``{"shape": (32, 64, 56, 56), "dtype": "float32"}``). ``unorm`` and ``native`` take no
    arguments; build their inputs once, outside them. ``sync`` (default None) is called on
    each callable's return value before the clock stops, so that asynchronous frameworks
    (CUDA, TensorFlow) finish the work being timed. ``bytes_moved`` (default None) is the
    operation's minimal memory traffic, bytes read plus bytes written, for the floor ratio;
    ``target_ratio`` (default None) is the unorm/native ratio the backend promises to stay
    under. When unorm does the native operation plus work of its own (AGC's clip on top of
    a plain optimizer step), ``added_bytes`` is that work's minimal memory traffic and
    ``added_target`` the most its time, ``unorm - native``, may be over that floor.

    Example:
        >>> b = Benchmark("copy", "numpy", {"n": 4}, unorm=lambda: 0, native=lambda: 0,
        ...               bytes_moved=64, target_ratio=1.1)
        >>> b.bytes_moved, b.target_ratio
        (64, 1.1)
    """

    name: str
    backend: str
    params: dict[str, Any]
    unorm: Callable[[], object]
    native: Callable[[], object]
    sync: Callable[[object], None] | None = None
    bytes_moved: int | None = None
    target_ratio: float | None = None
    added_bytes: int | None = None
    added_target: float | None = None

    def __post_init__(self) -> None:
        if not self.name or not self.backend:
            raise ValueError("a benchmark needs a non-empty name and backend")
        for label in ("unorm", "native"):
            if not callable(getattr(self, label)):
                raise TypeError(f"benchmark {self.name!r}: {label} must be callable")
        if self.sync is not None and not callable(self.sync):
            raise TypeError(f"benchmark {self.name!r}: sync must be callable or None")
        if self.bytes_moved is not None and self.bytes_moved <= 0:
            raise ValueError(f"benchmark {self.name!r}: bytes_moved must be positive")
        for label in ("target_ratio", "added_bytes", "added_target"):
            value = getattr(self, label)
            if value is not None and not value > 0:
                raise ValueError(f"benchmark {self.name!r}: {label} must be positive")


@dataclasses.dataclass(frozen=True)
class Result:
    """What :func:`measure` found for one :class:`Benchmark`.

    ``unorm_s`` and ``native_s`` are median seconds per call; ``ratio`` is
    ``unorm_s / native_s`` (below 1: unorm is faster). ``floor_s`` is ``bytes_moved`` divided
    by the memory bandwidth and ``floor_ratio`` is ``unorm_s / floor_s`` (1 means unorm runs
    at the memory-traffic floor); both are None when either is unknown.
    ``added_floor_ratio`` is ``(unorm_s - native_s)`` over the floor of the benchmark's
    ``added_bytes`` (None without them). ``target_met`` is None without a target; with
    ``target_ratio`` and/or ``added_target`` it says whether every one given was met.
    ``unorm_samples`` and ``native_samples`` hold every repeat's
    seconds per call, ``unorm_number`` and ``native_number`` the calls in each sample.

    Example:
        >>> r = Result("op", "numpy", {}, unorm_s=2.0, native_s=1.0, ratio=2.0,
        ...            target_ratio=1.5)
        >>> r.target_met
        False
    """

    name: str
    backend: str
    params: dict[str, Any]
    unorm_s: float
    native_s: float
    ratio: float
    floor_s: float | None = None
    floor_ratio: float | None = None
    target_ratio: float | None = None
    bytes_moved: int | None = None
    unorm_samples: list[float] = dataclasses.field(default_factory=list)
    native_samples: list[float] = dataclasses.field(default_factory=list)
    unorm_number: int = 1
    native_number: int = 1
    added_floor_ratio: float | None = None
    added_target: float | None = None

    @property
    def target_met(self) -> bool | None:
        """True when ``ratio <= target_ratio`` and ``added_floor_ratio <= added_target``
        (each where given); None when there is no target.

        Example:
            >>> Result("op", "numpy", {}, 1.0, 1.0, 1.0).target_met is None
            True
            >>> Result("op", "numpy", {}, 3.0, 1.0, 3.0, added_floor_ratio=1.2,
            ...        added_target=1.3).target_met
            True
        """
        checks = []
        if self.target_ratio is not None:
            checks.append(self.ratio <= self.target_ratio)
        if self.added_target is not None:
            ratio = self.added_floor_ratio
            checks.append(ratio is not None and ratio <= self.added_target)
        return all(checks) if checks else None

    def to_dict(self) -> dict[str, Any]:
        """The result as a JSON-ready dict (``params`` made JSON-safe).

        Example:
            >>> Result("op", "numpy", {"shape": (2, 3)}, 1.0, 1.0, 1.0).to_dict()["params"]
            {'shape': [2, 3]}
        """
        data = dataclasses.asdict(self)
        data["params"] = _jsonable(self.params)
        data["target_met"] = self.target_met
        return data


def _jsonable(value: Any) -> Any:
    """``value`` with tuples as lists, NumPy scalars as Python numbers and the rest as str."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _time_block(
    fn: Callable[[], object], sync: Callable[[object], None] | None, number: int
) -> float:
    """Seconds taken by ``number`` calls of ``fn``, each synced, with the GC paused."""
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in range(number):
            out = fn()
            if sync is not None:
                sync(out)
        return time.perf_counter() - start
    finally:
        if gc_was_enabled:
            gc.enable()


def _calibrate(
    fn: Callable[[], object], sync: Callable[[object], None] | None, min_time: float
) -> int:
    """The inner-loop count that makes one sample of ``fn`` last at least ``min_time``."""
    number = 1
    while number < _MAX_NUMBER:
        elapsed = _time_block(fn, sync, number)
        if elapsed >= min_time:
            return number
        # Grow towards the estimate, at most tenfold per try, so one slow outlier cannot
        # make a sample run for minutes.
        estimate = math.ceil(number * min_time * 1.2 / max(elapsed, 1e-9))
        number = min(max(number + 1, estimate), number * 10, _MAX_NUMBER)
    return _MAX_NUMBER


def _check_measure_args(repeats: int, warmup: int, min_time: float, number: int | None) -> None:
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be 0 or more, got {warmup}")
    if not min_time >= 0:
        raise ValueError(f"min_time must be 0 or more seconds, got {min_time}")
    if number is not None and number < 1:
        raise ValueError(f"number must be at least 1 or None, got {number}")


def _floor(bytes_moved: int | None, bandwidth: float | None) -> float | None:
    if bytes_moved is None or bandwidth is None or not bandwidth > 0:
        return None
    return bytes_moved / bandwidth


def measure(
    bench: Benchmark,
    repeats: int = 7,
    warmup: int = 2,
    min_time: float = 0.05,
    *,
    bandwidth: float | None = None,
    number: int | None = None,
) -> Result:
    """Time ``bench.unorm`` against ``bench.native`` alternately and compare the medians.

    Both callables are first called ``warmup`` times each (default 2), alternately. Then an
    inner-loop count is chosen per side so that one sample lasts at least ``min_time``
    seconds (default 0.05); pass ``number`` to fix it for both sides instead. Each of the
    ``repeats`` rounds (default 7) takes one sample of each side, unorm first in even rounds
    and native first in odd ones, so slow drift (clock boost, heat, other load) hits both
    alike. Every call's return value goes through ``bench.sync`` when given. ``bandwidth``
    (bytes/s, e.g. from :func:`memory_bandwidth`) gives the floor time of ``bytes_moved``.

    Example:
        >>> bench = Benchmark("sum", "numpy", {}, unorm=lambda: sum(range(100)),
        ...                   native=lambda: 4950)
        >>> r = measure(bench, repeats=3, warmup=1, min_time=0.001)
        >>> r.ratio == r.unorm_s / r.native_s, len(r.unorm_samples)
        (True, 3)
    """
    _check_measure_args(repeats, warmup, min_time, number)
    sides = {"unorm": bench.unorm, "native": bench.native}
    for _ in range(warmup):
        for fn in sides.values():
            _time_block(fn, bench.sync, 1)
    numbers = {
        label: number if number is not None else _calibrate(fn, bench.sync, min_time)
        for label, fn in sides.items()
    }
    samples: dict[str, list[float]] = {"unorm": [], "native": []}
    for i in range(repeats):
        order = ("unorm", "native") if i % 2 == 0 else ("native", "unorm")
        for label in order:
            elapsed = _time_block(sides[label], bench.sync, numbers[label])
            samples[label].append(elapsed / numbers[label])
    unorm_s = statistics.median(samples["unorm"])
    native_s = statistics.median(samples["native"])
    floor_s = _floor(bench.bytes_moved, bandwidth)
    added_floor_s = _floor(bench.added_bytes, bandwidth)
    return Result(
        name=bench.name,
        backend=bench.backend,
        params=dict(bench.params),
        unorm_s=unorm_s,
        native_s=native_s,
        ratio=unorm_s / native_s if native_s > 0 else math.inf,
        floor_s=floor_s,
        floor_ratio=unorm_s / floor_s if floor_s else None,
        target_ratio=bench.target_ratio,
        bytes_moved=bench.bytes_moved,
        unorm_samples=samples["unorm"],
        native_samples=samples["native"],
        unorm_number=numbers["unorm"],
        native_number=numbers["native"],
        added_floor_ratio=(unorm_s - native_s) / added_floor_s if added_floor_s else None,
        added_target=bench.added_target,
    )


def memory_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """This machine's memory copy bandwidth in bytes per second, measured with NumPy.

    Copies an ``nbytes`` buffer (default 256 MiB, far larger than any CPU cache) into
    another with ``np.copyto`` ``repeats`` times (default 5) and counts each copy as
    ``2 * nbytes`` of traffic (one read, one write); returns the best copy's rate. Both
    buffers are touched first so page faults stay out of the timing.

    Example:
        >>> memory_bandwidth(nbytes=2**20, repeats=2) > 0
        True
    """
    if nbytes < 8 or repeats < 1:
        raise ValueError(f"need nbytes >= 8 and repeats >= 1, got {nbytes} and {repeats}")
    src = np.ones(nbytes // 8, dtype=np.float64)
    dst = np.zeros_like(src)
    np.copyto(dst, src)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / max(best, 1e-12)


def _cpu_model() -> str:
    """The processor's model name from ``/proc/cpuinfo``, else what ``platform`` says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Hardware", "cpu model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _total_memory() -> int | None:
    """Total physical memory in bytes, or None when this system does not say."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def machine_info(
    frameworks: Mapping[str, str] | None = None, gpu: str | None = None
) -> dict[str, Any]:
    """What this process runs on: platform, processor, cores, memory and versions.

    ``frameworks`` (default None: none) maps framework names to the versions the caller
    imported, e.g. ``{"torch": torch.__version__}``; ``gpu`` (default None) names the
    accelerator the benchmarks used. ``memory_bytes`` is None where it cannot be read.

    Example:
        >>> info = machine_info({"numpy": np.__version__})
        >>> info["numpy"] == np.__version__, info["logical_cores"] >= 1
        (True, True)
    """
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": _cpu_model(),
        "logical_cores": os.cpu_count() or 1,
        "memory_bytes": _total_memory(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "frameworks": dict(frameworks or {}),
        "gpu": gpu,
    }


def write_results(
    results: Sequence[Result],
    path: str | os.PathLike[str],
    machine: Mapping[str, Any],
    bandwidth: float | None,
) -> Path:
    """Write ``results`` with the ``machine`` they ran on to a JSON file; return its path.

    The file holds ``schema`` (:data:`SCHEMA_VERSION`), ``created`` (UTC, ISO 8601),
    ``machine`` (from :func:`machine_info`), ``bandwidth_bytes_per_s`` (from
    :func:`memory_bandwidth`, or None) and ``results`` (each :meth:`Result.to_dict`).
    Missing parent folders are created.

    Example:
        >>> import tempfile
        >>> r = Result("op", "numpy", {}, 1.0, 1.0, 1.0)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = write_results([r], Path(d) / "numpy.json", machine_info(), 1e10)
        ...     read_results(p)["results"][0]["name"]
        'op'
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "schema": SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": _jsonable(machine),
        "bandwidth_bytes_per_s": bandwidth,
        "results": [r.to_dict() for r in results],
    }
    target.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return target


def read_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a results file written by :func:`write_results`, checking its schema version.

    Raises ``ValueError`` for a file of another schema or without results.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = write_results([], Path(d) / "x.json", machine_info(), None)
        ...     read_results(p)["schema"] == SCHEMA_VERSION
        True
    """
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or data.get("schema") != SCHEMA_VERSION:
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: not a results file of schema {SCHEMA_VERSION} (got {found!r})")
    if not isinstance(data.get("results"), list):
        raise ValueError(f"{path}: results file has no 'results' list")
    return data
