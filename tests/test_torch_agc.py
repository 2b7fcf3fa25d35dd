"""unorm.torch AGC against the NumPy reference, with logical weights in every layer kind."""

from __future__ import annotations

import numpy as np
import pytest

from unorm import reference as ref

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from unorm.torch import AGC, adaptive_clip_grad_, final_classifier  # noqa: E402


def _set_grads(module: nn.Module, seed: int, scale: float = 0.05) -> dict[str, np.ndarray]:
    gen = torch.Generator().manual_seed(seed)
    grads = {}
    for name, p in module.named_parameters():
        # Per-unit spread of magnitudes so that some units clip and some do not.
        g = torch.randn(p.shape, generator=gen) * scale * torch.rand(p.shape, generator=gen)
        p.grad = g.to(p.dtype)
        grads[name] = p.grad.double().numpy().copy()
    return grads


@pytest.mark.parametrize(
    ("layer", "axes"),
    [
        (nn.Linear(6, 4), {"weight": 0}),
        (nn.Conv1d(3, 5, 3), {"weight": 0}),
        (nn.Conv2d(3, 5, 3), {"weight": 0}),
        (nn.Conv3d(2, 4, 2), {"weight": 0}),
        (nn.Conv2d(4, 4, 3, groups=4), {"weight": 0}),  # depthwise: (O, 1, kh, kw)
        (nn.ConvTranspose2d(3, 5, 3), {"weight": 1}),  # (I, O, kh, kw)
        (nn.ConvTranspose1d(4, 6, 2), {"weight": 1}),
        (nn.Embedding(7, 3), {"weight": 0}),
    ],
)
def test_each_layer_kind_matches_reference(layer: nn.Module, axes: dict[str, int]) -> None:
    layer = layer.double()
    grads = _set_grads(layer, seed=1, scale=0.2)
    weights = {n: p.detach().numpy().copy() for n, p in layer.named_parameters()}
    adaptive_clip_grad_(layer, clipping=0.02, eps=1e-3)
    for name, p in layer.named_parameters():
        want = ref.agc_clip(grads[name], weights[name], axes.get(name), clipping=0.02, eps=1e-3)
        np.testing.assert_allclose(p.grad.numpy(), want, rtol=1e-12, atol=1e-15)
        changed = not np.array_equal(p.grad.numpy(), grads[name])
        assert changed or name == "bias", f"{name} should have been clipped somewhere"


def test_conv_transpose_is_clipped_per_output_channel_not_input() -> None:
    layer = nn.ConvTranspose2d(2, 6, 3, bias=False).double()  # weight (2, 6, 3, 3)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    g = torch.zeros_like(layer.weight)
    g[:, 0] = 1.0  # only output channel 0 has a gradient
    layer.weight.grad = g.clone()
    adaptive_clip_grad_(layer, clipping=0.01)
    out = layer.weight.grad
    # output channel 0: ||W_0|| = sqrt(18), ||G_0|| = sqrt(18) > 0.01 sqrt(18): clipped
    torch.testing.assert_close(out[:, 0].norm(), torch.tensor(0.01 * 18**0.5, dtype=torch.float64))
    assert torch.equal(out[:, 1:], g[:, 1:])


def test_grouped_conv_transpose_units_do_not_mix_groups() -> None:
    layer = nn.ConvTranspose2d(4, 6, 1, groups=2, bias=False).double()  # weight (4, 3, 1, 1)
    w = layer.weight.detach().numpy().copy()
    g = np.random.default_rng(0).normal(size=w.shape)
    layer.weight.grad = torch.tensor(g)
    adaptive_clip_grad_(layer, clipping=0.05)
    # logical (out, in/g) per group k: output channel k*3 + j is w[k*2:(k+1)*2, j]
    for k in range(2):
        rows = slice(2 * k, 2 * (k + 1))
        want = ref.agc_clip(
            g[rows].transpose(1, 0, 2, 3), w[rows].transpose(1, 0, 2, 3), 0, clipping=0.05
        )
        np.testing.assert_allclose(
            layer.weight.grad.numpy()[rows], want.transpose(1, 0, 2, 3), rtol=1e-12
        )


