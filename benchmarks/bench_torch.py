"""Benchmark plug-in "torch": unorm.torch against PyTorch's own layers and a timm-style AGC.

Run with ``python -m benchmarks.run torch`` in the current environment (on a GPU machine
the inputs live on CUDA and each timed call synchronises).

Benchmarks (full size; ``quick`` uses small inputs):

- ``bn_train``: forward + backward of ``BatchNorm`` vs ``nn.BatchNorm2d`` in training mode
  at (32, 64, 56, 56) and (256, 256, 14, 14) float32, channels-first and channels-last.
  Target ratio 1.05.
- ``bn_eval``: the same in eval mode (forward only). Target ratio 1.05.
- ``bn_train_compiled`` (full size only): the ``bn_train`` call with both layers under
  ``torch.compile`` (``native=compiled``, target 1.05), and unorm's compiled layer against
  the native eager one (``native=eager``, no target: it says whether compiling pays).
- ``fold_eval``: eval-mode forward of a ResNet-like stack of Conv-BatchNorm-ReLU blocks
  folded by :func:`unorm.torch.fold` against the same stack unfolded with
  ``nn.BatchNorm2d`` (the issue's promise: folding must pay; target ratio 1.0).
- ``recalibrate``: :func:`unorm.torch.recalibrate` over N batches of that stack against N
  plain training-mode forward passes without gradients (target ratio 1.1).
- ``port`` (full size only): ``unorm port`` of the zoo's ResNet-50 (``transformers``')
  from a ``state_dict`` file to the neutral checkpoint, against reading the file and
  writing and reading its tensors with safetensors alone plus the probe's one forward
  pass. Target ratio 2.0.
- ``agc``: ``adaptive_clip_grad_`` over the parameter shapes of a ResNet-50 and of an
  NFNet-F0-like network, against a per-tensor loop written the way timm's
  ``adaptive_clip_grad`` is (norm, clamp, divide, where, copy per tensor). Target: at
  least 1.5x faster (ratio <= 0.67). Floor: parameters + 2x gradients (read the weights
  and gradients, write the gradients) at the measured copy bandwidth.

Example:
    >>> sorted({b.name for b in benchmarks(quick=True)})
    ['agc', 'bn_eval', 'bn_train', 'fold_eval', 'recalibrate']
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from unorm.torch import BatchNorm, adaptive_clip_grad_, fold, recalibrate

from .harness import Benchmark

__all__ = ["benchmarks", "gpu", "nfnet_f0_like", "resnet50_like", "timm_style_agc", "versions"]

BACKEND = "torch"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def versions() -> dict[str, str]:
    """The versions of what these benchmarks run on."""
    return {"torch": torch.__version__}


def gpu() -> str | None:
    """The GPU the benchmarks ran on, if any."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def _sync(_: object) -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _train_step(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], object]:
    """One training call of ``layer``: forward, then backward of ``dy`` into ``x``."""

    def run() -> object:
        y = layer(x)
        y.backward(dy)
        return y

    return run


def _train_bytes(x: torch.Tensor) -> int:
    """A training call's minimal traffic. Forward: read x twice (statistics, then
    normalise), write y; backward: read x, dy twice (sums, then dx), write dx."""
    return 8 * x.numel() * x.element_size()


def _bn_pair(shape: tuple[int, ...], channels_last: bool, training: bool) -> list[Benchmark]:
    x = torch.randn(shape, device=DEVICE)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    channels = shape[1]
    ours = BatchNorm(channels, num_dims=4).to(DEVICE).train(training)
    native = nn.BatchNorm2d(channels).to(DEVICE).train(training)
    params = {
        "shape": shape,
        "dtype": "float32",
        "format": "channels_last" if channels_last else "channels_first",
        "device": DEVICE.type,
    }
    if training:
        xg = x.detach().requires_grad_()
        dy = torch.randn_like(x)
        moved = _train_bytes(x)
        return [
            Benchmark(
                "bn_train",
                BACKEND,
                params,
                _train_step(ours, xg, dy),
                _train_step(native, xg, dy),
                _sync,
                moved,
                1.05,
            )
        ]
    with torch.no_grad():
        moved = 2 * x.numel() * x.element_size()
        return [
            Benchmark(
                "bn_eval",
                BACKEND,
                params,
                lambda: ours(x),
                lambda: native(x),
                _sync,
                moved,
                1.05,
            )
        ]


