"""unorm.torch's neutral-checkpoint export and load: round trips and refusals."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from unorm import port
from unorm._core.port_plan import UnverifiedLoadWarning
from unorm.port import CheckpointError

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from unorm._torch.port import export_checkpoint, load_checkpoint  # noqa: E402
from unorm.models.torch import lenet_bn  # noqa: E402
from unorm.torch import BatchNorm  # noqa: E402


def _trained(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    net = lenet_bn()
    for _ in range(2):
        net(torch.randn(8, 1, 28, 28))
    return net.eval()


def test_round_trip_through_a_file_gives_identical_logits(tmp_path: Path) -> None:
    source, dest = _trained(0), _trained(1)
    x = torch.randn(4, 1, 28, 28)
    ckpt = export_checkpoint(source, x[:1])
    assert [la.kind for la in ckpt.layers] == ["conv", "batchnorm"] * 2 + [
        "dense",
        "batchnorm",
    ] * 2 + ["dense"]
    assert ckpt.layers[4].attrs["flatten_from"] == [16, 4, 4]
    port.save(ckpt, tmp_path / "lenet.safetensors")
    load_checkpoint(dest, port.load(tmp_path / "lenet.safetensors"))
    assert torch.equal(source(x), dest(x))
    assert int(dest[1].num_batches_tracked) == 2


def test_native_batchnorm_semantics_travel_with_the_checkpoint() -> None:
    native = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, eps=1e-3, momentum=0.3))
    ours = nn.Sequential(nn.Linear(3, 4), BatchNorm(4))
    load_checkpoint(ours, export_checkpoint(native))
    assert (ours[1].eps, ours[1].momentum, ours[1].spec.preset) == (1e-3, 0.3, "torch")
    assert not ours[1].spec.skip_nonfinite  # behaves as nn.BatchNorm1d did


@pytest.mark.parametrize(
    ("source", "lost"),
    [
        # canonical: the guard and what an empty batch does are lost
        (BatchNorm(4), ["skip_nonfinite=True", "empty_batch='skip'"]),
        (
            BatchNorm(4, preset="keras"),
            ["running_var='biased'", "allow_single_value=True", "empty_batch='nan'"],
        ),
        (
            BatchNorm(4, preset="mxnet"),
            [
                "running_var='biased'",
                "allow_single_value=True",
                "update_on='backward'",
                "empty_batch='nan'",
            ],
        ),
    ],
)
def test_native_batchnorm_warns_about_every_lost_semantic(
    source: BatchNorm, lost: list[str]
) -> None:
    ckpt = export_checkpoint(nn.Sequential(nn.Linear(3, 4), source), torch.zeros(1, 3))
    native = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with pytest.warns(UserWarning, match="nn.BatchNorm cannot express") as caught:
        load_checkpoint(native, ckpt)  # verified: eval output is unchanged
    (message,) = [str(w.message) for w in caught]
    for item in lost:
        assert item in message
    all_lost = [
        "running_var=",
        "skip_nonfinite=",
        "allow_single_value=",
        "update_on=",
        "empty_batch=",
    ]
    assert sum(item in message for item in all_lost) == len(lost)  # and nothing else
    # What the warning is about: a native layer writes an inf batch into its statistics.
    native.train()
    x = torch.randn(5, 3)
    x[0, 0] = float("inf")
    native(x)
    assert not torch.isfinite(native[1].running_mean).all()


def test_native_to_native_loads_without_warning() -> None:
    source = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=None))
    dest = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_checkpoint(dest, export_checkpoint(source, torch.zeros(2, 3)))
    assert dest[1].momentum is None


def test_mismatch_names_both_layers_and_changes_nothing() -> None:
    source = nn.Sequential(nn.Conv2d(1, 6, 5), nn.Flatten(), nn.Linear(6 * 24 * 24, 10))
    dest = nn.Sequential(nn.Conv2d(1, 6, 5), nn.Flatten(), nn.Linear(6 * 24 * 24, 12))
    before = [p.detach().clone() for p in dest.parameters()]
    with pytest.raises(
        port.CheckpointError,
        match=r"layer 1: checkpoint dense '2' \(10, 3456\) vs model dense '2': weight shape",
    ):
        load_checkpoint(dest, export_checkpoint(source))
    for b, p in zip(before, dest.parameters(), strict=True):
        assert torch.equal(b, p)  # the conv, which matched, was not loaded either
    with pytest.raises(port.CheckpointError, match="has 2 layers with parameters, the model 1"):
        load_checkpoint(
            nn.Linear(3, 2), export_checkpoint(nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2)))
        )
    with pytest.raises(port.CheckpointError, match="kinds differ"):
        load_checkpoint(nn.Conv1d(3, 2, 1), export_checkpoint(nn.Linear(3, 2)))
    with pytest.raises(port.CheckpointError, match="the model has no 'bias'"):
        load_checkpoint(nn.Linear(3, 2, bias=False), export_checkpoint(nn.Linear(3, 2)))


def test_garbage_file_leaves_the_model_unchanged(tmp_path: Path) -> None:
    net = _trained(0)
    path = tmp_path / "bad.safetensors"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(port.CheckpointError):
        load_checkpoint(net, port.load(path))
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])


def test_invalid_batchnorm_settings_are_refused_before_any_copy() -> None:
    source = nn.Sequential(nn.Linear(3, 4), BatchNorm(4))
    ckpt = export_checkpoint(source)
    bad_layer = port.Layer(
        ckpt.layers[1].name, "batchnorm", ckpt.layers[1].tensors,
        {**ckpt.layers[1].attrs, "spec": {**ckpt.layers[1].attrs["spec"], "eps": -1.0}},
    )  # fmt: skip
    bad = port.Checkpoint([ckpt.layers[0], bad_layer], ckpt.tensors, source="torch")
    dest = nn.Sequential(nn.Linear(3, 4), BatchNorm(4))
    before = [p.detach().clone() for p in dest.parameters()]
    message = "invalid BatchNorm settings in the checkpoint: eps must be"
    with pytest.raises(port.CheckpointError, match=message):
        load_checkpoint(dest, bad)
    assert all(torch.equal(b, p) for b, p in zip(before, dest.parameters(), strict=True))


class _Swapped(nn.Module):
    """Two BatchNorms of one size registered in the other order than they run."""

    def __init__(self, in_order: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        first, second = nn.BatchNorm1d(4), nn.BatchNorm1d(4)
        if in_order:
            self.bn_a, self.bn_b = first, second
        else:
            self.bn_b, self.bn_a = second, first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_b(torch.relu(self.bn_a(self.fc(x))))


def _stepped(model: nn.Module) -> nn.Module:
    torch.manual_seed(3)
    model.train()
    for _ in range(3):
        model(torch.randn(16, 4) * 3 + 1)
    return model


def test_two_batchnorms_registered_out_of_order_pair_by_data_flow() -> None:
    """Registered bn_b then bn_a, run bn_a then bn_b: matched along the data flow, each
    gets its own statistics, whatever order the destination registered them in."""
    source = _stepped(_Swapped(in_order=False))
    dest = _Swapped(in_order=True)
    load_checkpoint(dest, export_checkpoint(source, torch.zeros(1, 4)))
    for name in ("bn_a", "bn_b"):
        mine, theirs = getattr(dest, name), getattr(source, name)
        assert torch.equal(mine.running_mean, theirs.running_mean), name


def test_a_load_that_computes_otherwise_is_refused_and_changes_nothing() -> None:
    """Without the recorded flow (an older file) the layers pair by registration order,
    which swaps the two BatchNorms' statistics: the probe refuses the load, names the
    first layer whose output diverges and leaves every parameter and buffer as it was."""
    ckpt = export_checkpoint(_stepped(_Swapped(in_order=False)), torch.zeros(1, 4))
    ckpt = port.Checkpoint(ckpt.layers, ckpt.tensors, ckpt.source)  # no flow
    dest = _Swapped(in_order=True)
    before = {k: v.clone() for k, v in dest.state_dict().items()}
    named = r"diverges is layer 1: checkpoint batchnorm 'bn_b' \(model 'bn_a'\).*left as it was"
    with pytest.raises(CheckpointError, match=named):
        load_checkpoint(dest, ckpt)
    for key, value in dest.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_verified_load_computes_what_the_source_computes() -> None:
    source = _stepped(_Swapped(in_order=False))
    dest = _Swapped(in_order=False)
    load_checkpoint(dest, export_checkpoint(source, torch.zeros(1, 4)))
    x = torch.randn(5, 4)
    source.eval(), dest.eval()
    torch.testing.assert_close(dest(x), source(x), rtol=0, atol=0)


def test_a_checkpoint_without_a_probe_loads_with_a_warning() -> None:
    source, dest = nn.Linear(3, 2), nn.Linear(3, 2)
    with pytest.warns(UnverifiedLoadWarning, match="no probe"):
        load_checkpoint(dest, export_checkpoint(source))
    assert torch.equal(dest.weight, source.weight)


def test_probing_leaves_running_statistics_and_training_flags_alone() -> None:
    model = _stepped(_Swapped(in_order=True))
    model.bn_a.eval()  # a BatchNorm kept in eval mode inside a training model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_checkpoint(model, torch.zeros(1, 4))
    assert model.training and not model.bn_a.training and model.bn_b.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


class _Untraceable(_Swapped):
    """``_Swapped`` with a forward torch.fx cannot trace (a branch on a value)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.sum()) > 1e9:  # never taken; fx cannot trace it
            x = -x
        return super().forward(x)


