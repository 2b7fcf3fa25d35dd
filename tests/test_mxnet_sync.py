"""Cross-device ``SyncBatchNorm`` over several ``mx.cpu(i)`` contexts (SPEC.md section 3).

Each scenario runs in a fresh interpreter (``python tests/test_mxnet_sync.py NAME``) with
``MXNET_CPU_TEMP_COPY`` raised: MXNet shares one small pool of CPU workspaces among all
``cpu(i)`` contexts, and a device whose operators wait on the synchronised layer can hold
the workspaces another device needs to reach it (see ``SyncBatchNorm``). The variable is
read when MXNet first needs a workspace, so a fresh process is the reliable way to set it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import runs_here  # the environment's framework list (UNORM_RUNS)
from unorm import reference as ref
from unorm.spec import BatchNormSpec

pytestmark = pytest.mark.mxnet

ROOT = Path(__file__).resolve().parents[1]


if runs_here("mxnet"):  # where MXNet is meant to run, a failing import is an error
    import mxnet as mx
    from mxnet import autograd, gluon

    from unorm.mxnet import BatchNorm, SyncBatchNorm

F32 = {"rtol": 1e-5, "atol": 2e-5}
SCENARIOS: dict[str, Callable[[], None]] = {}


def _scenario(fn: Callable[[], None]) -> Callable[[], None]:
    SCENARIOS[fn.__name__] = fn
    return fn


def _contexts(n: int) -> list[Any]:
    return [mx.cpu(i) for i in range(n)]


def _split(x: np.ndarray, sizes: list[int], ctxs: list[Any]) -> list[Any]:
    bounds = np.cumsum([0, *sizes])
    pairs = zip(bounds[:-1], bounds[1:], ctxs, strict=True)
    return [mx.nd.array(x[a:b], ctx=c) for a, b, c in pairs]


def _against_one_device(sizes: list[int], hybridize: bool, axis: int = 1) -> None:
    """Three training steps on len(sizes) devices against the reference on the whole batch
    (3 features on ``axis``: (N, 3, 4) or, with ``axis=-1``, (N, 4, 3))."""
    rng = np.random.default_rng(sum(sizes))
    ctxs = _contexts(len(sizes))
    layer = SyncBatchNorm(3, num_devices=len(ctxs), axis=axis)
    sample = (3, 4) if axis == 1 else (4, 3)
    layer.initialize(ctx=ctxs)
    gamma = rng.uniform(0.5, 1.5, 3)
    layer.gamma.set_data(mx.nd.array(gamma))
    if hybridize:
        layer.hybridize()
    running = ref.init_running_stats(3)
    for _ in range(3):
        # Each device's slice has its own mean, so equal-weight averaging would be wrong.
        offsets = np.repeat(np.arange(len(sizes)), sizes)[:, None, None] * 3.0
        x = (rng.standard_normal((sum(sizes), *sample)) + offsets).astype(np.float32)
        dy = rng.standard_normal(x.shape).astype(np.float32)
        parts = _split(x, sizes, ctxs)
        for part in parts:
            part.attach_grad()
        with autograd.record():
            ys = [layer(part) for part in parts]
        autograd.backward(ys, _split(dy, sizes, ctxs))
        spec = BatchNormSpec(axis=axis)
        y_ref, running = ref.batch_norm_step(x, running, spec, gamma, training=True)
        grads = ref.batch_norm_backward(dy, x, gamma, eps=1e-5, axis=axis)
        np.testing.assert_allclose(np.concatenate([y.asnumpy() for y in ys]), y_ref, **F32)
        dx = np.concatenate([p.grad.asnumpy() for p in parts])
        np.testing.assert_allclose(dx, grads.dx, **F32)
        dgamma = sum(g.asnumpy() for g in layer.gamma.list_grad())
        np.testing.assert_allclose(dgamma, grads.dgamma, rtol=1e-5, atol=1e-4)
        mx.nd.waitall()
        for ctx in ctxs:
            got_mean = layer.running_mean.data(ctx).asnumpy()
            np.testing.assert_allclose(got_mean, running.mean, rtol=1e-6, atol=1e-6)
            got_var = layer.running_var.data(ctx).asnumpy()
            np.testing.assert_allclose(got_var, running.var, rtol=1e-6)


@_scenario
def uneven_imperative() -> None:
    _against_one_device([5, 2, 1], hybridize=False)


@_scenario
def uneven_hybridized() -> None:
    _against_one_device([5, 2, 1], hybridize=True)


@_scenario
def uneven_channels_last() -> None:
    _against_one_device([4, 1, 3], hybridize=True, axis=-1)


@_scenario
def even_hybridized() -> None:
    _against_one_device([3, 3, 3], hybridize=True)


@_scenario
def split_and_load_training() -> None:
    """A data-parallel step (split_and_load, Trainer with kvstore) equals one device."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((7, 2, 5, 5)).astype(np.float32)
    ctxs = _contexts(2)

    def model(bn: Any, contexts: Any) -> Any:
        net = gluon.nn.HybridSequential()
        net.add(gluon.nn.Conv2D(3, 3, in_channels=2), bn, gluon.nn.Dense(2, in_units=27))
        net.initialize(mx.init.Constant(0.1), ctx=contexts)
        net[0].weight.set_data(mx.nd.array(w))
        net.hybridize()
        return net

    w = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    multi, single = model(SyncBatchNorm(3, num_devices=2), ctxs), model(BatchNorm(3), mx.cpu())
    trainers = [
        gluon.Trainer(n.collect_params(), "sgd", {"learning_rate": 0.5}) for n in (multi, single)
    ]
    for _ in range(2):
        parts = gluon.utils.split_and_load(mx.nd.array(x), ctxs, even_split=False)
        with autograd.record():
            losses = [multi(p).sum() for p in parts]
        autograd.backward(losses)
        trainers[0].step(7)
        with autograd.record():
            loss = single(mx.nd.array(x)).sum()
        loss.backward()
        trainers[1].step(7)
    mx.nd.waitall()
    pairs = zip(multi.collect_params().items(), single.collect_params().values(), strict=True)
    for (name, p), q in pairs:
        for ctx in ctxs:
            got, want = p.data(ctx).asnumpy(), q.data().asnumpy()
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)


