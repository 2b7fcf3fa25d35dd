"""unorm.torch's BatchNorm after training (``SPEC.md`` section 8): ``fold`` against the
unfolded eval model and ``torch.nn.utils.fusion``, ``recalibrate`` against NumPy statistics
of the whole data set, ``freeze`` and ``convert`` of a frozen layer against the formula."""

from __future__ import annotations

import io
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
from torch import Tensor, nn  # noqa: E402
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval  # noqa: E402

from unorm.models.torch import lenet_bn  # noqa: E402
from unorm.torch import (  # noqa: E402
    BatchNorm,
    FoldError,
    FoldWarning,
    convert,
    fold,
    freeze,
    recalibrate,
)

_BNS = (BatchNorm, nn.modules.batchnorm._BatchNorm)


def _randomise(net: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, _BNS) and m.running_mean is not None:
                c = m.running_mean.shape[0]
                m.running_mean.copy_(torch.randn(c, generator=g))
                m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.2)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(c, generator=g))
    return net.eval()


def _snapshot(net: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _same_state(net: nn.Module, before: dict[str, Tensor]) -> None:
    after = net.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0, msg=k)


def _has_bn(net: nn.Module) -> bool:
    return any(isinstance(m, _BNS) for m in net.modules())


# -- fold --------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", [None, "torch", "keras", "mxnet"])
def test_fold_of_lenet_bn_equals_the_unfolded_eval_model(preset: str | None) -> None:
    torch.manual_seed(0)
    net = _randomise(lenet_bn(preset))
    before = _snapshot(net)
    folded = fold(net)
    assert not _has_bn(folded)
    assert [e.folded for e in folded.fold_report] == [True] * 4
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), rtol=1e-5, atol=1e-5)
    _same_state(net, before)  # the original is untouched
    assert _has_bn(net)


def _native_stack() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=2, bias=False),
        nn.BatchNorm2d(8),
        nn.Conv2d(8, 16, 3, groups=8),  # depthwise, multiplier 2
        nn.BatchNorm2d(16),
        nn.Identity(),
        nn.Flatten(),
        nn.Linear(16 * 2 * 2, 6),
        nn.BatchNorm1d(6),
    )


def test_fold_of_native_layers_matches_torchs_own_fusion() -> None:
    torch.manual_seed(1)
    net = _randomise(_native_stack(), seed=1)
    x = torch.randn(4, 3, 6, 6)
    folded = fold(net, example=x)
    assert not _has_bn(folded)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), rtol=1e-5, atol=1e-5)
        for conv, bn in [("0", "1"), ("3", "4"), ("5", "6")]:
            theirs = fuse_conv_bn_eval(net.get_submodule(conv), net.get_submodule(bn))
            mine = folded.get_submodule(conv)
            torch.testing.assert_close(mine.weight, theirs.weight, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(mine.bias, theirs.bias, rtol=1e-6, atol=1e-6)
        theirs = fuse_linear_bn_eval(net[9], net[10])
        torch.testing.assert_close(folded.get_submodule("9").weight, theirs.weight)
        torch.testing.assert_close(folded.get_submodule("9").bias, theirs.bias)


@pytest.mark.parametrize("groups", [1, 2, 3])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_fold_of_a_grouped_transposed_convolution(groups: int, dims: int) -> None:
    torch.manual_seed(groups)
    conv = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims]
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    net = _randomise(nn.Sequential(conv(6, 12, 2, groups=groups), bn(12)), seed=groups)
    x = torch.randn(2, 6, *([3] * dims))
    folded = fold(net)
    assert not _has_bn(folded)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), rtol=1e-5, atol=1e-5)
        if groups == 1:  # torch's own is right here; grouped, it raises (pytorch/pytorch#180995)
            theirs = fuse_conv_bn_eval(net[0], net[1], transpose=True)
            torch.testing.assert_close(folded.get_submodule("0").weight, theirs.weight)


