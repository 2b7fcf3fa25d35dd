"""unorm.flax.agc against optax.adaptive_grad_clip given explicitly correct axes, and
against the NumPy reference; under optax.chain and optax.MultiSteps."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.flax

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
nnx = pytest.importorskip("flax.nnx")
optax = pytest.importorskip("optax")

from unorm import reference as ref  # noqa: E402
from unorm.flax import BatchNorm, agc, final_classifier, unit_axes_of  # noqa: E402


class Net(nnx.Module):
    """One layer of every kind AGC knows, a BatchNorm and a classifier."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.conv1d = nnx.Conv(4, 4, (3,), rngs=rngs)
        self.conv3d = nnx.Conv(2, 3, (2, 2, 2), rngs=rngs)
        self.depthwise = nnx.Conv(4, 8, (3, 3), feature_group_count=4, rngs=rngs)
        self.grouped = nnx.Conv(8, 4, (1, 1), feature_group_count=2, rngs=rngs)
        self.up = nnx.ConvTranspose(4, 5, (3, 3), rngs=rngs)
        self.up_t = nnx.ConvTranspose(5, 6, (2, 2), transpose_kernel=True, rngs=rngs)
        self.embed = nnx.Embed(10, 6, rngs=rngs)
        self.bn = BatchNorm(6)
        self.hidden = nnx.Linear(6, 6, rngs=rngs)
        self.fc = nnx.Linear(6, 3, rngs=rngs)


#: The unit axes of each kernel in Flax's layouts, by hand (SPEC.md section 5's table).
WANT = {
    "conv.kernel": 3,  # (kh, kw, I, O)
    "conv1d.kernel": 2,  # (k, I, O)
    "conv3d.kernel": 4,
    "depthwise.kernel": 3,  # (kh, kw, 1, I*M)
    "grouped.kernel": 3,  # (kh, kw, I/g, O)
    "up.kernel": 3,  # (kh, kw, I, O)
    "up_t.kernel": 2,  # transpose_kernel: (kh, kw, O, I)
    "embed.embedding": 0,  # one unit per row
    "hidden.kernel": 1,  # (in, out)
    "fc.kernel": 1,
}


def _trees(model: Net, scale: float = 50.0, seed: int = 0) -> tuple[Any, Any]:
    """The model's parameters and gradients big enough that many units clip."""
    params = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    grads = [jnp.asarray(rng.normal(0, scale * 0.01, a.shape).astype(np.float32)) for a in leaves]
    return params, jax.tree.unflatten(treedef, grads)


def _by_name(tree: Any) -> dict[str, np.ndarray]:
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = [str(getattr(e, "key", getattr(e, "name", e))) for e in path]
        out[".".join(k for k in keys if k != "value")] = np.asarray(leaf)
    return out


def test_unit_axes_come_from_the_layers() -> None:
    assert unit_axes_of(Net(nnx.Rngs(0))) == WANT


@pytest.mark.parametrize("name", sorted(WANT))
def test_each_layer_kind_against_optax_with_explicit_axes(name: str) -> None:
    model = Net(nnx.Rngs(0))
    params, grads = _trees(model)
    ours = _by_name(agc(model, clipping=0.01).update(grads, optax.EmptyState(), params)[0])
    weights, gradients = _by_name(params), _by_name(grads)
    ndim = weights[name].ndim
    reduce = tuple(d for d in range(ndim) if d != WANT[name])
    theirs = optax.adaptive_grad_clip(0.01, axis=reduce)
    want = theirs.update({"g": gradients[name]}, theirs.init(None), {"g": weights[name]})[0]["g"]
    assert not np.array_equal(ours[name], gradients[name])  # some units clip
    np.testing.assert_allclose(ours[name], want, rtol=1e-6, atol=1e-9)


def test_optax_rank_rule_differs_where_the_layer_decides_otherwise() -> None:
    model = Net(nnx.Rngs(0))
    params, grads = _trees(model)
    ours = _by_name(agc(model).update(grads, optax.EmptyState(), params)[0])
    rank_rule = optax.adaptive_grad_clip(0.01)
    theirs = _by_name(rank_rule.update(grads, rank_rule.init(params), params)[0])
    # optax's rank rule takes the last axis of a 4-D kernel (HWIO): right for conv, wrong
    # for a kernel whose units are elsewhere; an embedding (rank 2) it clips per column.
    assert not np.allclose(ours["up_t.kernel"], theirs["up_t.kernel"])
    assert not np.allclose(ours["embed.embedding"], theirs["embed.embedding"])
    np.testing.assert_allclose(ours["conv.kernel"], theirs["conv.kernel"], rtol=1e-6)


