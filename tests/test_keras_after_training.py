"""unorm.keras's BatchNorm after training (``SPEC.md`` section 8): ``fold`` against the
unfolded model's inference output (Keras's own layers), ``recalibrate`` against NumPy
statistics of the whole data set, ``freeze`` and ``convert`` of ``trainable=False``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.keras
keras = pytest.importorskip("keras")

from unorm.keras import (  # noqa: E402
    BatchNorm,
    FoldError,
    FoldWarning,
    convert,
    fold,
    freeze,
    recalibrate,
)

layers = keras.layers
_BNS = (BatchNorm, layers.BatchNormalization)


def _randomise(model: Any, seed: int = 0) -> Any:
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers():
        if isinstance(layer, _BNS):
            c = int(layer.moving_mean.shape[0])
            layer.moving_mean.assign(rng.normal(size=c).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.2, 2.0, c).astype("float32"))
            if getattr(layer, "gamma", None) is not None:
                layer.gamma.assign(rng.uniform(0.5, 1.5, c).astype("float32"))
            if getattr(layer, "beta", None) is not None:
                layer.beta.assign(rng.normal(size=c).astype("float32"))
    return model


def _bns(model: Any) -> list[Any]:
    return [layer for layer in model._flatten_layers() if isinstance(layer, _BNS)]


def _weights(model: Any) -> list[np.ndarray]:
    return [np.array(w) for w in model.get_weights()]


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def _stack() -> Any:
    return keras.Sequential(
        [
            keras.Input((8, 8, 4)),
            layers.Conv2D(6, 3),
            layers.BatchNormalization(),
            layers.ReLU(),
            layers.Conv2D(6, 3, groups=2, use_bias=False),
            BatchNorm(preset="keras"),
            layers.DepthwiseConv2D(2, depth_multiplier=2),
            BatchNorm(scale=False),
            layers.Conv2DTranspose(5, 2),
            layers.BatchNormalization(center=False),
            layers.Flatten(),
            layers.Dense(7),
            layers.BatchNormalization(trainable=False),
        ]
    )


def test_fold_equals_the_unfolded_inference_model() -> None:
    model = _randomise(_stack())
    before = _weights(model)
    folded = fold(model)
    assert not _bns(folded)
    assert all(e.folded for e in folded.fold_report) and len(folded.fold_report) == 5
    assert [layer.name for layer in folded.layers] == [layer.name for layer in model.layers]
    x = np.random.default_rng(1).normal(size=(3, 8, 8, 4)).astype("float32")
    np.testing.assert_allclose(
        np.asarray(folded(x, training=False)),
        np.asarray(model(x, training=False)),
        rtol=1e-5,
        atol=1e-5,
    )
    _same(_weights(model), before)  # the original is untouched


def test_a_float64_model_folds_in_float64() -> None:
    """The Identity left where a BatchNorm stood keeps the model's dtype: a float64
    model's folded output is the unfolded one's to float64 precision, not float32's."""
    model = keras.Sequential(
        [
            keras.Input((6, 6, 3), dtype="float64"),
            layers.Conv2D(4, 3, dtype="float64"),
            layers.BatchNormalization(dtype="float64"),
            layers.Conv2D(2, 3, dtype="float64"),
            layers.BatchNormalization(dtype="float64"),
        ]
    )
    _randomise(model)
    folded = fold(model)
    x = np.random.default_rng(2).normal(size=(2, 6, 6, 3))
    got, want = np.asarray(folded(x, training=False)), np.asarray(model(x, training=False))
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_folded_model_saves_and_loads(tmp_path: Path) -> None:
    model = _randomise(_stack(), seed=2)
    folded = fold(model)
    path = tmp_path / "folded.keras"
    folded.save(path)
    loaded = keras.models.load_model(path)
    assert not _bns(loaded)
    x = np.random.default_rng(3).normal(size=(2, 8, 8, 4)).astype("float32")
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(model(x)), rtol=1e-5, atol=1e-5)


