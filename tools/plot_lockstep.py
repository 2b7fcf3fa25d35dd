"""Plot the lock-step loss curves: ``python tools/plot_lockstep.py RESULTS_DIR OUT.png``.

Reads ``losses-<framework>.json`` written by ``python -m unorm.models ... train`` and
draws one line per framework (run in the current environment, which has matplotlib), in
the plug-ins' order; the lower panel shows each one's distance from the first (PyTorch).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on CI machines
import matplotlib.pyplot as plt

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # run as a script: tools/ is on the path, the tree is not
    sys.path.insert(0, str(_ROOT))

from unorm._core.registry import plugins_in_order  # noqa: E402

#: Line style and width by framework: the first solid and bold, the others dashed, dotted,
#: dash-dotted (in turn).
_OTHERS = ("--", ":", "-.")
STYLES = {
    p.name: ("-", 2.5) if i == 0 else (_OTHERS[(i - 1) % len(_OTHERS)], 1.8)
    for i, p in enumerate(plugins_in_order())
}
HOME = next(iter(STYLES))


def main(results: Path, image: Path) -> None:
    """Draw the curves under ``results`` into ``image`` (losses above, distances below)."""
    fig, (ax, diff_ax) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=[3, 1])
    curves = {}
    for framework, (style, width) in STYLES.items():
        path = results / f"losses-{framework}.json"
        if path.exists():
            curves[framework] = json.loads(path.read_text())["losses"]
            steps = range(1, len(curves[framework]) + 1)
            ax.plot(steps, curves[framework], style, linewidth=width, label=framework)
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title("LeNet-BN + AGC on digits: same initial state and batches")
    ax.legend()
    base = curves.get(HOME)
    if base is not None:
        for framework, curve in curves.items():
            if framework != HOME:
                rel = [abs(a - b) / abs(b) for a, b in zip(curve, base, strict=False)]
                diff_ax.semilogy(range(1, len(rel) + 1), rel, STYLES[framework][0], label=framework)
        diff_ax.set_ylabel(f"|loss - {HOME}| / {HOME}")
        diff_ax.legend()
    diff_ax.set_xlabel("step")
    image.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(image, dpi=110)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