class _Block(nn.Module):
    """A ResNet-like block: the stem's output feeds its BatchNorm and the shortcut."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.stem_bn = BatchNorm(4, num_dims=4)
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = BatchNorm(4, num_dims=4, preset="keras")
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        y = torch.relu(self.bn1(self.conv1(torch.relu(self.stem_bn(h)))))
        return torch.relu(self.bn2(self.conv2(y)) + h)


def test_fold_leaves_the_batchnorm_whose_input_feeds_a_shortcut() -> None:
    torch.manual_seed(2)
    net = _randomise(_Block(), seed=2)
    x = torch.randn(2, 3, 5, 5)
    with pytest.warns(FoldWarning, match=r"'stem_bn' is not folded: the output of 'stem' also"):
        folded = fold(net)
    kept = [n for n, m in folded.named_modules() if isinstance(m, _BNS)]
    assert kept == ["stem_bn"]
    report = {e.bn: e for e in folded.fold_report}
    assert report["bn1"].into == "conv1" and report["bn2"].into == "conv2"
    assert "add" in str(report["stem_bn"].reason)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(FoldError, match=r"'stem_bn' is not folded.*\(strict=True\)"):
        fold(net, strict=True)


def test_fold_reports_what_it_cannot_fold_exactly() -> None:
    torch.manual_seed(3)
    shared = nn.Conv2d(4, 4, 1)

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = shared
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: Tensor) -> Tensor:
            return self.bn(self.conv(x)) + self.conv(x)

    cases: list[tuple[nn.Module, str]] = [
        (nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4)), "its input is ReLU '0', not the output"),
        (nn.Sequential(nn.Conv2d(4, 5, 1), BatchNorm(5, axis=-1)), "feature axis -1 is not"),
        (
            nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)),
            "track_running_stats=False",
        ),
        (nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), "pass an example input"),
        (Twice(), "'conv' is used 2 times"),
    ]
    for net, reason in cases:
        _randomise(net)
        before = _snapshot(net)
        with pytest.warns(FoldWarning, match=reason):
            folded = fold(net)
        assert _has_bn(folded)
        with pytest.raises(FoldError, match=reason):
            fold(net, strict=True)
        _same_state(net, before)
    # The example input shows a dense layer's rank: rank 2 folds, rank 3 is refused.
    dense = _randomise(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not _has_bn(fold(dense, example=torch.randn(3, 4)))
    with pytest.warns(FoldWarning, match=r"feature axis 1 is not '0''s output-channel axis -1"):
        fold(dense, example=torch.randn(3, 4, 4))


def test_fold_of_sync_batchnorms_and_a_cumulative_average() -> None:
    from unorm.torch import SyncBatchNorm

    torch.manual_seed(12)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4), nn.Conv2d(4, 5, 1), SyncBatchNorm(5),
        nn.Flatten(), nn.Linear(5 * 4 * 4, 3),
        BatchNorm(3, num_dims=2, momentum=None),
    )  # fmt: skip
    _randomise(net, seed=12)
    folded = fold(net)
    assert not _has_bn(folded)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), rtol=1e-5, atol=1e-5)


def test_fold_refuses_a_model_torch_fx_cannot_trace() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)
            self.bn = nn.BatchNorm2d(2)

        def forward(self, x: Tensor) -> Tensor:
            return self.bn(self.conv(x)) if x.sum() > 0 else x

    with pytest.raises(ValueError, match=r"fold needs a model torch\.fx can trace symbolically"):
        fold(Branchy())


def test_fold_keeps_a_half_precision_layer_and_rounds_once() -> None:
    torch.manual_seed(4)
    net = _randomise(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    net = net.to(torch.float16)
    folded = fold(net)
    conv, bn = net[0], net[1]

    def f64(t: Tensor) -> np.ndarray:
        return t.detach().double().numpy()

    s = f64(bn.weight) / np.sqrt(f64(bn.running_var) + bn.eps)
    expected_w = (f64(conv.weight) * s.reshape(-1, 1, 1, 1)).astype(np.float16)
    b = (f64(conv.bias) - f64(bn.running_mean)) * s
    expected_b = (b + f64(bn.bias)).astype(np.float16)
    got = folded.get_submodule("0")
    assert got.weight.dtype == torch.float16
    np.testing.assert_array_equal(got.weight.detach().numpy(), expected_w)
    np.testing.assert_array_equal(got.bias.detach().numpy(), expected_b)


@pytest.mark.parametrize("dynamo", [False, True])
def test_folded_lenet_exports_to_onnx_without_batchnormalization(dynamo: bool) -> None:
    onnx = pytest.importorskip("onnx")
    torch.manual_seed(5)
    net = _randomise(lenet_bn())
    x = torch.randn(1, 1, 28, 28)

    def export(model: nn.Module) -> object:
        buffer = io.BytesIO()
        torch.onnx.export(model, (x,), buffer, dynamo=dynamo)
        return onnx.load_from_string(buffer.getvalue())

    def kinds(proto: object) -> list[str]:
        return [n.op_type for n in proto.graph.node]  # type: ignore[attr-defined]

    if not dynamo:  # the dense layers' BatchNorms stay in the unfolded export
        assert "BatchNormalization" in kinds(export(net))
    proto = export(fold(net))
    assert "BatchNormalization" not in kinds(proto) and "Conv" in kinds(proto)
    # ONNX's own reference evaluator runs the folded file: the unfolded model's numbers.
    from onnx.reference import ReferenceEvaluator

    (got,) = ReferenceEvaluator(proto).run(None, {proto.graph.input[0].name: x.numpy()})  # type: ignore[attr-defined]
    with torch.no_grad():
        np.testing.assert_allclose(got, net(x).numpy(), rtol=1e-4, atol=1e-5)


class FrozenBatchNorm2d(nn.Module):
    """A stand-in for torchvision's FrozenBatchNorm2d (torchvision is not installed)."""

    def __init__(self, n: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(n))
        self.register_buffer("bias", torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


def _frozen_native(n: int, eps: float, seed: int) -> FrozenBatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    f = FrozenBatchNorm2d(n, eps)
    f.weight.copy_(torch.rand(n, generator=g) + 0.5)
    f.bias.copy_(torch.randn(n, generator=g))
    f.running_mean.copy_(torch.randn(n, generator=g))
    f.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return f


def test_fold_of_a_frozen_native_batchnorm() -> None:
    torch.manual_seed(6)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), _frozen_native(4, 1e-5, 6)).eval()
    x = torch.randn(2, 3, 6, 6)
    folded = fold(net)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), rtol=1e-5, atol=1e-5)