def _block() -> Any:
    inputs = keras.Input((6, 6, 3))
    stem = layers.Conv2D(4, 3, padding="same", name="stem")(inputs)
    h = layers.ReLU()(layers.BatchNormalization(name="stem_bn")(stem))
    h = layers.Conv2D(4, 3, padding="same", name="conv1")(h)
    h = BatchNorm(name="bn1")(h)
    out = layers.Add(name="add")([h, stem])
    return keras.Model(inputs, out)


def test_fold_leaves_the_batchnorm_whose_input_feeds_a_shortcut() -> None:
    model = _randomise(_block(), seed=4)
    with pytest.warns(FoldWarning, match=r"'stem_bn' is not folded: the output of 'stem' also"):
        folded = fold(model)
    assert [layer.name for layer in _bns(folded)] == ["stem_bn"]
    report = {e.bn: e for e in folded.fold_report}
    assert report["bn1"].into == "conv1" and "Add 'add'" in str(report["stem_bn"].reason)
    x = np.random.default_rng(5).normal(size=(2, 6, 6, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(folded(x)), np.asarray(model(x)), rtol=1e-5, atol=1e-5)
    with pytest.raises(FoldError, match=r"'stem_bn' is not folded.*\(strict=True\)"):
        fold(model, strict=True)


def test_fold_reports_what_it_cannot_fold_exactly() -> None:
    shared = layers.BatchNormalization(name="shared")
    inputs = keras.Input((4,))
    branches = [shared(layers.Dense(4)(inputs)), shared(layers.Dense(4)(inputs))]
    twice = keras.Model(inputs, layers.Add()(branches))
    cases = [
        (
            keras.Sequential([keras.Input((4,)), layers.ReLU(name="act"), BatchNorm()]),
            "its input is ReLU 'act', not the output",
        ),
        (
            keras.Sequential(
                [keras.Input((3, 5, 5)), layers.Conv2D(5, 1, data_format="channels_first"),
                 layers.BatchNormalization(axis=-1)]
            ),
            "feature axis -1 is not .* output-channel axis 1",
        ),
        (
            keras.Sequential(
                [keras.Input((4,)), layers.Dense(4), BatchNorm(track_running_stats=False)]
            ),
            "track_running_stats=False",
        ),
        (twice, "'shared' is not folded: it is called 2 times"),
    ]  # fmt: skip
    for model, reason in cases:
        before = _weights(model)
        with pytest.warns(FoldWarning, match=reason):
            folded = fold(model)
        assert _bns(folded)
        with pytest.raises(FoldError, match=reason):
            fold(model, strict=True)
        _same(_weights(model), before)


def test_fold_refuses_a_subclassed_model() -> None:
    class Net(keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.fc = layers.Dense(3)
            self.bn = layers.BatchNormalization()

        def call(self, x: Any) -> Any:
            return self.bn(self.fc(x))

    net = Net()
    net(np.zeros((2, 4), "float32"))
    with pytest.raises(ValueError, match="fold needs Sequential or functional models"):
        fold(net)


# -- freeze and convert ------------------------------------------------------------------


def _inference(x: np.ndarray, layer: Any, eps: float) -> np.ndarray:
    mean, var = np.asarray(layer.moving_mean), np.asarray(layer.moving_variance)
    return (x - mean) / np.sqrt(var + eps) * np.asarray(layer.gamma) + np.asarray(layer.beta)


@pytest.mark.parametrize("kind", ["native", "unorm"])
def test_freeze_normalises_with_moving_statistics_in_training(kind: str) -> None:
    bn = layers.BatchNormalization() if kind == "native" else BatchNorm()
    model = _randomise(keras.Sequential([keras.Input((3,)), bn]), seed=6)
    state = _weights(model)
    freeze(model)
    x = np.random.default_rng(7).normal(size=(5, 3)).astype("float32")
    eps = 1e-3 if kind == "native" else 1e-5
    np.testing.assert_allclose(
        np.asarray(model(x, training=True)), _inference(x, bn, eps), rtol=1e-5, atol=1e-6
    )
    _same(_weights(model), state)
    assert not model.trainable_weights
    with pytest.raises(ValueError, match="freeze needs running statistics: BatchNorm 'b'"):
        freeze(
            keras.Sequential([keras.Input((3,)), BatchNorm(track_running_stats=False, name="b")])
        )


@pytest.mark.parametrize("kind", ["native", "unorm"])
def test_freeze_with_trainable_scale_and_shift(kind: str) -> None:
    tf = pytest.importorskip("tensorflow")
    bn = layers.BatchNormalization() if kind == "native" else BatchNorm()
    model = _randomise(keras.Sequential([keras.Input((3,)), bn]), seed=13)
    state = _weights(model)
    frozen = freeze(model, trainable=True)
    layer = frozen.layers[0]
    assert isinstance(layer, BatchNorm) and layer.frozen and layer.trainable
    assert len(frozen.trainable_weights) == 2  # gamma and beta
    x = np.random.default_rng(14).normal(size=(5, 3)).astype("float32")
    dy = np.random.default_rng(15).normal(size=(5, 3)).astype("float32")
    with tf.GradientTape() as tape:
        y = frozen(x, training=True)
        loss = tf.reduce_sum(y * dy)
    dgamma, dbeta = tape.gradient(loss, [layer.gamma, layer.beta])
    eps = 1e-3 if kind == "native" else 1e-5
    mean, var = np.asarray(layer.moving_mean), np.asarray(layer.moving_variance)
    xhat = (x - mean) / np.sqrt(var + eps)
    np.testing.assert_allclose(np.asarray(y), _inference(x, layer, eps), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dgamma), (dy * xhat).sum(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dbeta), dy.sum(0), rtol=1e-5, atol=1e-6)
    _same(_weights(frozen), state)  # moving statistics untouched by the training call
    clone = BatchNorm.from_config(layer.get_config())
    assert clone.frozen
    with pytest.raises(ValueError, match="frozen needs running statistics"):
        BatchNorm(track_running_stats=False, frozen=True)


def test_convert_keeps_a_frozen_native_layer_frozen() -> None:
    native = keras.Sequential([keras.Input((3,)), layers.BatchNormalization(trainable=False)])
    _randomise(native, seed=8)
    x = np.random.default_rng(9).normal(size=(4, 3)).astype("float32")
    expected = np.asarray(native(x, training=True))  # Keras: frozen means inference
    converted = convert(native)
    state = _weights(converted)
    got = np.asarray(converted(x, training=True))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got, _inference(x, native.layers[0], 1e-3), rtol=1e-5, atol=1e-6)
    _same(_weights(converted), state)


