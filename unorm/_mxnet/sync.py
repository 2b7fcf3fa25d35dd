"""Cross-device BatchNorm: the rendezvous of per-device values and Chan's exact merge.

Gluon data parallelism calls a layer once per device (``[net(x) for x in
split_and_load(batch, ctxs)]``); MXNet runs each call's CustomOp asynchronously on its own
worker thread. A :class:`Rendezvous` makes those threads meet: each device deposits its
value and waits until all ``size`` devices of the same step have deposited, then every
device reads the same list (ordered by device, so every device computes the same floats).

:func:`merge` is the k-way form of Chan et al. (1979), SPEC.md section 3:
``N = sum n_k``, ``mean = sum n_k mean_k / N``, ``M2 = sum M2_k + sum n_k (mean_k - mean)^2``.
Gluon's ``contrib.nn.SyncBatchNorm`` instead averages per-device moments with equal weights,
which is wrong whenever the per-device batches differ in size.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from typing import Generic, TypeVar

import numpy as np

from .stats import Stats

__all__ = ["Rendezvous", "exchange", "merge", "workspace_advice"]

T = TypeVar("T")

#: The environment variable that sizes MXNet's pool of CPU workspaces, and the value the
#: cross-device layer is tested with (tests/test_mxnet_sync.py).
CPU_TEMP_COPY = "MXNET_CPU_TEMP_COPY"
CPU_TEMP_COPY_VALUE = 64


def merge(parts: Sequence[Stats]) -> Stats:
    """Merge per-device statistics exactly; devices with no value contribute nothing.

    Example:
        >>> a = Stats(2, np.array([1.5]), np.array([0.5]))
        >>> b = Stats(1, np.array([6.0]), np.array([0.0]))
        >>> m = merge([a, b])
        >>> m.count, m.mean.tolist(), m.m2.tolist()
        (3, [3.0], [14.0])
    """
    total = sum(p.count for p in parts)
    channels = parts[0].mean.shape
    if total == 0:
        return Stats(0, np.zeros(channels), np.zeros(channels))
    live = [p for p in parts if p.count]
    with np.errstate(invalid="ignore", over="ignore"):
        mean = sum((p.count * p.mean for p in live), np.zeros(channels)) / total
        m2 = sum((p.m2 + p.count * (p.mean - mean) ** 2 for p in live), np.zeros(channels))
    return Stats(total, mean, m2)


class Rendezvous(Generic[T]):
    """``size`` members meet once per round and each leaves with every member's value.

    A round closes when all ``size`` members (distinct names, e.g. the device contexts)
    have deposited; every member of the round then gets the same list, sorted by member
    name, and the next deposit opens the next round. Errors:

    - a member depositing again while its deposit of the open round waits is a
      ``RuntimeError`` (each device must call the layer exactly once per step); the
      waiting deposit stays;
    - a member that waits longer than ``timeout`` seconds gets a ``TimeoutError`` and its
      value is withdrawn: the round stays open with the other deposits, which time out in
      turn unless the missing members arrive, and the member may deposit again.

    Example:
        >>> import threading
        >>> point = Rendezvous(2)
        >>> got = {}
        >>> helper = threading.Thread(target=lambda: got.update(b=point.exchange("b", 2, 5.0)))
        >>> helper.start()
        >>> got["a"] = point.exchange("a", 1, 5.0)
        >>> helper.join()
        >>> got["a"], got["b"]
        ([1, 2], [1, 2])
        >>> point.exchange("a", 3, 0.01)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        TimeoutError: synchronised BatchNorm waited 0.01 s for 2 devices, 1 arrived; ...
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._cond = threading.Condition()
        self._round = 0
        self._pending: dict[str, T] = {}
        self._done: dict[int, list[T]] = {}
        self._unread: dict[int, int] = {}

    def exchange(self, member: str, value: T, timeout: float) -> list[T]:
        """Deposit ``value`` as ``member`` and return all members' values of this round."""
        with self._cond:
            if member in self._pending:
                raise RuntimeError(
                    f"{member} ran a synchronised BatchNorm twice before the other devices "
                    f"ran it once (num_devices={self.size}); call the layer once per device "
                    "per step, and on exactly num_devices devices"
                )
            current = self._round
            self._pending[member] = value
            if len(self._pending) == self.size:
                self._done[current] = [self._pending[k] for k in sorted(self._pending)]
                self._unread[current] = self.size
                self._pending = {}
                self._round += 1
                self._cond.notify_all()
            elif not self._cond.wait_for(lambda: current in self._done, timeout):
                self._pending.pop(member, None)
                raise TimeoutError(
                    f"synchronised BatchNorm waited {timeout:g} s for {self.size} devices, "
                    f"{len(self._pending) + 1} arrived; every device must run the layer "
                    "(forward, and backward when one runs) in the same step"
                )
            values = self._done[current]
            self._unread[current] -= 1
            if not self._unread[current]:
                del self._done[current], self._unread[current]
            return values