# -- freeze and convert ------------------------------------------------------------------


@pytest.mark.parametrize("eps", [1e-5, 0.0])  # 0: FrozenBatchNorm2d before pytorch/vision#2169
def test_convert_maps_a_frozen_native_batchnorm_onto_a_frozen_one(eps: float) -> None:
    native = _frozen_native(4, eps, 7)
    net = nn.Sequential(native)
    x = torch.randn(3, 4, 2, 2)
    expected = native(x)
    converted = convert(net)
    layer = converted[0]
    assert isinstance(layer, BatchNorm) and layer.frozen and layer.eps == eps
    assert layer.weight is not None and not layer.weight.requires_grad
    converted.train()
    torch.testing.assert_close(converted(x), expected)
    assert int(layer.num_batches_tracked) == 0


@pytest.mark.parametrize("trainable", [False, True])
def test_freeze_normalises_with_running_statistics_in_training(trainable: bool) -> None:
    torch.manual_seed(8)
    net = _randomise(nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3)))
    rm, rv = net[1].running_mean.clone(), net[1].running_var.clone()
    gamma, beta = net[1].weight.detach().clone(), net[1].bias.detach().clone()
    net = freeze(net, trainable=trainable).train()
    bn = net[1]
    assert isinstance(bn, BatchNorm) and bn.frozen and not bn.training
    x = torch.randn(4, 2, 3, 3)
    h = net[0](x).detach()
    y = net(x)
    xhat = (h - rm.view(1, -1, 1, 1)) / torch.sqrt(rv.view(1, -1, 1, 1) + 1e-5)
    torch.testing.assert_close(y, xhat * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1))
    dy = torch.randn_like(y)
    y.backward(dy)
    torch.testing.assert_close(bn.running_mean, rm, rtol=0, atol=0)
    torch.testing.assert_close(bn.running_var, rv, rtol=0, atol=0)
    assert int(bn.num_batches_tracked) == 0
    assert bn.weight.requires_grad is trainable
    if trainable:  # the inference backward: running statistics are constants
        torch.testing.assert_close(bn.weight.grad, (dy * xhat).sum((0, 2, 3)))
        torch.testing.assert_close(bn.bias.grad, dy.sum((0, 2, 3)))
    else:
        assert bn.weight.grad is None