# -- recalibrate -------------------------------------------------------------------------


def test_recalibrate_gives_the_statistics_of_the_whole_data_set() -> None:
    model = keras.Sequential(
        [
            keras.Input((3,)),
            layers.Dense(5),
            layers.BatchNormalization(),
            layers.ReLU(),
            layers.Dense(4),
            BatchNorm(preset="torch"),
        ]
    )
    _randomise(model, seed=10)
    rng = np.random.default_rng(11)
    data = (rng.normal(size=(23, 3)) * 2 + 1).astype("float32")
    batches = [data[:8], data[8:16], data[16:]]
    params = [np.asarray(w, np.float64) for w in model.get_weights()]
    recalibrate(model, batches)
    w1, b1, g1, be1 = params[0], params[1], params[2], params[3]
    w2, b2 = params[6], params[7]
    h1 = data.astype(np.float64) @ w1 + b1
    parts = []
    for i in (0, 8, 16):
        h = h1[i : i + 8]
        normed = (h - h.mean(0)) / np.sqrt(h.var(0) + 1e-3) * g1 + be1  # Keras's eps
        parts.append(np.maximum(normed, 0) @ w2 + b2)
    h2 = np.concatenate(parts)
    bn1, bn2 = model.layers[1], model.layers[4]
    np.testing.assert_allclose(np.asarray(bn1.moving_mean), h1.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(bn1.moving_variance), h1.var(0), rtol=1e-5)  # biased
    np.testing.assert_allclose(np.asarray(bn2.moving_mean), h2.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(bn2.moving_variance), h2.var(0, ddof=1), rtol=1e-4)
    after = [np.asarray(w, np.float64) for w in model.get_weights()]
    for i in (0, 1, 2, 3, 6, 7, 8, 9):  # kernels, biases, gamma and beta
        np.testing.assert_array_equal(after[i], params[i])


