"""Cross-device unorm.flax.BatchNorm: the exact (count, mean, M2) merge over a named axis
(vmap in this process; shard_map, pmap and a sharded jax.jit over two host devices in a
fresh one), uneven and empty shards given by a per-sample mask, against one device and the
NumPy reference on the real samples."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.flax

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
nnx = pytest.importorskip("flax.nnx")

from unorm import reference as ref  # noqa: E402
from unorm.flax import BatchNorm  # noqa: E402
from unorm.spec import BatchNormSpec  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SIZES = (5, 2, 0)  # real samples per shard: uneven, and one shard with none


def _shards(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(shards, 5, 4, 3) inputs padded with 1e3, their mask, and the real samples.

    Padding must be finite where gradients are taken: a padded output's zero cotangent
    times a NaN input is NaN in the statistics' gradients (the statistics themselves
    leave padding out however large or non-finite: the two-device test pads with inf)."""
    rng = np.random.default_rng(seed)
    real = rng.normal(3.0, 2.0, (sum(SIZES), 4, 3)).astype(np.float32)
    xs = np.full((len(SIZES), max(SIZES), 4, 3), 1e3, np.float32)
    keep = np.zeros((len(SIZES), max(SIZES), 1, 1), bool)
    start = 0
    for i, n in enumerate(SIZES):
        xs[i, :n], keep[i, :n] = real[start : start + n], True
        start += n
    return xs, keep, real


def test_vmap_axis_name_merges_uneven_and_empty_shards_exactly() -> None:
    xs, keep, real = _shards()
    layer = BatchNorm(3, axis_name="shards")
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def shard(p: object, x: jax.Array, m: jax.Array) -> tuple[jax.Array, object]:
        module = nnx.merge(graphdef, p, rest, copy=True)
        return module(x, mask=m), nnx.state(module, nnx.BatchStat)

    run = jax.vmap(shard, in_axes=(None, 0, 0), axis_name="shards")
    y, pullback, stats = jax.vjp(lambda p, x: run(p, x, jnp.asarray(keep)), params, jnp.asarray(xs),
                                 has_aux=True)  # fmt: skip
    dy = np.random.default_rng(1).normal(size=xs.shape).astype(np.float32)
    dparams, dx = pullback(jnp.asarray(np.where(keep, dy, 0)))
    spec = BatchNormSpec(axis=-1)
    want_y, state = ref.batch_norm_step(real, ref.init_running_stats(3), spec, training=True)
    flat = lambda a: np.concatenate([np.asarray(a)[i, :n] for i, n in enumerate(SIZES)])  # noqa: E731
    np.testing.assert_allclose(flat(y), want_y, rtol=1e-5, atol=1e-5)
    grads = ref.batch_norm_backward(flat(dy), real, np.ones(3), axis=-1)
    np.testing.assert_allclose(flat(dx), grads.dx, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dparams["scale"][...], grads.dgamma, rtol=1e-4, atol=1e-4)
    assert state is not None
    for i in range(len(SIZES)):  # every shard holds the same merged statistics
        np.testing.assert_allclose(stats["mean"][...][i], state.mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats["var"][...][i], state.var, rtol=1e-5)


def test_one_value_across_all_shards_is_refused_where_the_count_is_static() -> None:
    layer = BatchNorm(3, axis_name="shards")
    graphdef, state = nnx.split(layer)

    def shard(x: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, state, copy=True)(x)

    assert jax.vmap(shard, axis_name="shards")(jnp.ones((2, 1, 3))).shape == (2, 1, 3)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        jax.vmap(shard, axis_name="shards")(jnp.ones((1, 1, 3)))


_TWO_DEVICES = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P
    from unorm.flax import BatchNorm

    assert jax.device_count() == 2, jax.devices()
    data = np.load(sys.argv[1])
    xs, keep = data["xs"], data["keep"]  # (2, n, 4, 3) and (2, n, 1, 1)
    mesh = jax.make_mesh((2,), ("data",))
    out = {}

    layer = BatchNorm(3, axis_name="data")
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def shard(p, x, m):
        module = nnx.merge(graphdef, p, rest, copy=True)
        y = module(x[0], mask=m[0])
        stats = nnx.state(module, nnx.BatchStat)
        return y[None], jax.tree.map(lambda a: a[None], stats)

    run = jax.shard_map(shard, mesh=mesh, in_specs=(P(), P("data"), P("data")),
                        out_specs=(P("data"), P("data")), check_vma=False)
    sharding = NamedSharding(mesh, P("data"))
    y, stats = jax.jit(run)(params, jax.device_put(xs, sharding), jax.device_put(keep, sharding))
    out["shard_map_y"] = np.asarray(y).tolist()
    out["shard_map_mean"] = np.asarray(stats["mean"][...]).tolist()
    out["shard_map_var"] = np.asarray(stats["var"][...]).tolist()

    # jax.pmap over the same two devices, one shard each.
    def replica(p, x, m):
        module = nnx.merge(graphdef, p, rest, copy=True)
        return module(x, mask=m), nnx.state(module, nnx.BatchStat)

    y, stats = jax.pmap(replica, axis_name="data", in_axes=(None, 0, 0))(params, xs, keep)
    out["pmap_y"] = np.asarray(y).tolist()
    out["pmap_mean"] = np.asarray(stats["mean"][...]).tolist()
    out["pmap_var"] = np.asarray(stats["var"][...]).tolist()

    # A sharded jax.jit: the global batch split over the devices, no axis name.
    plain = BatchNorm(3)
    x = jax.device_put(jnp.asarray(xs.reshape(-1, 4, 3)), sharding)
    m = jax.device_put(jnp.asarray(keep.reshape(-1, 1, 1)), sharding)
    y = nnx.jit(lambda mod, a, b: mod(a, mask=b))(plain, x, m)
    out["jit_devices"] = len(y.sharding.device_set)
    out["jit_y"] = np.asarray(y).tolist()
    out["jit_mean"] = np.asarray(plain.mean[...]).tolist()
    out["jit_var"] = np.asarray(plain.var[...]).tolist()
    print(json.dumps(out))
    """
)


def test_shard_map_and_sharded_jit_over_two_host_devices(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    sizes = (6, 0)  # one device holds only padding
    real = rng.normal(-2.0, 3.0, (sum(sizes), 4, 3)).astype(np.float32)
    xs = np.full((2, 6, 4, 3), np.inf, np.float32)
    keep = np.zeros((2, 6, 1, 1), bool)
    xs[0], keep[0] = real, True
    np.savez(tmp_path / "in.npz", xs=xs, keep=keep)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", _TWO_DEVICES, str(tmp_path / "in.npz")],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    spec = BatchNormSpec(axis=-1)
    want_y, state = ref.batch_norm_step(real, ref.init_running_stats(3), spec, training=True)
    assert state is not None
    np.testing.assert_allclose(np.asarray(out["shard_map_y"])[0], want_y, rtol=1e-5, atol=1e-5)
    for i in range(2):
        np.testing.assert_allclose(out["shard_map_mean"][i], state.mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out["shard_map_var"][i], state.var, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out["pmap_y"])[0], want_y, rtol=1e-5, atol=1e-5)
    for i in range(2):
        np.testing.assert_allclose(out["pmap_mean"][i], state.mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out["pmap_var"][i], state.var, rtol=1e-5)
    assert out["jit_devices"] == 2
    np.testing.assert_allclose(np.asarray(out["jit_y"])[:6], want_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["jit_mean"], state.mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["jit_var"], state.var, rtol=1e-5)
