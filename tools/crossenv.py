"""Jobs that span both environments through neutral checkpoint files (standard library only).

Each framework runs in its own environment (``python -m unorm.models ...``); results meet
only through files under ``results/``:

- :func:`port_check`: for every ordered pair of frameworks, a network trained briefly in
  the first is ported to the second; eval logits must agree to 1e-4 (part of ``./dev test``).
- :func:`zoo_check`: every zoo model (ResNet-18/50, MobileNetV2, EfficientNet-B0 from
  ``transformers``/``efficientnet_pytorch``, ResNet50 and MobileNetV2 from
  ``keras.applications``) x every ordered pair of frameworks (part of ``./dev test``).
- :func:`demo`: LeNet-BN trained with AGC in PyTorch, ported to every other framework that
  ports (Keras, MXNet, Flax); prints each test accuracy and the largest logit difference
  and records them in
  ``docs/demo.json`` (``./dev demo``).
- :func:`lockstep`: the same initial state and batches trained for 50 steps in every one;
  the loss curves are plotted (``docs/lockstep.png``), the last losses recorded in
  ``docs/lockstep.json``, and they must agree to 1e-3 relative (``./dev lockstep``).

The README quotes the two ``docs/`` summaries; each run rewrites them.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # the plug-in declarations import only the standard library
    sys.path.insert(0, str(_ROOT))

from unorm._core.registry import plugins_in_order  # noqa: E402

#: Every backend that ports (its plug-in names a port module), in its plug-in's order. The
#: first is home: it trains the demo and draws the lock-step's initial state, and its
#: environment (which has NumPy and matplotlib) compares the logits and plots the curves.
FRAMEWORKS = tuple(p.name for p in plugins_in_order() if p.ports)
HOME = FRAMEWORKS[0]
_HOME_TITLE = next(p.title for p in plugins_in_order() if p.ports)
PORT_TOLERANCE = 1e-4
LOCKSTEP_TOLERANCE = 1e-3

Log = Callable[[str], None]


def _write_summary(path: Path, summary: Mapping[str, object]) -> None:
    """Write a job's figures, with the UTC time of the run, as the README quotes them."""
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    path.write_text(json.dumps({"created": created, **summary}, indent=2) + "\n")


def _models(python: Path, framework: str, *args: str, cwd: Path) -> str:
    cmd = [str(python), "-m", "unorm.models", framework, *args]
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return done.stdout.strip()


def _compare(python: Path, first: Path, second: Path, cwd: Path) -> float:
    """Largest absolute difference of two saved logit arrays (computed in ``python``)."""
    code = (
        "import sys, numpy as np; a, b = np.load(sys.argv[1]), np.load(sys.argv[2]); "
        "print(float(np.abs(a - b).max()))"
    )
    done = subprocess.run(
        [str(python), "-c", code, str(first), str(second)],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    )
    return float(done.stdout.strip())


def port_check(pythons: Mapping[str, Path], root: Path, log: Log, steps: int = 5) -> bool:
    """Every ordered pair of frameworks: same eval logits after a port (<= 1e-4)."""
    out = root / "results" / "port-check"
    out.mkdir(parents=True, exist_ok=True)
    ok = True
    for source in FRAMEWORKS:
        ckpt, losses = out / f"{source}.safetensors", out / f"{source}-losses.json"
        _models(
            pythons[source],
            source,
            "train",
            "-",
            str(ckpt),
            str(losses),
            "--steps",
            str(steps),
            cwd=root,
        )
        reference = out / f"{source}-on-{source}.npy"
        _models(pythons[source], source, "evaluate", str(ckpt), str(reference), cwd=root)
        for target in FRAMEWORKS:
            if target == source:
                continue
            logits = out / f"{source}-on-{target}.npy"
            _models(pythons[target], target, "evaluate", str(ckpt), str(logits), cwd=root)
            diff = _compare(pythons[HOME], reference, logits, root)
            good = diff <= PORT_TOLERANCE
            ok &= good
            verdict = "ok" if good else "FAILED"
            log(f"port {source} -> {target}: max |logit difference| {diff:.2e} {verdict}")
    return ok