def test_a_forward_fx_cannot_trace_is_matched_by_running_it() -> None:
    """torch.fx refuses the branch on a value (as it refuses ``transformers``' models):
    the flow is read by running the forward once on the probe's input, on export and on
    load, and the two BatchNorms registered in other orders pair correctly."""
    source = _stepped(_Untraceable(in_order=False))
    ckpt = export_checkpoint(source, torch.zeros(1, 4))
    assert [op for op, *_ in ckpt.extra["flow"]] == ["input", "layer", "layer", "layer"]
    dest = _Untraceable(in_order=True)
    load_checkpoint(dest, ckpt)
    for name in ("bn_a", "bn_b"):
        mine, theirs = getattr(dest, name), getattr(source, name)
        assert torch.equal(mine.running_var, theirs.running_var), name


class _Tower(nn.Module):
    """Two towers of one shape, concatenated in one order and summed with the input:
    the flow names which tower feeds which half."""

    def __init__(self, flip: bool) -> None:
        super().__init__()
        self.left, self.right = nn.Linear(4, 2), nn.Linear(4, 2)
        if flip:
            self.right, self.left = nn.Linear(4, 2), nn.Linear(4, 2)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.sum()) > 1e9:  # never taken; fx cannot trace it
            x = -x
        both = torch.cat([self.left(x), torch.relu(self.right(x))], dim=1)
        return self.head(both + x)