def test_zero_initialised_weight_moves_by_the_eps_floor() -> None:
    layer = nn.Linear(3, 2, bias=False).double()
    nn.init.zeros_(layer.weight)
    layer.weight.grad = torch.ones(2, 3, dtype=torch.float64)
    adaptive_clip_grad_(layer, clipping=0.01, eps=1e-3)
    torch.testing.assert_close(
        layer.weight.grad.norm(dim=1), torch.full((2,), 1e-5, dtype=torch.float64)
    )


def test_float16_gradients_keep_unclipped_units_bit_for_bit() -> None:
    layer = nn.Linear(4, 3).half()
    with torch.no_grad():
        layer.weight.fill_(1.0)
    g = torch.tensor([[1e-3] * 4, [10.0] * 4, [1e-4] * 4], dtype=torch.float16)
    layer.weight.grad = g.clone()
    layer.bias.grad = torch.zeros(3, dtype=torch.float16)
    adaptive_clip_grad_(layer)
    out = layer.weight.grad
    assert torch.equal(out[0], g[0]) and torch.equal(out[2], g[2])
    assert abs(out[1].float().norm().item() - 0.02) < 1e-4


def test_nonfinite_gradients_are_left_for_the_scaler() -> None:
    layer = nn.Linear(2, 2, bias=False)
    g = torch.tensor([[float("inf"), 1.0], [100.0, 0.0]])
    layer.weight.grad = g.clone()
    adaptive_clip_grad_(layer)
    assert torch.isinf(layer.weight.grad[0, 0]) and layer.weight.grad[0, 1] == 1.0
    assert layer.weight.grad[1, 0] < 1.0


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.ReLU(),
        nn.ConvTranspose2d(4, 2, 2),
        nn.Flatten(),
        nn.Linear(2 * 9 * 9, 3),
    ).double()


def test_exclusion_by_module_name_and_parameter() -> None:
    for exclude in ("4", "4.weight", None):
        net = _net()
        grads = _set_grads(net, seed=3, scale=1.0)
        if exclude is None:
            adaptive_clip_grad_(net, exclude=final_classifier(net))
        else:
            adaptive_clip_grad_(net, exclude=exclude)
        np.testing.assert_array_equal(net[4].weight.grad.numpy(), grads["4.weight"])
        assert not np.array_equal(net[0].weight.grad.numpy(), grads["0.weight"])
    with pytest.raises(
        ValueError, match=r"exclude names no parameter or layer of the model: \['head'\]"
    ):
        adaptive_clip_grad_(_net(), exclude="head")


def test_unknown_layer_needs_an_explicit_axis() -> None:
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Parameter(torch.ones(3, 4))

    model = Scale()
    model.table.grad = torch.ones(3, 4)
    with pytest.raises(ValueError, match="output-unit axis of parameter 'table'"):
        adaptive_clip_grad_(model)
    adaptive_clip_grad_(model, unit_axes={"table": 1})
    torch.testing.assert_close(model.table.grad.norm(dim=0), torch.full((4,), 0.01 * 3**0.5))
    with pytest.raises(
        ValueError, match=r"unit_axes names no parameter or layer of the model: \['tabel'\]"
    ):
        adaptive_clip_grad_(model, unit_axes={"table": 1, "tabel": 1})
    adaptive_clip_grad_(model, exclude="table")  # an excluded parameter needs no axis


def test_bare_parameters_of_rank_2_need_unit_axes() -> None:
    w = nn.Parameter(torch.ones(2, 3))
    w.grad = torch.ones(2, 3)
    with pytest.raises(
        ValueError,
        match=r"output-unit axis of parameter 'parameters\[0\]' \(shape \(2, 3\)\), which no",
    ):
        adaptive_clip_grad_([w])
    adaptive_clip_grad_([w], unit_axes=0)
    torch.testing.assert_close(w.grad.norm(dim=1), torch.full((2,), 0.01 * 3**0.5))


def test_bad_settings_are_named() -> None:
    net = _net()
    with pytest.raises(ValueError, match="clipping must be a finite number > 0, got 0"):
        adaptive_clip_grad_(net, clipping=0)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0, got -1"):
        AGC(torch.optim.SGD(net.parameters(), lr=0.1), net, eps=-1)