@pytest.mark.parametrize("kind", ["native", "unorm"])
def test_recalibrate_leaves_batch_renormalization_weights(kind: str) -> None:
    if kind == "native":
        bn = layers.BatchNormalization(renorm=True)
    else:
        bn = BatchNorm(renorm=True, renorm_running="stddev")
    model = keras.Sequential([keras.Input((3,)), bn])
    bn.renorm_mean.assign(np.array([0.5, -1.0, 2.0], "float32"))
    bn.renorm_stddev.assign(np.array([1.5, 0.5, 2.0], "float32"))
    kept = [np.array(bn.renorm_mean), np.array(bn.renorm_stddev)]
    rng = np.random.default_rng(16)
    data = [(rng.normal(size=(6, 3)) * 2 + 1).astype("float32"), rng.normal(size=(3, 3))]
    data[1] = data[1].astype("float32")
    recalibrate(model, data)
    flat = np.concatenate(data).astype(np.float64)
    var = flat.var(0, ddof=0 if kind == "native" else 1)  # Keras: biased; canonical: unbiased
    eps = 1e-3 if kind == "native" else 1e-5
    np.testing.assert_allclose(np.asarray(bn.moving_mean), flat.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(bn.moving_variance), var, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(bn.moving_stddev), np.sqrt(var + eps), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(bn.renorm_mean), kept[0])
    np.testing.assert_array_equal(np.asarray(bn.renorm_stddev), kept[1])


def test_recalibrate_refuses_bad_input_and_leaves_the_model_unchanged() -> None:
    model = _randomise(
        keras.Sequential([keras.Input((3,)), layers.Dense(4), layers.BatchNormalization()]), 12
    )
    before = _weights(model)
    bad = np.ones((4, 3), "float32")
    bad[1, 2] = np.inf
    ok = np.ones((4, 3), "float32")
    cases = [
        (keras.Sequential([keras.Input((3,)), layers.Dense(2)]), [ok], "recalibrate needs a model"),
        (model, [], "batches must yield at least one batch, got none"),
        (model, [ok, bad], r"batches\[1\] gives non-finite statistics at BatchNorm"),
        (model, [np.ones((0, 3), "float32")], "received no values from batches"),
    ]
    for net, batches, message in cases:
        with pytest.raises(ValueError, match=message):
            recalibrate(net, batches)
    _same(_weights(model), before)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frozen = freeze(keras.Sequential([keras.Input((3,)), layers.BatchNormalization()]))
    with pytest.raises(ValueError, match="is not frozen, got none"):
        recalibrate(frozen, [ok])


def test_recalibrate_of_a_mirrored_model_sets_every_replica() -> None:
    worker = Path(__file__).with_name("keras_recalibrate_worker.py")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    root = str(worker.parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, str(worker)], capture_output=True, text=True, timeout=300, env=env,
        cwd=root,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    sys.path.insert(0, str(worker.parent))
    try:
        from keras_recalibrate_worker import data
    finally:
        sys.path.pop(0)
    h = data().astype(np.float64) @ np.asarray(got["kernel"]) + np.asarray(got["bias"])
    assert got["replicas"] == 2 and len(got["mean"]) == 2
    for mean, var in zip(got["mean"], got["var"], strict=True):  # each replica's copy
        np.testing.assert_allclose(mean, h.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(var, h.var(0, ddof=1), rtol=1e-5)