def test_every_parameter_against_the_reference() -> None:
    model = Net(nnx.Rngs(1))
    params, grads = _trees(model, seed=3)
    tx = agc(model, clipping=0.02, eps=1e-3, exclude=final_classifier(model))
    ours = _by_name(tx.update(grads, tx.init(params), params)[0])
    weights, gradients = _by_name(params), _by_name(grads)
    for name, g in gradients.items():
        if name.startswith("fc."):
            np.testing.assert_array_equal(ours[name], g)  # excluded: weight and bias
            continue
        axes = WANT.get(name)
        want = ref.agc_clip(g.astype(np.float64), weights[name], axes, clipping=0.02, eps=1e-3)
        np.testing.assert_allclose(ours[name], want, rtol=1e-5, atol=1e-8, err_msg=name)


def test_nonfinite_units_are_left_as_they_are() -> None:
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    grads = jax.tree.map(lambda a: jnp.full(a.shape, 100.0), params)
    grads["kernel"][...] = grads["kernel"][...].at[0, 1].set(jnp.inf)
    out = agc(model).update(grads, optax.EmptyState(), params)[0]
    kernel = np.asarray(out["kernel"][...])
    assert np.isinf(kernel[0, 1]) and np.all(kernel[:, 1][1:] == 100.0)
    assert np.all(np.abs(kernel[:, 0]) < 100.0)


def test_multisteps_clips_the_accumulated_gradient_once() -> None:
    model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    rng = np.random.default_rng(5)
    micro = [
        jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 1, a.shape), jnp.float32), params)
        for _ in range(3)
    ]
    tx = optax.MultiSteps(optax.chain(agc(model), optax.sgd(1.0)), every_k_schedule=3)
    state = tx.init(params)
    for g in micro[:2]:
        update, state = tx.update(g, state, params)
        assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(update))
    update, state = tx.update(micro[2], state, params)
    mean = jax.tree.map(lambda *a: sum(a) / 3, *micro)
    clipped = agc(model).update(mean, optax.EmptyState(), params)[0]
    want = jax.tree.map(lambda a: -a, clipped)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), update, want)


def test_inside_an_nnx_optimizer_under_jit() -> None:
    model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), BatchNorm(8),
                           nnx.Linear(8, 2, rngs=nnx.Rngs(1)))  # fmt: skip
    tx = optax.chain(agc(model, exclude=final_classifier(model)), optax.sgd(0.1))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 4)), jnp.float32)

    @nnx.jit
    def step(m: nnx.Module, o: nnx.Optimizer) -> jax.Array:
        loss, grads = nnx.value_and_grad(lambda mm: jnp.mean(mm(x) ** 2))(m)
        o.update(m, grads)
        return loss

    losses = [float(step(model, opt)) for _ in range(3)]
    assert losses[-1] < losses[0]


def test_exclusion_overrides_and_messages() -> None:
    model = nnx.Sequential(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    grads = jax.tree.map(lambda a: jnp.full(a.shape, 10.0), params)
    by_name = agc(model, exclude="layers.1").update(grads, optax.EmptyState(), params)[0]
    by_param = agc(model, exclude=[model.layers[1].kernel, model.layers[1].bias])
    same = by_param.update(grads, optax.EmptyState(), params)[0]
    jax.tree.map(np.testing.assert_array_equal, by_name, same)
    np.testing.assert_array_equal(_by_name(by_name)["layers.1.kernel"], np.full((3, 2), 10.0))
    overridden = agc(model, unit_axes={"layers.0.kernel": 0})
    out = _by_name(overridden.update(grads, optax.EmptyState(), params)[0])
    w = _by_name(params)["layers.0.kernel"]
    np.testing.assert_allclose(
        out["layers.0.kernel"], ref.agc_clip(np.full((4, 3), 10.0), w, 0), rtol=1e-6
    )
    with pytest.raises(ValueError, match="names no parameter or layer"):
        agc(model, exclude="head")
    with pytest.raises(ValueError, match="unit_axes must be an int"):
        agc(model, unit_axes=True)  # type: ignore[arg-type]

    class Odd(nnx.Module):
        def __init__(self) -> None:
            self.table = nnx.Param(jnp.ones((3, 3)))

    with pytest.raises(ValueError, match=r"parameter 'table' \(shape \(3, 3\)\) of Odd"):
        agc(Odd())
    assert agc(Odd(), unit_axes={"table": 1}) is not None
    with pytest.raises(ValueError, match="needs the parameters"):
        agc(model).update(grads, optax.EmptyState())