def test_optimizer_wrapper_step_equals_reference_step() -> None:
    net = _net()
    opt = AGC(
        torch.optim.SGD(net.parameters(), lr=0.5), net, clipping=0.01, exclude=final_classifier(net)
    )
    x = torch.randn(2, 1, 10, 10, dtype=torch.float64)
    weights = {n: p.detach().numpy().copy() for n, p in net.named_parameters()}
    net(x).pow(2).sum().backward()
    grads = {n: p.grad.numpy().copy() for n, p in net.named_parameters()}
    opt.step()
    axes = {"0.weight": 0, "2.weight": 1}
    clipped = ref.agc_clip_all(grads, weights, axes, exclude=["4.weight", "4.bias"])
    for name, p in net.named_parameters():
        np.testing.assert_allclose(
            p.detach().numpy(), weights[name] - 0.5 * clipped[name], rtol=1e-12, atol=1e-15
        )


def test_optimizer_wrapper_works_with_lr_scheduler_and_state_dict() -> None:
    # The AGC-wrapped SGD against a plain SGD fed the reference's clipped gradients.
    net, twin = _net(), _net()
    opt = AGC(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), net, clipping=0.01)
    plain = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in (opt, plain)]
    axes = {"0.weight": 0, "2.weight": 1, "4.weight": 0}
    gen = torch.Generator().manual_seed(4)

    def step_both(agc_net: nn.Module, agc_opt: AGC) -> None:
        x = torch.randn(2, 1, 10, 10, dtype=torch.float64, generator=gen)
        agc_opt.zero_grad()
        plain.zero_grad()
        agc_net(x).pow(2).sum().backward()
        twin(x).pow(2).sum().backward()
        weights = {n: p.detach().numpy().copy() for n, p in twin.named_parameters()}
        grads = {n: p.grad.numpy().copy() for n, p in twin.named_parameters()}
        clipped = ref.agc_clip_all(grads, weights, axes, clipping=0.01)
        for n, p in twin.named_parameters():
            p.grad = torch.from_numpy(clipped[n])
        agc_opt.step()
        plain.step()

    for _ in range(2):
        step_both(net, opt)
        for sched in scheds:
            sched.step()
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(0.025)
    # A fresh wrapped optimizer (other lr) restored from the state dict continues the run.
    fresh = _net()
    fresh.load_state_dict(net.state_dict())
    restored = AGC(torch.optim.SGD(fresh.parameters(), lr=1.0, momentum=0.9), fresh, clipping=0.01)
    restored.load_state_dict(opt.state_dict())
    assert restored.param_groups[0]["lr"] == pytest.approx(0.025)
    for mine, theirs in zip(fresh.parameters(), twin.parameters(), strict=True):
        np.testing.assert_allclose(
            restored.state[mine]["momentum_buffer"].numpy(),
            plain.state[theirs]["momentum_buffer"].numpy(),
            rtol=1e-12,
            atol=1e-15,
        )
    step_both(fresh, restored)
    for (name, mine), theirs in zip(fresh.named_parameters(), twin.parameters(), strict=True):
        np.testing.assert_allclose(
            mine.detach().numpy(), theirs.detach().numpy(), rtol=1e-12, atol=1e-15, err_msg=name
        )


@pytest.mark.parametrize(
    ("unit_axes", "message"),
    [
        ({"0.weight": (0, -4)}, r"unit_axes must name distinct axes, got \(0, -4\)"),
        ({"2.weight": 4}, r"unit_axes must be an integer in \[-4, 4\) .*parameter '2.weight'"),
        (7, r"unit_axes must be an integer in \[-4, 4\) .*parameter '0.weight'"),
        ((0, 1), "unit_axes must be an int .* a mapping"),
    ],
)
def test_bad_unit_axes_are_refused_before_any_gradient_changes(
    unit_axes: object, message: str
) -> None:
    net = _net()
    grads = _set_grads(net, seed=6, scale=1.0)  # large: every weight would be clipped
    with pytest.raises(ValueError, match=message):
        adaptive_clip_grad_(net, unit_axes=unit_axes)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        AGC(torch.optim.SGD(net.parameters(), lr=0.1), net, unit_axes=unit_axes)  # type: ignore[arg-type]
    for name, p in net.named_parameters():
        np.testing.assert_array_equal(p.grad.numpy(), grads[name], err_msg=name)


