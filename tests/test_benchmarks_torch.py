"""The torch benchmark plug-in runs end to end (quick sizes) and measures what it says."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")

from benchmarks import bench_torch  # noqa: E402
from benchmarks.harness import measure  # noqa: E402


def test_quick_benchmarks_run_and_report_ratios() -> None:
    results = [measure(b, repeats=1, warmup=1, min_time=0.0) for b in bench_torch.benchmarks(True)]
    assert {r.name for r in results} == {
        "bn_train",
        "bn_eval",
        "agc",
        "fold_eval",
        "recalibrate",
        "ghost_train",
        "renorm_train",
    }
    assert all(r.ratio > 0 and r.unorm_s > 0 and r.native_s > 0 for r in results)


def test_model_shapes_have_the_published_sizes() -> None:
    resnet = sum(p.numel() for p in bench_torch.resnet50_like().parameters())
    assert resnet == 25_557_032  # torchvision's resnet50: 25,557,032 parameters


def test_timm_style_loop_clips_like_agc_where_rank_rules_agree() -> None:
    layer = torch.nn.Conv2d(3, 4, 3).double()
    layer.weight.grad = torch.randn_like(layer.weight)
    layer.bias.grad = torch.randn_like(layer.bias)
    twin = torch.nn.Conv2d(3, 4, 3).double()
    twin.load_state_dict(layer.state_dict())
    twin.weight.grad, twin.bias.grad = layer.weight.grad.clone(), layer.bias.grad.clone()
    bench_torch.timm_style_agc(layer.parameters(), 0.01, 1e-3)
    from unorm.torch import adaptive_clip_grad_

    adaptive_clip_grad_(twin, 0.01, 1e-3)
    torch.testing.assert_close(layer.weight.grad, twin.weight.grad)
    torch.testing.assert_close(layer.bias.grad, twin.bias.grad)
