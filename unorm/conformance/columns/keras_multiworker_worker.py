"""Cross-replica BatchNorm for the Keras columns under
``tf.distribute.MultiWorkerMirroredStrategy``: one worker process per replica on
127.0.0.1 (strategy ``multi-worker``).

Usage: ``python -m unorm.conformance.columns.keras_multiworker_worker REQUEST RESULT`` (see
:mod:`conformance.exchange`). This process picks free ports, starts one worker per
replica (``... --worker INDEX PORTS REQUEST PART``, each with its own ``TF_CONFIG``, one
CPU replica each), waits for them in bounded time (killing both when either overruns or
fails) and merges their parts: each replica's output and input gradient, the parameter
gradients summed over the workers, and worker 0's moving statistics (every worker holds
the same ones). A worker runs the same step as the ``MirroredStrategy`` helper
(:func:`keras_sync_worker.train_step`).

TensorFlow reads ``TF_CONFIG`` when the strategy is made, and nothing here imports it
before a worker has set it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from unorm.conformance.exchange import read_request

#: This module, as each worker runs it.
MODULE = "unorm.conformance.columns.keras_multiworker_worker"
#: Seconds for both workers together (TensorFlow's import is most of it); under the
#: suite's own limit for a helper (``exchange.run_helper``).
TIMEOUT_S = 240.0


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports free on 127.0.0.1 now (all held open until chosen)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def worker(index: int, ports: list[int], request_path: str, part_path: str) -> None:
    """Worker ``index`` of the cluster on ``ports``: its replica's results to ``part``."""
    os.environ["TF_CONFIG"] = json.dumps(
        {
            "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
            "task": {"type": "worker", "index": index},
        }
    )
    import tensorflow as tf

    from unorm.conformance.columns.keras_sync_worker import train_step

    request = read_request(Path(request_path))
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    assert strategy.num_replicas_in_sync == len(ports), strategy.num_replicas_in_sync
    got = train_step(strategy, request)
    np.savez(part_path, **{key: values[0] for key, values in got.items()})  # type: ignore[arg-type]


def main(request_path: str, result_path: str) -> None:
    """Run one worker per replica and merge their parts into ``result_path``."""
    replicas = len(read_request(Path(request_path)).xs)
    ports = ",".join(str(p) for p in free_ports(replicas))
    folder = Path(result_path).parent
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU workers, one replica each
    env.pop("TF_CONFIG", None)
    parts = [folder / f"worker{k}.npz" for k in range(replicas)]
    logs = [folder / f"worker{k}.log" for k in range(replicas)]
    procs = []
    for k in range(replicas):
        cmd = [sys.executable, "-m", MODULE, "--worker", str(k), ports, request_path]
        with logs[k].open("w") as log:
            procs.append(
                subprocess.Popen(
                    [*cmd, str(parts[k])], stdout=log, stderr=subprocess.STDOUT, env=env
                )
            )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                raise SystemExit(f"TimeoutError: a worker ran past {TIMEOUT_S:.0f} s")
            if any(p.returncode not in (None, 0) for p in procs):
                break  # the other one would wait for its peer until the deadline
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for k, p in enumerate(procs):
        if p.returncode != 0:
            sys.stderr.write(logs[k].read_text()[-4000:])
            raise SystemExit(f"worker {k} exited with {p.returncode}")
    got = [dict(np.load(part)) for part in parts]
    out: dict[str, np.ndarray] = {}
    for k, part in enumerate(got):
        out[f"y{k}"], out[f"dx{k}"] = part["y"], part["dx"]
    for key in got[0]:
        if key in ("dgamma", "dbeta"):
            out[key] = sum((part[key] for part in got[1:]), got[0][key])
        elif key not in ("y", "dx"):
            out[key] = got[0][key]
    np.savez(result_path, **out)  # type: ignore[arg-type]  # numpy's stub mistypes **kwds


if __name__ == "__main__":
    if sys.argv[1] == "--worker":
        index, port_text, source, target = sys.argv[2:6]
        worker(int(index), [int(p) for p in port_text.split(",")], source, target)
    else:
        main(sys.argv[1], sys.argv[2])