def _training_modes(shape: tuple[int, ...]) -> list[Benchmark]:
    """The BatchNorm training modes (SPEC.md section 2) against plain ``nn.BatchNorm2d`` at
    the same total batch, in the same run: ghost batches of a quarter of the batch (target
    1.3) and Batch Renormalization with clipping (target 1.2), channels-first training."""
    x = torch.randn(shape, device=DEVICE)
    xg = x.detach().requires_grad_()
    dy = torch.randn_like(x)
    channels = shape[1]
    native = nn.BatchNorm2d(channels).to(DEVICE)
    modes = [
        ("ghost_train", BatchNorm(channels, virtual_batch_size=max(2, shape[0] // 4)), 1.3),
        (
            "renorm_train",
            BatchNorm(channels, renorm=True, renorm_clipping={"rmax": 3.0, "dmax": 5.0}),
            1.2,
        ),
    ]
    params = {"shape": shape, "dtype": "float32", "format": "channels_first"}
    params["device"] = DEVICE.type
    return [
        Benchmark(
            name,
            BACKEND,
            params,
            _train_step(layer.to(DEVICE), xg, dy),
            _train_step(native, xg, dy),
            _sync,
            _train_bytes(x),
            target,
        )
        for name, layer, target in modes
    ]


def _bn_compiled(shape: tuple[int, ...], channels_last: bool) -> list[Benchmark]:
    """The training call under ``torch.compile`` (inductor): unorm's layer compiled against
    ``nn.BatchNorm2d`` compiled (target 1.05) and against ``nn.BatchNorm2d`` eager (no
    target: below 1, compiling unorm's layer beats the native eager one). Each side
    compiles in the harness's warm-up calls, outside the timed samples."""
    x = torch.randn(shape, device=DEVICE)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    xg, dy = x.detach().requires_grad_(), torch.randn_like(x)
    channels = shape[1]
    ours = torch.compile(BatchNorm(channels, num_dims=4).to(DEVICE))
    native_compiled = torch.compile(nn.BatchNorm2d(channels).to(DEVICE))
    native_eager = nn.BatchNorm2d(channels).to(DEVICE)
    layout = "channels_last" if channels_last else "channels_first"
    base = {"shape": shape, "dtype": "float32", "format": layout, "device": DEVICE.type}
    unorm_step, moved = _train_step(ours, xg, dy), _train_bytes(x)
    against = (("compiled", native_compiled, 1.05), ("eager", native_eager, None))
    return [
        Benchmark(
            "bn_train_compiled",
            BACKEND,
            {**base, "native": how},
            unorm_step,
            _train_step(layer, xg, dy),
            _sync,
            moved,
            target,
        )
        for how, layer, target in against
    ]


def _bottleneck_stage(blocks: int, inp: int, mid: int, out: int) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for i in range(blocks):
        cin = inp if i == 0 else out
        layers += [nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)]
        layers += [nn.Conv2d(mid, mid, 3, bias=False), nn.BatchNorm2d(mid)]
        layers += [nn.Conv2d(mid, out, 1, bias=False), nn.BatchNorm2d(out)]
        if i == 0:
            layers += [nn.Conv2d(cin, out, 1, bias=False), nn.BatchNorm2d(out)]
    return layers


def resnet50_like() -> nn.ModuleList:
    """The parameters of a ResNet-50 (25.6 M): the same layers and shapes, no forward."""
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, bias=False), nn.BatchNorm2d(64)]
    inp = 64
    for blocks, mid in zip((3, 4, 6, 3), (64, 128, 256, 512), strict=True):
        layers += _bottleneck_stage(blocks, inp, mid, mid * 4)
        inp = mid * 4
    layers.append(nn.Linear(2048, 1000))
    return nn.ModuleList(layers)