@_scenario
def an_empty_shard() -> None:
    """Under NumPy shape semantics a device's shard may be empty: it contributes nothing."""
    with mx.util.np_shape(True):
        _against_one_device([4, 0, 3], hybridize=False)
        _against_one_device([0, 5, 2], hybridize=True)


@_scenario
def every_shard_empty() -> None:
    """Every device's shard empty: an empty batch (SPEC.md section 2, *Empty batch*) on
    every device alike, after a step with values (for state worth keeping)."""
    rng = np.random.default_rng(5)
    ctxs = _contexts(2)
    with mx.util.np_shape(True):
        for preset, hybridize in [(None, False), ("torch", True), ("mxnet", False)]:
            layer = SyncBatchNorm(3, num_devices=2, preset=preset)
            layer.initialize(ctx=ctxs)
            if hybridize:
                layer.hybridize()
            spec = layer.spec
            running = ref.init_running_stats(3)
            for sizes in ([3, 2], [0, 0]):
                x = (rng.standard_normal((sum(sizes), 3, 4)) + 1.0).astype(np.float32)
                parts = _split(x, sizes, ctxs)
                for part in parts:
                    part.attach_grad()
                for g in layer.gamma.list_grad():
                    g[:] = 7.0
                with autograd.record():
                    ys = [layer(part) for part in parts]
                autograd.backward(ys, _split(np.ones_like(x), sizes, ctxs))
                mx.nd.waitall()
                _, running = ref.batch_norm_step(x, running, spec, training=True)
                for y, part, size in zip(ys, parts, sizes, strict=True):
                    assert y.shape == part.grad.shape == (size, 3, 4)
                for ctx in ctxs:
                    state = [layer.running_mean, layer.running_var]
                    got = [p.data(ctx).asnumpy() for p in state]
                    np.testing.assert_allclose(got[0], running.mean, rtol=1e-6, atol=1e-6)
                    np.testing.assert_allclose(got[1], running.var, rtol=1e-6)
                    count = int(layer.num_batches_tracked.data(ctx).asnumpy()[0])
                    assert count == running.num_batches_tracked
                    if not sum(sizes):
                        np.testing.assert_array_equal(layer.gamma.grad(ctx).asnumpy(), 0.0)
                        np.testing.assert_array_equal(layer.beta.grad(ctx).asnumpy(), 0.0)
            want = {None: 1, "torch": 2, "mxnet": 2}[preset]
            assert running.num_batches_tracked == want
            assert np.isnan(running.mean).all() == (preset == "mxnet")