def test_freeze_refuses_a_batchnorm_without_running_statistics() -> None:
    net = nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.raises(ValueError, match="freeze needs running statistics: BatchNorm '1'"):
        freeze(net)
    assert all(type(m) is nn.BatchNorm1d for m in net)
    with pytest.raises(ValueError, match="frozen needs running statistics"):
        BatchNorm(3, track_running_stats=False).frozen = True
    with pytest.raises(ValueError, match="trainable must be True or False, got 1"):
        freeze(nn.Sequential(BatchNorm(3)), trainable=1)  # type: ignore[arg-type]


# -- recalibrate -------------------------------------------------------------------------


def _numpy_bn_train(h: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    return (h - h.mean(0)) / np.sqrt(h.var(0) + eps) * gamma + beta


def test_recalibrate_gives_the_statistics_of_the_whole_data_set() -> None:
    torch.manual_seed(9)
    net = nn.Sequential(
        nn.Linear(3, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 4),
        BatchNorm(4, num_dims=2, preset="keras"),
    )  # fmt: skip
    _randomise(net)  # eval mode, which recalibrate must keep
    data = torch.randn(23, 3) * 2 + 1
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=8)
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    recalibrate(net, loader, progress=io.StringIO())
    # NumPy: the first BatchNorm's input is the dense layer's output; the second's is what
    # the training forward makes of each batch (8, 8 and 7 rows), the first normalising with
    # its batch statistics.
    w1, b1 = params["0.weight"].double().numpy(), params["0.bias"].double().numpy()
    w2, b2 = params["3.weight"].double().numpy(), params["3.bias"].double().numpy()
    x = data.double().numpy()
    h1 = x @ w1.T + b1
    h2 = np.concatenate(
        [
            np.maximum(
                _numpy_bn_train(
                    h1[i : i + 8], params["1.weight"].double().numpy(),
                    params["1.bias"].double().numpy(), 1e-5,
                ),
                0,
            ) @ w2.T + b2
            for i in (0, 8, 16)
        ]
    )  # fmt: skip
    np.testing.assert_allclose(net[1].running_mean.numpy(), h1.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(net[1].running_var.numpy(), h1.var(0, ddof=1), rtol=1e-5)
    np.testing.assert_allclose(net[4].running_mean.numpy(), h2.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(net[4].running_var.numpy(), h2.var(0), rtol=1e-4)  # biased
    assert int(net[1].num_batches_tracked) == 3 and int(net[4].num_batches_tracked) == 3
    assert not any(m.training for m in net.modules())
    for k, v in net.named_parameters():
        torch.testing.assert_close(v.detach(), params[k], rtol=0, atol=0)


def test_recalibrate_channels_last_and_frozen_layers() -> None:
    torch.manual_seed(10)
    net = nn.Sequential(BatchNorm(3, axis=-1), BatchNorm(3, axis=-1))
    net[1].frozen = True
    frozen_before = _snapshot(net[1])
    data = [torch.randn(4, 5, 3) + 3, torch.randn(1, 5, 3)]
    recalibrate(net, data)
    flat = torch.cat(data).reshape(-1, 3).double().numpy()
    np.testing.assert_allclose(net[0].running_mean.numpy(), flat.mean(0), rtol=1e-6)
    np.testing.assert_allclose(net[0].running_var.numpy(), flat.var(0, ddof=1), rtol=1e-5)
    _same_state(net[1], frozen_before)


@pytest.mark.parametrize("running", ["variance", "stddev"])
def test_recalibrate_leaves_batch_renormalization_statistics(running: str) -> None:
    torch.manual_seed(13)
    bn = BatchNorm(3, renorm=True, renorm_running=running)
    with torch.no_grad():
        bn.renorm_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        bn.renorm_std.copy_(torch.tensor([1.5, 0.5, 2.0]))
    kept = {k: v.clone() for k, v in bn.named_buffers() if k.startswith("renorm")}
    data = [torch.randn(6, 3) * 2 + 1, torch.randn(3, 3)]
    recalibrate(nn.Sequential(bn), data)
    flat = torch.cat(data).double().numpy()
    np.testing.assert_allclose(bn.running_mean.numpy(), flat.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.running_var.numpy(), flat.var(0, ddof=1), rtol=1e-5)
    for k, v in kept.items():
        torch.testing.assert_close(getattr(bn, k), v, rtol=0, atol=0)
    if running == "stddev":
        want = np.sqrt(flat.var(0, ddof=1) + 1e-5)
        np.testing.assert_allclose(bn.running_std.numpy(), want, rtol=1e-5)


def test_recalibrate_refuses_bad_input_and_leaves_the_model_unchanged() -> None:
    torch.manual_seed(11)
    net = _randomise(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), BatchNorm(4)))
    before = _snapshot(net)
    bad = torch.randn(4, 3)
    bad[2, 1] = float("inf")
    cases: list[tuple[nn.Module, list[Tensor], str]] = [
        (nn.Sequential(nn.Linear(3, 4)), [torch.randn(2, 3)], "recalibrate needs a model with"),
        (net, [], r"batches must yield at least one batch, got none"),
        (
            net,
            [torch.randn(4, 3), bad],
            r"batches\[1\] gives non-finite statistics at BatchNorm '1'",
        ),
        (net, [torch.randn(1, 3)], "(?i)expected more than 1 value per channel"),
        (nn.Sequential(BatchNorm(3)), [torch.zeros(0, 3)], "BatchNorm '0' received no values"),
        (net, ["text"], "batches must yield tensors"),  # type: ignore[list-item]
    ]
    for model, batches, message in cases:
        with pytest.raises(ValueError, match=message):
            recalibrate(model, batches)
    _same_state(net, before)
    assert not any(m.training for m in net.modules())
    frozen = freeze(nn.Sequential(nn.BatchNorm1d(3)))
    with pytest.raises(ValueError, match="is not frozen, got none"):
        recalibrate(frozen, [torch.randn(3, 3)])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("case", ["uneven", "idle", "nonfinite"])