def nfnet_f0_like() -> nn.ModuleList:
    """Parameters shaped like an NFNet-F0 (depths 1-2-6-3, widths 256-512-1536-1536, group
    width 128, bottleneck ratio 0.5, squeeze-excite, a 3072-wide final conv, 1000
    classes; 60.5 M parameters), with one scalar skip gain per block. No forward."""
    layers: list[nn.Module] = []
    for cin, cout in ((3, 16), (16, 32), (32, 64), (64, 128)):
        layers.append(nn.Conv2d(cin, cout, 3))
    inp = 128
    for depth, out in zip((1, 2, 6, 3), (256, 512, 1536, 1536), strict=True):
        mid = out // 2
        for i in range(depth):
            cin = inp if i == 0 else out
            if i == 0:
                layers.append(nn.Conv2d(cin, out, 1))
            layers += [nn.Conv2d(cin, mid, 1), nn.Conv2d(mid, mid, 3, groups=mid // 128)]
            layers += [nn.Conv2d(mid, mid, 3, groups=mid // 128), nn.Conv2d(mid, out, 1)]
            layers += [nn.Conv2d(out, out // 4, 1), nn.Conv2d(out // 4, out, 1)]  # SE
            gain = nn.Module()
            gain.register_parameter("skip_gain", nn.Parameter(torch.zeros(())))
            layers.append(gain)
        inp = out
    layers += [nn.Conv2d(1536, 3072, 1), nn.Linear(3072, 1000)]
    return nn.ModuleList(layers)


def _unitwise_norm(t: torch.Tensor) -> torch.Tensor:
    if t.dim() <= 1:
        return t.norm(2.0, dim=None, keepdim=True)
    return t.norm(2.0, dim=tuple(range(1, t.dim())), keepdim=True)


def timm_style_agc(parameters: Iterable[torch.Tensor], clipping: float, eps: float) -> None:
    """AGC as timm's per-tensor loop does it: rank-based unit rule, ~10 kernels per tensor."""
    for p in parameters:
        if p.grad is None:
            continue
        max_norm = _unitwise_norm(p.detach()).clamp_(min=eps).mul_(clipping)
        grad_norm = _unitwise_norm(p.grad.detach())
        clipped = p.grad.detach() * (max_norm / grad_norm.clamp(min=1e-6))
        p.grad.detach().copy_(torch.where(grad_norm < max_norm, p.grad.detach(), clipped))


def _agc(name: str, model: nn.Module) -> Benchmark:
    model = model.to(DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, device=DEVICE) * 1e-3

    # Both sides run the same kernels whatever the values, so clipping the same (already
    # clipped) gradients again and again times the full work without restoring them.
    def ours() -> None:
        adaptive_clip_grad_(model, 0.01, 1e-3)

    def theirs() -> None:
        timm_style_agc(params, 0.01, 1e-3)

    count = sum(p.numel() for p in params)
    moved = 3 * count * 4
    info = {"model": name, "tensors": len(params), "parameters": count, "device": DEVICE.type}
    return Benchmark("agc", BACKEND, info, ours, theirs, _sync, moved, 1 / 1.5)


def conv_bn_stack(blocks: int, channels: int) -> nn.Sequential:
    """``blocks`` Conv(3x3, no bias)-BatchNorm-ReLU blocks of ``channels`` channels after a
    3-channel stem, as in a ResNet stage without its shortcuts (which fold does not fold)."""
    layers: list[nn.Module] = [nn.Conv2d(3, channels, 3, padding=1, bias=False)]
    layers += [nn.BatchNorm2d(channels), nn.ReLU()]
    for _ in range(blocks):
        layers += [nn.Conv2d(channels, channels, 3, padding=1, bias=False)]
        layers += [nn.BatchNorm2d(channels), nn.ReLU()]
    return nn.Sequential(*layers)


def _after_training(shape: tuple[int, ...], blocks: int, channels: int) -> list[Benchmark]:
    torch.manual_seed(0)
    net = conv_bn_stack(blocks, channels).to(DEVICE)
    x = torch.randn(shape, device=DEVICE)
    with torch.no_grad():
        net.train()
        net(x)  # running statistics away from their initial values
    net.eval()
    folded = fold(net)
    info = {"shape": shape, "blocks": blocks, "channels": channels, "device": DEVICE.type}
    batches = [torch.randn(shape, device=DEVICE) for _ in range(4)]

    def eval_folded() -> object:
        with torch.no_grad():
            return folded(x)

    def eval_native() -> object:
        with torch.no_grad():
            return net(x)

    def recalibrated() -> object:
        return recalibrate(net, batches)

    def forwards() -> object:
        net.train()
        with torch.no_grad():
            out = [net(b) for b in batches]
        net.eval()
        return out[-1]

    return [
        Benchmark("fold_eval", BACKEND, info, eval_folded, eval_native, _sync, None, 1.0),
        Benchmark(
            "recalibrate", BACKEND, {**info, "batches": len(batches)}, recalibrated, forwards,
            _sync, None, 1.1,
        ),
    ]  # fmt: skip


def _port(model: str) -> Benchmark:
    """``unorm port`` of a ``state_dict`` file to the neutral checkpoint (build the zoo
    network, read the file, export with the flow and probe, write atomically) against
    reading the same file and writing and reading its tensors with safetensors alone,
    plus the one eval forward pass the probe needs on its two samples. Target 2.0."""
    import tempfile

    from safetensors.torch import load_file, save_file

    from unorm.models import zoo
    from unorm.port_files import port_file

    folder = tempfile.mkdtemp(prefix="unorm-bench-port-")
    src, dst, plain = (f"{folder}/{n}" for n in ("m.pt", "m.safetensors", "plain.safetensors"))
    net = zoo.build(model, "torch").eval()
    torch.save(net.state_dict(), src)
    probe = torch.randn(2, *zoo.ZOO[model].input_shape())

    def unorm() -> object:
        return port_file(src, dst, model=model)

    def native() -> object:
        state = torch.load(src, map_location="cpu", weights_only=True)
        save_file({k: v.contiguous() for k, v in state.items()}, plain)
        with torch.no_grad():
            net(probe)
        return load_file(plain)

    size = sum(v.numel() * v.element_size() for v in net.state_dict().values())
    return Benchmark(
        "port",
        BACKEND,
        {"model": model, "bytes": size},
        unorm=unorm,
        native=native,
        target_ratio=2.0,
    )


def benchmarks(quick: bool) -> list[Benchmark]:
    """The torch benchmarks; small inputs when ``quick``."""
    shapes = [(4, 8, 8, 8)] if quick else [(32, 64, 56, 56), (256, 256, 14, 14)]
    out: list[Benchmark] = []
    for training in (True, False):
        for shape in shapes:
            for channels_last in (False, True):
                out += _bn_pair(shape, channels_last, training)
    for shape in shapes:
        out += _training_modes(shape)
    if not quick:  # compiling takes seconds per layer: not in the quick smoke test
        for shape in shapes:
            for channels_last in (False, True):
                out += _bn_compiled(shape, channels_last)
    if quick:
        out += _after_training((2, 3, 8, 8), 1, 4)
    else:
        out += _after_training((16, 3, 56, 56), 4, 64)
    if quick:
        small = nn.ModuleList([nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(8, 4)])
        out.append(_agc("small", small))
    else:
        out += [_agc("resnet50", resnet50_like()), _agc("nfnet_f0", nfnet_f0_like())]
    if not quick:  # builds and ports a ResNet-50 for seconds a call: not a smoke test
        out.append(_port("resnet50"))
    return out
