"""The normalizer-free experiment: LeNet with BatchNorm, without normalisation, and NF+AGC.

``python -m benchmarks.nf_experiment [--quick]`` (current environment, PyTorch): trains
each variant on the bundled digits over a sweep of learning rates and two batch sizes,
several seeds each, and records the final test accuracy and the time per training step.
Writes ``benchmarks/results/nf-experiment.json``, prints a Markdown table and draws
``docs/nf-experiment.png`` (accuracy against learning rate, one line per variant, the band
spanning the seeds). A few minutes on 2 cores; ``--quick`` is a smoke test.

Variants (``unorm.models.torch``):

- ``BatchNorm``: :func:`lenet_bn` (canonical BatchNorm), plain SGD.
- ``no normalisation``: :func:`lenet`, the same without its BatchNorm layers, plain SGD.
- ``NF + AGC``: :func:`lenet_nf` (Scaled WS convolutions, variance-preserving sigmoids)
  with AGC, the final classifier excluded; clipping 0.1 at batch 32 and 0.05 at batch 256
  (small batches want a larger factor than the paper's 0.01 at 4096).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unorm.models import digits
from unorm.models.torch import lenet, lenet_bn, lenet_nf, predict, train
from unorm.models.training import Recipe, accuracy
from unorm.progress import ProgressBar

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "BatchNorm": (lenet_bn, False),
    "no normalisation": (lenet, False),
    "NF + AGC": (lenet_nf, True),
}
CLIPPING = {32: 0.1, 256: 0.05}


def run_one(
    variant: str, lr: float, batch_size: int, seed: int, steps: int, data: Any
) -> dict[str, Any]:
    """Train one network; its final test accuracy and median seconds per step."""
    factory, agc = VARIANTS[variant]
    torch.manual_seed(seed)
    net = factory()
    recipe = Recipe(
        steps=steps, batch_size=batch_size, lr=lr, agc=agc, clipping=CLIPPING[batch_size], seed=seed
    )
    start = time.perf_counter()
    losses = train(net, data.train_x, data.train_y, recipe)
    seconds = (time.perf_counter() - start) / steps
    acc = accuracy(predict(net, data.test_x), data.test_y)
    return {
        "variant": variant, "lr": lr, "batch_size": batch_size, "seed": seed,
        "accuracy": acc, "final_loss": losses[-1], "seconds_per_step": seconds,
    }  # fmt: skip


def table(results: list[dict[str, Any]]) -> str:
    """Markdown: per variant and batch size, the best learning rate's mean accuracy."""
    header = (
        "| variant | batch | best lr | test accuracy (mean ± sd, seeds) | worst lr | ms / step |"
    )
    lines = [header, "|---|--:|--:|--:|--:|--:|"]
    for variant in VARIANTS:
        for batch in sorted({r["batch_size"] for r in results}):
            rows = [r for r in results if r["variant"] == variant and r["batch_size"] == batch]
            by_lr: dict[float, list[dict[str, Any]]] = {}
            for r in rows:
                by_lr.setdefault(r["lr"], []).append(r)
            means = {lr: statistics.mean(r["accuracy"] for r in rs) for lr, rs in by_lr.items()}
            best = max(means, key=lambda lr: means[lr])
            worst = min(means, key=lambda lr: means[lr])
            accs = [r["accuracy"] for r in by_lr[best]]
            spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
            ms = 1e3 * statistics.median(r["seconds_per_step"] for r in rows)
            lines.append(
                f"| {variant} | {batch} | {best:g} | {means[best]:.3f} ± {spread:.3f} | "
                f"{means[worst]:.3f} (lr {worst:g}) | {ms:.1f} |"
            )
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], image: Path) -> None:
    """Accuracy against learning rate, one line per variant, a panel per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch_size"] for r in results})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), sharey=True)
    for ax, batch in zip(np.atleast_1d(axes), batches, strict=True):
        for variant in VARIANTS:
            rows = [r for r in results if r["variant"] == variant and r["batch_size"] == batch]
            lrs = sorted({r["lr"] for r in rows})
            accs = [[r["accuracy"] for r in rows if r["lr"] == lr] for lr in lrs]
            ax.plot(lrs, [statistics.mean(a) for a in accs], marker="o", label=variant)
            ax.fill_between(lrs, [min(a) for a in accs], [max(a) for a in accs], alpha=0.2)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate (SGD)")
        ax.set_title(f"batch size {batch}")
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("test accuracy (digits)")
    np.atleast_1d(axes)[0].legend()
    fig.suptitle("LeNet on digits: BatchNorm vs no normalisation vs NF + AGC (band: seeds)")
    fig.tight_layout()
    image.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(image, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.nf_experiment")
    parser.add_argument("--quick", action="store_true", help="a tiny sweep (smoke test)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--image", type=Path, default=ROOT / "docs" / "nf-experiment.png")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    lrs = [0.1, 1.0] if args.quick else [0.03, 0.1, 0.3, 1.0, 3.0]
    batches = [32] if args.quick else [32, 256]
    seeds = [0] if args.quick else [0, 1, 2]
    steps = 10 if args.quick else 150
    data = digits()
    jobs = [(v, lr, b, s) for v in VARIANTS for b in batches for lr in lrs for s in seeds]
    for variant in VARIANTS:  # warm-up: the first steps of each network include set-up costs
        run_one(variant, 0.1, batches[0], 0, 3, data)
    bar = ProgressBar(len(jobs), sys.stderr)
    results = []
    for done, (variant, lr, batch, seed) in enumerate(jobs, start=1):
        results.append(run_one(variant, lr, batch, seed, steps, data))
        bar.update(done, f"{variant}, lr {lr:g}, batch {batch}, seed {seed}")
    bar.close()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "nf-experiment.json").write_text(
        json.dumps({"steps": steps, "torch": torch.__version__, "results": results}, indent=1)
    )
    print(table(results))
    plot(results, args.image)
    print(f"\nwrote {args.out / 'nf-experiment.json'} and {args.image}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