@_scenario
def missing_device_times_out() -> None:
    layer = SyncBatchNorm(2, num_devices=2, timeout=0.5)
    layer.initialize(ctx=_contexts(2))
    before = layer.running_mean.data(mx.cpu(0)).asnumpy().copy()
    try:
        with autograd.train_mode():
            layer(mx.nd.ones((4, 2), ctx=mx.cpu(0))).asnumpy()
    except mx.base.MXNetError:
        pass  # MXNet prints the operator's Python exception and raises its own error
    else:
        raise AssertionError("a lone device did not fail")
    np.testing.assert_array_equal(layer.running_mean.data(mx.cpu(0)).asnumpy(), before)


NAMES = [
    "uneven_imperative",
    "uneven_hybridized",
    "uneven_channels_last",
    "even_hybridized",
    "split_and_load_training",
    "an_empty_shard",
    "every_shard_empty",
    "missing_device_times_out",
]


def _run_scenario(name: str, workspaces: str | None = "64") -> subprocess.CompletedProcess[str]:
    """Run scenario ``name`` in a fresh interpreter with ``MXNET_CPU_TEMP_COPY`` set to
    ``workspaces`` (None: not set)."""
    # The scenario process imports ``conftest`` (``runs_here``) from the repository root.
    path = os.pathsep.join(part for part in (str(ROOT), os.environ.get("PYTHONPATH")) if part)
    env = dict(os.environ, UNORM_RUNS="mxnet", PYTHONPATH=path)
    env.pop("MXNET_CPU_TEMP_COPY", None)
    if workspaces is not None:
        env["MXNET_CPU_TEMP_COPY"] = workspaces
    return subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), name],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.parametrize("name", NAMES)
def test_sync_scenario(name: str) -> None:
    done = _run_scenario(name)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"scenario {name} passed" in done.stdout
    if name == "missing_device_times_out":
        assert "waited 0.5 s for 2 devices, 1 arrived" in done.stdout
        assert "MXNET_CPU_TEMP_COPY" not in done.stdout  # set high enough: not the cause


@pytest.mark.parametrize("workspaces", [None, "4"], ids=["unset", "default_value"])
def test_a_timeout_with_few_cpu_workspaces_names_the_variable(workspaces: str | None) -> None:
    # Without MXNET_CPU_TEMP_COPY a multi-cpu step can deadlock until the timeout (see
    # SyncBatchNorm); the lone device's timeout stands in for it, deterministic and fast.
    done = _run_scenario("missing_device_times_out", workspaces)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "waited 0.5 s for 2 devices, 1 arrived" in done.stdout
    now = "is not set (default 4)" if workspaces is None else "is 4"
    assert f"MXNET_CPU_TEMP_COPY {now}" in done.stdout
    assert "set MXNET_CPU_TEMP_COPY=64 in the environment" in done.stdout


if __name__ == "__main__":
    assert sorted(SCENARIOS) == sorted(NAMES)
    SCENARIOS[sys.argv[1]]()
    print(f"scenario {sys.argv[1]} passed", flush=True)