def test_bad_unit_axes_of_bare_parameters_change_no_gradient() -> None:
    # The first tensor's axis is fine; the second's duplicate is still found before any clip.
    a, b = nn.Parameter(torch.ones(2, 3)), nn.Parameter(torch.ones(3, 2))
    a.grad, b.grad = torch.full((2, 3), 5.0), torch.full((3, 2), 5.0)
    with pytest.raises(ValueError, match=r"unit_axes must name distinct axes.*'parameters\[1\]'"):
        adaptive_clip_grad_([a, b], unit_axes={a: 0, b: (0, -2)})
    assert torch.equal(a.grad, torch.full((2, 3), 5.0))
    assert torch.equal(b.grad, torch.full((3, 2), 5.0))
    # Reference check of the same rule (SPEC.md section 5): a duplicate is an error there too.
    with pytest.raises(ValueError, match="unit_axes must name distinct axes"):
        ref.agc_clip(np.ones((3, 2)), np.ones((3, 2)), (0, -2))


def test_grad_scaler_unscales_before_clipping_and_skips_inf_steps() -> None:
    net = nn.Linear(3, 2).double()
    with torch.no_grad():
        net.weight.fill_(1.0)
    opt = AGC(torch.optim.SGD(net.parameters(), lr=1.0), net, clipping=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x = torch.ones(1, 3, dtype=torch.float64)
    w0 = net.weight.detach().clone()
    scaler.scale(net(x).sum()).backward()  # true gradient rows: [1, 1, 1], norm sqrt(3)
    scaler.step(opt)
    scaler.update()
    # Clipped on the unscaled gradient: each row moves by exactly 0.01 * ||W_i|| = 0.01 sqrt(3).
    torch.testing.assert_close(
        (w0 - net.weight.detach()).norm(dim=1), torch.full((2,), 0.01 * 3**0.5, dtype=torch.float64)
    )
    opt.zero_grad()
    w1 = net.weight.detach().clone()
    scaler.scale(net(torch.full((1, 3), float("inf"), dtype=torch.float64)).sum()).backward()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(net.weight.detach(), w1)  # the scaler saw the inf and skipped the step
    assert scaler.get_scale() < 1024.0


def test_no_host_synchronisation_per_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    net = _net()
    _set_grads(net, seed=5)

    def refuse(*_: object) -> None:
        raise AssertionError("host synchronisation")

    for method in ("item", "__bool__", "tolist", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, method, refuse)
    adaptive_clip_grad_(net, exclude=final_classifier(net))


def test_add_param_group_checks_ownership_as_the_constructor_does() -> None:
    net = _net()
    body = [p for n, p in net.named_parameters() if not n.startswith("4.")]
    opt = AGC(torch.optim.SGD(body, lr=0.1), net, exclude="4.bias")
    stray = nn.Parameter(torch.ones(3, 5, dtype=torch.float64))
    with pytest.raises(
        ValueError,
        match=r"output-unit axis of parameter 'param_groups\[1\]\[0\]' \(shape \(3, 5\)\), "
        "which no layer of the model owns",
    ):
        opt.add_param_group({"params": [stray]})
    assert len(opt.param_groups) == len(opt.optimizer.param_groups) == 1  # nothing added
    # The classifier's weight is owned by a Linear: added, it is clipped per output row.
    opt.add_param_group({"params": [net[4].weight, net[4].bias], "lr": 0.0})
    assert len(opt.optimizer.param_groups) == 2 and opt.param_groups is opt.optimizer.param_groups
    grads = _set_grads(net, seed=11, scale=1.0)
    opt.clip()
    w = net[4].weight.detach().numpy()
    expected = ref.agc_clip(grads["4.weight"], w, 0, clipping=0.01, eps=1e-3)
    np.testing.assert_allclose(net[4].weight.grad.numpy(), expected, rtol=1e-12)
    np.testing.assert_array_equal(net[4].bias.grad.numpy(), grads["4.bias"])  # excluded


def test_unowned_optimizer_parameter_of_rank_1_is_one_unit() -> None:
    net = nn.Linear(3, 2).double()
    gain = nn.Parameter(torch.ones(4, dtype=torch.float64))
    opt = AGC(torch.optim.SGD([*net.parameters(), gain], lr=0.1), net)
    gain.grad = torch.full((4,), 3.0, dtype=torch.float64)
    opt.clip()
    expected = ref.agc_clip(np.full(4, 3.0), np.ones(4), None, clipping=0.01, eps=1e-3)
    np.testing.assert_allclose(gain.grad.numpy(), expected, rtol=1e-12)


def test_every_axis_a_unit_clips_each_entry_alone() -> None:
    m = nn.Linear(3, 2).double()
    gen = torch.Generator().manual_seed(4)
    m.weight.grad = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    m.bias.grad = torch.randn(2, generator=gen, dtype=torch.float64)
    g, w = m.weight.grad.numpy().copy(), m.weight.detach().numpy().copy()
    adaptive_clip_grad_(m, 0.05, unit_axes={"weight": (0, 1)})
    # Each entry its own unit: |G_ij| <= 0.05 * max(|W_ij|, 1e-3), as the reference says.
    want = ref.agc_clip(g, w, (0, 1), clipping=0.05, eps=1e-3)
    np.testing.assert_allclose(m.weight.grad.numpy(), want, rtol=1e-12)
    assert not np.allclose(want, ref.agc_clip(g, w, None, clipping=0.05, eps=1e-3))


def test_a_sparse_gradient_is_refused_before_any_gradient_changes() -> None:
    m = nn.ModuleDict({"fc": nn.Linear(4, 3), "emb": nn.Embedding(10, 4, sparse=True)})
    (m["fc"](m["emb"](torch.tensor([1, 2, 3]))).pow(2).sum() * 1000).backward()
    before = m["fc"].weight.grad.clone()
    with pytest.raises(ValueError, match=r"AGC needs dense gradients.*'emb.weight'"):
        adaptive_clip_grad_(m)
    assert torch.equal(m["fc"].weight.grad, before)
    opt = AGC(torch.optim.SGD(m.parameters(), lr=0.1), m)
    with pytest.raises(ValueError, match="AGC needs dense gradients"):
        opt.step()
    assert torch.equal(m["fc"].weight.grad, before)


def test_an_unowned_tensor_named_when_agc_is_made_can_join_later() -> None:
    net = nn.Linear(3, 2)
    extra = nn.Parameter(torch.ones(2, 2))
    opt = AGC(torch.optim.SGD(net.parameters(), lr=0.1), net, unit_axes={extra: 1})
    opt.add_param_group({"params": [extra]})
    extra.grad = torch.full((2, 2), 5.0)
    opt.clip()
    want = ref.agc_clip(np.full((2, 2), 5.0), np.ones((2, 2)), 1, clipping=0.01, eps=1e-3)
    np.testing.assert_allclose(extra.grad.numpy(), want, rtol=1e-6)
    # Not named when AGC was made: refused, with the way out that works.
    other = nn.Parameter(torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"unit_axes=\{<the tensor itself>: <axis>\}"):
        opt.add_param_group({"params": [other]})


def test_a_parameter_added_to_the_wrapped_optimizer_directly_is_not_skipped() -> None:
    net = nn.Linear(3, 2)
    inner = torch.optim.SGD(net.parameters(), lr=0.1)
    opt = AGC(inner, net)
    stray = nn.Parameter(torch.ones(2, 2))
    inner.add_param_group({"params": [stray]})
    stray.grad = torch.ones(2, 2)
    net.weight.grad = torch.full((2, 3), 9.0)
    with pytest.raises(ValueError, match=r"add parameter groups through AGC\.add_param_group"):
        opt.clip()
    assert torch.equal(net.weight.grad, torch.full((2, 3), 9.0))  # nothing clipped


def test_a_lazy_module_must_run_before_agc_reads_it() -> None:
    net = nn.Sequential(nn.LazyLinear(3))
    with pytest.raises(ValueError, match=r"lazy module.*run the model once"):
        AGC(torch.optim.SGD(net.parameters(), lr=0.1), net)
    net(torch.ones(2, 4))
    AGC(torch.optim.SGD(net.parameters(), lr=0.1), net)  # now it has shapes


def test_exclude_none_and_a_wrong_exclude_type() -> None:
    net = nn.Linear(3, 2)
    net.weight.grad = torch.full((2, 3), 9.0)
    adaptive_clip_grad_(net, exclude=None)  # nothing excluded: clipped
    assert not torch.equal(net.weight.grad, torch.full((2, 3), 9.0))
    with pytest.raises(ValueError, match="exclude takes parameters, layers or their names, got 5"):
        adaptive_clip_grad_(net, exclude=5)  # type: ignore[arg-type]


def test_two_unit_axes_entries_for_one_parameter_must_agree() -> None:
    net = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="unit_axes gives one parameter two different axes"):
        adaptive_clip_grad_(net, unit_axes={"0.weight": 0, "0": 1})
    adaptive_clip_grad_(net, unit_axes={"0.weight": 0, "0": 0})  # the same axis: fine