def test_recalibrate_on_two_gloo_ranks_equals_one_process_seeing_all(
    case: str, tmp_path: Path
) -> None:
    worker = Path(__file__).with_name("torch_recalibrate_worker.py")
    sys.path.insert(0, str(worker.parent))
    try:
        from torch_recalibrate_worker import SHARES, data, model
    finally:
        sys.path.pop(0)
    done = subprocess.run(
        [sys.executable, str(worker), str(_free_port()), str(tmp_path), case],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(2)]
    initial = {k: v.detach().numpy() for k, v in model().state_dict().items()}
    if case == "nonfinite":  # every rank refuses, every model unchanged
        assert "batches[0] gives non-finite statistics at BatchNorm '1'" in str(ranks[1]["error"])
        assert "failed on another rank" in str(ranks[0]["error"])
        for r in ranks:
            for k, v in initial.items():
                np.testing.assert_array_equal(r[k], v, err_msg=k)
        return
    # NumPy over all rows: the first BatchNorm's input is the dense layer's output; the
    # second's is the training forward of each batch, wherever a rank ran it.
    x = data().astype(np.float64)
    p = {k: v.astype(np.float64) for k, v in initial.items()}
    h1 = x @ p["0.weight"].T + p["0.bias"]
    spans = [span for share in SHARES[case] for span in share]
    parts = []
    for a, b in spans:
        h = h1[a:b]
        normed = (h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5) * p["1.weight"] + p["1.bias"]
        parts.append(np.maximum(normed, 0) @ p["3.weight"].T + p["3.bias"])
    h2 = np.concatenate(parts)
    for r in ranks:
        assert str(r["error"]) == ""
        np.testing.assert_allclose(r["1.running_mean"], h1.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(r["1.running_var"], h1.var(0, ddof=1), rtol=1e-5)
        np.testing.assert_allclose(r["4.running_mean"], h2.mean(0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(r["4.running_var"], h2.var(0), rtol=1e-4)  # biased
        assert int(r["1.num_batches_tracked"]) == len(spans)
