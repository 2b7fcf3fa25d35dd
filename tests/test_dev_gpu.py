"""``./dev gpu``: it refuses loudly where no GPU is visible, and the device checks it runs.

The refusal tests run everywhere (standard library only, nothing built). The device checks
are the CPU code of the other tests with ``device="cuda"``, each against the NumPy
reference; ``./dev gpu`` runs them with ``-m torch`` and ``UNORM_REQUIRE_GPU=1``, so a
missing device fails there instead of skipping. Without CUDA they skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from unorm import reference as ref
from unorm.spec import BatchNormSpec

ROOT = Path(__file__).resolve().parents[1]
DEVTOOL = ROOT / "tools" / "devenv.py"


def _run_gpu_job(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(DEVTOOL), "gpu"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_dev_gpu_fails_loudly_when_cuda_visible_devices_hides_every_gpu() -> None:
    # Holds on a GPU machine too: an empty CUDA_VISIBLE_DEVICES hides every device.
    start = time.monotonic()
    done = _run_gpu_job({**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 3, done.stdout + done.stderr
    assert "FAILED: no GPU is visible" in done.stderr
    assert "CUDA_VISIBLE_DEVICES" in done.stderr
    assert time.monotonic() - start < 30  # refused before any environment or import


def test_dev_gpu_fails_loudly_when_nvidia_smi_lists_no_gpu(tmp_path: Path) -> None:
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed: no devices were found' >&2\nexit 6\n")
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env["PATH"] = f"{tmp_path}{os.pathsep}{env.get('PATH', '')}"
    done = _run_gpu_job(env)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "FAILED: no GPU is visible: nvidia-smi -L listed no GPU" in done.stderr
    assert "no devices were found" in done.stderr


# -- the device checks (torch) ------------------------------------------------------------


def _torch() -> Any:
    return pytest.importorskip("torch")


def _device(name: str) -> Any:
    """``torch.device(name)``; without CUDA a cuda check skips, or fails under ``./dev gpu``."""
    torch = _torch()
    if name == "cuda" and not torch.cuda.is_available():
        if os.environ.get("UNORM_REQUIRE_GPU"):
            pytest.fail("UNORM_REQUIRE_GPU is set but torch sees no CUDA device")
        pytest.skip("no CUDA device")
    return torch.device(name)


#: Per-dtype tolerance of a BatchNorm output or input gradient of order 1, against the
#: reference on the rounded input: a few units in the last place of the output's dtype.
_BN_TOL = {"float32": 2e-5, "float16": 4e-3, "bfloat16": 3e-2}


@pytest.mark.torch
@pytest.mark.parametrize("dtype", sorted(_BN_TOL))
@pytest.mark.parametrize("device_name", ["cpu", "cuda"])
def test_channels_last_training_step_matches_the_reference(device_name: str, dtype: str) -> None:
    torch = _torch()
    device = _device(device_name)
    from unorm.torch import BatchNorm

    rng = np.random.default_rng(7)
    layer = BatchNorm(4, num_dims=4).to(device)
    gamma, beta = np.array([0.5, 1.0, 2.0, -1.0]), np.array([0.0, -1.0, 1.0, 0.5])
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(gamma))
        layer.bias.copy_(torch.tensor(beta))
    x = torch.tensor(rng.normal(3.0, 2.0, (8, 4, 5, 5)), dtype=getattr(torch, dtype))
    x = x.to(device, memory_format=torch.channels_last).requires_grad_()
    dy = torch.tensor(rng.normal(size=(8, 4, 5, 5)), dtype=x.dtype, device=device)
    y = layer(x)
    y.backward(dy)
    assert y.dtype == x.dtype and y.is_contiguous(memory_format=torch.channels_last)
    # The reference sees exactly the values the layer saw: the rounded input and dy.
    x64, dy64 = (t.detach().double().cpu().numpy() for t in (x, dy))
    state = ref.init_running_stats(4)
    want, state = ref.batch_norm_step(x64, state, BatchNormSpec(), gamma, beta, training=True)
    grads = ref.batch_norm_backward(dy64, x64, gamma)
    tol = _BN_TOL[dtype]
    for got, expected in ((y, want), (x.grad, grads.dx)):
        assert got is not None
        values = got.detach().double().cpu().numpy()
        np.testing.assert_allclose(values, expected, rtol=tol, atol=tol)
    stats = [(layer.running_mean, state.mean), (layer.running_var, state.var)]
    stats += [(layer.weight.grad, grads.dgamma), (layer.bias.grad, grads.dbeta)]
    for got, expected in stats:
        assert got is not None and got.dtype == torch.float32  # float32 state for 16-bit input
        scale = max(1.0, float(np.abs(expected).max()))
        np.testing.assert_allclose(got.detach().double().cpu().numpy(), expected, atol=tol * scale)


@pytest.mark.torch
@pytest.mark.parametrize("device_name", ["cpu", "cuda"])
def test_agc_optimizer_on_device_tensors_clips_like_the_reference(device_name: str) -> None:
    torch = _torch()
    device = _device(device_name)
    from unorm.torch import AGC

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.ConvTranspose2d(8, 4, 3), torch.nn.Linear(5, 6)
    ).to(device)
    grads = {}
    for name, p in model.named_parameters():
        p.grad = torch.randn(p.shape, device=device) * 10.0 ** float(torch.randint(-4, 1, ()))
        grads[name] = (p.detach().double().cpu().numpy(), p.grad.double().cpu().numpy())
    optimizer = AGC(torch.optim.SGD(model.parameters(), lr=1.0), model, clipping=0.01)
    optimizer.step()
    # Output units: Conv2d's axis 0, ConvTranspose2d's axis 1, Linear's axis 0; a bias is
    # one unit (rank <= 1, SPEC.md section 5).
    axes = {"0.weight": 0, "1.weight": 1, "2.weight": 0}
    for name, p in model.named_parameters():
        w, g = grads[name]
        clipped = ref.agc_clip(g, w, unit_axes=axes.get(name), clipping=0.01)
        np.testing.assert_allclose(p.detach().double().cpu().numpy(), w - clipped, atol=1e-6)


@pytest.mark.torch
def test_conformance_column_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """The torch column's cases with its modules built on the device (``with
    torch.device("cuda")``) and every input moved there; cross-replica cases are left to
    the NCCL check below (their workers are separate processes)."""
    torch = _torch()
    device = _device("cuda")
    from unorm.conformance.adapter import load_adapter_module
    from unorm.conformance.cases import all_cases
    from unorm.conformance.worker import run_cases

    module = load_adapter_module("torch")
    on_host = module.to_tensor
    monkeypatch.setattr(module, "to_tensor", lambda a, dtype=None: on_host(a, dtype).to(device))
    # The reference's float32 tolerances are for IEEE float32, not TF32 convolutions.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    names = [c.name for c in all_cases() if c.kind != "sync"]
    with torch.device(device):
        results = run_cases(module.create(), names)
    assert {r.dtype for r in results} >= {"float32", "float16", "bfloat16"}
    bad = [f"{r.case} [{r.dtype}]: {r.status}: {r.detail}" for r in results if r.status in (
        "fail", "error", "unavailable")]  # fmt: skip
    assert not bad, "\n".join(bad)


@pytest.mark.torch
def test_sync_batchnorm_under_ddp_on_one_gpu_with_nccl(tmp_path: Path) -> None:
    """One NCCL process on the GPU, its cross-replica path forced (one rank is otherwise a
    plain BatchNorm), eager and compiled: the DDP check of test_torch_sync on the device."""
    torch = _torch()
    _device("cuda")
    import torch.distributed as dist

    if not dist.is_nccl_available():
        pytest.skip("this torch build has no NCCL")
    del torch
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        from test_torch_sync import check_ddp_against_reference, run_ddp_worker
    finally:
        sys.path.pop(0)
    modes = ["eager", "compiled", "compiled-module"]
    ranks = run_ddp_worker(tmp_path, [9], modes, ("cuda", "nccl"))
    for mode in modes:
        check_ddp_against_reference(ranks, [9], mode)


def test_dev_gpu_runs_each_backends_checks_then_its_benchmarks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The job's plan on a (pretended) GPU machine: nothing runs, the steps are recorded.
    sys.path.insert(0, str(DEVTOOL.parent))
    try:
        import devenv
    finally:
        sys.path.pop(0)
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    steps: list[list[str]] = []

    def step(label: str, cmd: list[Any], env: dict[str, str], deadline: float) -> int:
        steps.append([str(c) for c in cmd])
        assert env["UNORM_REQUIRE_GPU"] == "1" and env["UNORM_RUNS"] == "torch"
        if "benchmarks.run" in steps[-1]:
            out = Path(steps[-1][steps[-1].index("--out") + 1])
            (out / "torch.json").write_text('{"results": []}')
        return 0

    monkeypatch.setattr(devenv, "ROOT", tmp_path)
    monkeypatch.setattr(devenv, "visible_gpus", lambda: (["GPU 0: Pretend"], ""))
    monkeypatch.setattr(devenv, "_probe", lambda *args: (0, ""))
    monkeypatch.setattr(devenv, "gpu_backends", lambda python, env: [("torch", "Pretend")])
    monkeypatch.setattr(devenv, "_gpu_step", step)
    assert devenv.gpu_job(["-x"]) == 0
    assert [s[1:3] for s in steps] == [["-m", "pytest"], ["-m", "benchmarks.run"]]
    assert steps[0][-4:] == [str(tmp_path / "tests" / "test_dev_gpu.py"), "-m", "torch", "-x"]
    written = tmp_path / "benchmarks" / "results" / "torch-cuda.json"
    assert written.read_text() == '{"results": []}'