def test_running_the_forward_tells_concatenated_towers_apart() -> None:
    source, dest = _Tower(flip=True), _Tower(flip=False)
    ckpt = export_checkpoint(source, torch.zeros(1, 4))
    assert sorted({op for op, *_ in ckpt.extra["flow"]}) == ["add", "concat", "input", "layer"]
    load_checkpoint(dest, ckpt)
    assert torch.equal(dest.left.weight, source.left.weight)
    assert torch.equal(dest.right.weight, source.right.weight)


def test_an_explicit_mapping_settles_what_the_flow_cannot() -> None:
    """A checkpoint without a recorded flow (an older file) pairs by order, which the
    probe refuses; mapping= names the pairs and the load goes through, verified."""
    ckpt = export_checkpoint(_stepped(_Untraceable(in_order=False)), torch.zeros(1, 4))
    ckpt = port.Checkpoint(ckpt.layers, ckpt.tensors, ckpt.source)  # no flow
    dest = _Untraceable(in_order=True)
    with pytest.raises(CheckpointError, match="diverges"):
        load_checkpoint(dest, ckpt)
    load_checkpoint(dest, ckpt, mapping={"bn_b": "bn_b", "bn_a": "bn_a"})
    with pytest.raises(
        CheckpointError, match=r"mapping names layers that do not exist.*\['bn_c'\]"
    ):
        load_checkpoint(dest, ckpt, mapping={"bn_a": "bn_c"})