def zoo_check(pythons: Mapping[str, Path], root: Path, log: Log) -> bool:
    """Every zoo model (``unorm.models.zoo``) x every ordered pair of frameworks, through
    files: each framework exports its build of every model, briefly trained, and checks
    every other framework's export loaded into its own (eval logits within 1e-4 of the
    logit scale, statistics carried exactly, statistics after one more step within
    1e-3). The figures go to ``docs/zoo.json``, which the README quotes."""
    out = root / "results" / "zoo-check"
    out.mkdir(parents=True, exist_ok=True)
    for framework in FRAMEWORKS:
        log(f"zoo: {framework} exports its zoo models (none where it has no counterparts)")
        _models_zoo(pythons[framework], framework, "export", out, cwd=root)
    ports: list[dict[str, object]] = []
    ok = True
    for framework in FRAMEWORKS:
        cmd = [str(pythons[framework]), "-m", "unorm.models.zoo", framework, "check", str(out)]
        done = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
        lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        # Exit status 1 must come with a failing line: any other failure is a crash.
        if done.returncode != 0 and all(result["ok"] for result in lines):
            log(f"zoo: {' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
            ok = False
        for result in lines:
            ports.append(result)
            ok &= bool(result["ok"])
            pair = f"{result['model']} {result['source']} -> {result['target']}"
            log(f"zoo {pair}: {_zoo_line(result)}")
    _write_summary(root / "docs" / "zoo.json", {"ports": ports})
    return ok


def _zoo_line(result: Mapping[str, object]) -> str:
    if "error" in result:
        return f"refused: {result['error']} FAILED"
    verdict = "ok" if result["ok"] else "FAILED"
    carried = "exact" if result["statistics"] == 0.0 else f"{result['statistics']:.1e}"
    return (
        f"logits {result['logits']:.1e} of their scale, statistics {carried}, "
        f"after one more step {result['stepped']:.1e} {verdict}"
    )


def _models_zoo(python: Path, framework: str, *args: object, cwd: Path) -> None:
    cmd = [str(python), "-m", "unorm.models.zoo", framework, *map(str, args)]
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")


def demo(pythons: Mapping[str, Path], root: Path, log: Log, steps: int = 200) -> bool:
    """Train in the home framework (PyTorch) with AGC, port to the others (Keras, MXNet),
    compare accuracy and logits."""
    out = root / "results" / "demo"
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / f"lenet-{HOME}.safetensors"
    log(f"training LeNet-BN with AGC in {_HOME_TITLE} for {steps} steps on the digits")
    subprocess.run(
        [str(pythons[HOME]), "-m", "unorm.models", HOME, "train", "-", str(ckpt),
         str(out / "losses.json"), "--steps", str(steps)],
        cwd=root, check=True,
    )  # fmt: skip
    logits, accuracy = {}, {}
    for framework in FRAMEWORKS:
        logits[framework] = out / f"logits-{framework}.npy"
        line = _models(
            pythons[framework], framework, "evaluate", str(ckpt), str(logits[framework]), cwd=root
        )
        log(line)
        # The line reads "<framework>: test accuracy <value>".
        accuracy[framework] = float(line.rsplit(" ", 1)[-1])
    worst = max(_compare(pythons[HOME], logits[HOME], logits[f], root) for f in FRAMEWORKS)
    log(f"largest logit difference across the {len(FRAMEWORKS)} frameworks: {worst:.2e}")
    summary = {"steps": steps, "test_accuracy": accuracy, "largest_logit_difference": worst}
    _write_summary(root / "docs" / "demo.json", summary)
    return worst <= PORT_TOLERANCE


def lockstep(pythons: Mapping[str, Path], root: Path, log: Log, steps: int = 50) -> bool:
    """Train from one initial state in every framework; plot and compare the losses."""
    out = root / "results" / "lockstep"
    out.mkdir(parents=True, exist_ok=True)
    init = out / "init.safetensors"
    _models(pythons[HOME], HOME, "init", str(init), cwd=root)
    curves = {}
    for framework in FRAMEWORKS:
        losses = out / f"losses-{framework}.json"
        log(f"lock-step: {framework}, {steps} steps")
        trained = out / f"{framework}.safetensors"
        _models(
            pythons[framework], framework, "train", str(init), str(trained),
            str(losses), "--steps", str(steps), cwd=root,
        )  # fmt: skip
        curves[framework] = json.loads(losses.read_text())["losses"]
    last = {f: c[-1] for f, c in curves.items()}
    spread = (max(last.values()) - min(last.values())) / abs(last[HOME])
    log("loss at step {}: {}".format(steps, ", ".join(f"{f} {v:.6f}" for f, v in last.items())))
    log(f"largest relative difference at step {steps}: {spread:.2e}")
    image = root / "docs" / "lockstep.png"
    subprocess.run(
        [str(pythons[HOME]), str(root / "tools" / "plot_lockstep.py"), str(out), str(image)],
        cwd=root, check=True,
    )  # fmt: skip
    log(f"plot: {image.relative_to(root)}")
    summary = {"steps": steps, "last_loss": last, "largest_relative_difference": spread}
    _write_summary(root / "docs" / "lockstep.json", summary)
    return spread <= LOCKSTEP_TOLERANCE