_rendezvous: dict[tuple[str, str], Rendezvous[object]] = {}
_lock = threading.Lock()


def workspace_advice(member: str, environ: Mapping[str, str] = os.environ) -> str | None:
    """What to set when a ``cpu(i)`` member timed out with too few CPU workspaces, or None
    (``environ``: the process environment).

    MXNet gives all ``cpu(i)`` contexts one pool of ``MXNET_CPU_TEMP_COPY`` workspaces
    (default 4, read when MXNet first needs one). Operators queued after the layer on one
    device can hold all of them while they wait for it, and another device then cannot
    reach the layer: the step waits until the timeout. GPU contexts have a pool each.

    Example:
        >>> workspace_advice("cpu(1)", {})  # doctest: +ELLIPSIS
        'MXNET_CPU_TEMP_COPY is not set ...; set MXNET_CPU_TEMP_COPY=64 in the environment ...'
        >>> workspace_advice("cpu(1)", {"MXNET_CPU_TEMP_COPY": "64"}) is None
        True
        >>> workspace_advice("gpu(0)", {}) is None
        True
    """
    if not member.startswith("cpu"):
        return None
    given = environ.get(CPU_TEMP_COPY)
    if given is not None and given.strip().isdigit() and int(given) >= CPU_TEMP_COPY_VALUE:
        return None
    now = "is not set (default 4)" if given is None else f"is {given}"
    return (
        f"{CPU_TEMP_COPY} {now}; with several cpu(i) devices MXNet shares that few CPU "
        "workspaces among them, and operators waiting on this layer can hold them all while "
        f"another device needs one to reach it; set {CPU_TEMP_COPY}={CPU_TEMP_COPY_VALUE} in "
        "the environment before MXNet runs its first operator (for example before starting "
        "Python)"
    )


def exchange(key: str, phase: str, size: int, member: str, value: T, timeout: float) -> list[T]:
    """Exchange ``value`` with the other devices of layer ``key`` in ``phase``.

    One process-wide :class:`Rendezvous` per ``(key, phase)`` (``key``: the layer's unique
    key; ``phase``: e.g. ``"forward"`` or ``"backward"``, so the two passes never meet each
    other), created on first use and replaced when ``size`` changes. ``member`` names the
    device; returns every device's value, sorted by member, after all ``size`` arrived.
    Raises as :meth:`Rendezvous.exchange` does; a ``cpu(i)`` member's ``TimeoutError`` also
    says what to set when ``MXNET_CPU_TEMP_COPY`` is below 64 (:func:`workspace_advice`).

    Example:
        >>> exchange("doc-layer", "forward", 1, "cpu(0)", 3.0, timeout=1.0)
        [3.0]
    """
    with _lock:
        point = _rendezvous.get((key, phase))
        if point is None or point.size != size:
            point = _rendezvous[(key, phase)] = Rendezvous(size)
    try:
        return point.exchange(member, value, timeout)  # type: ignore[return-value]
    except TimeoutError as err:
        advice = workspace_advice(member)
        if advice is None:
            raise
        raise TimeoutError(f"{err}; or {advice}") from None
