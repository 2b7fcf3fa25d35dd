"""A small versioned golden set that guards :mod:`unorm.reference` itself against drift.

The conformance suite computes expected values with the reference at run time, so an
accidental change to the reference would move every expectation with it and pass
silently. ``unorm/conformance/golden/reference-v2.npz`` stores the inputs and outputs of a few
reference calls (training forward and backward, a running-statistics sequence under the
canonical convention and every preset, inference backward, AGC in two layouts, the
cross-replica merge; since version 2 also a grouped transposed and a dense fold, the
recalibrated statistics of uneven batches and two accumulated steps);
:func:`check_golden` recomputes them from the stored inputs. An intended change to the
reference writes a new version (``python -m unorm.conformance golden --write`` after
bumping :data:`VERSION`), never edits this one silently.

Example:
    >>> check_golden(GOLDEN_PATH)
    []
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from unorm import reference as ref
from unorm._core.registry import plugins_in_order
from unorm.spec import BatchNormSpec

from .layouts import LOGICAL

__all__ = ["GOLDEN_PATH", "VERSION", "check_golden", "compute", "golden_inputs", "write_golden"]

VERSION = 2
GOLDEN_PATH = Path(__file__).resolve().parent / "golden" / f"reference-v{VERSION}.npz"
#: float64 recomputation on another NumPy may sum in another order; nothing more.
RTOL = 1e-12

Arrays = dict[str, np.ndarray]


def golden_inputs(seed: int = 20261) -> Arrays:
    """The stored inputs (drawn once; the file, not the generator, is the record)."""
    rng = np.random.default_rng(seed)
    return {
        "bn/x": rng.normal(0.5, 2.0, (4, 3, 2, 2)),
        "bn/dy": rng.normal(size=(4, 3, 2, 2)),
        "bn/gamma": rng.uniform(0.5, 1.5, 3),
        "bn/beta": rng.normal(size=3),
        "seq/x": rng.normal(1.0, 3.0, (3, 5, 4)),
        "agc/w": rng.normal(size=(6, 3, 3, 3)),
        "agc/g": rng.normal(size=(6, 3, 3, 3)) * 10.0 ** rng.uniform(-3, -1, (6, 1, 1, 1)),
        "agc/dense_w": rng.normal(size=(5, 4)),
        "agc/dense_g": rng.normal(size=(5, 4)) * 0.02,
        "merge/x": rng.normal(size=(9, 3)),
        # Version 2: fold, recalibrate and accumulate (SPEC.md sections 8 and 2).
        "fold/w": rng.normal(size=(4, 3, 2, 2)),
        "fold/b": rng.normal(size=6),
        "fold/gamma": rng.uniform(0.5, 1.5, 6),
        "fold/beta": rng.normal(size=6),
        "fold/mean": rng.normal(size=6),
        "fold/var": rng.uniform(0.5, 2.0, 6),
        "fold/dense_w": rng.normal(size=(6, 5)),
        "after/x": rng.normal(2.0, 1.5, (13, 3)),
    }


def _bn(a: Arrays) -> Arrays:
    y, stats = ref.batch_norm_train(a["bn/x"], a["bn/gamma"], a["bn/beta"], axis=1)
    g = ref.batch_norm_backward(a["bn/dy"], a["bn/x"], a["bn/gamma"], axis=1)
    gi = ref.batch_norm_inference_backward(
        a["bn/dy"], a["bn/x"], np.full(3, 0.2), np.full(3, 1.5), a["bn/gamma"], axis=1
    )
    return {
        "bn/y": y,
        "bn/mean": stats.mean,
        "bn/m2": stats.m2,
        "bn/dx": g.dx,
        "bn/dgamma": np.asarray(g.dgamma),
        "bn/dbeta": np.asarray(g.dbeta),
        "bn/inference_dx": gi.dx,
    }


def _sequence(a: Arrays) -> Arrays:
    out: Arrays = {}
    for preset in (None, *(p.name for p in plugins_in_order())):
        spec = BatchNormSpec.from_preset(preset, axis=-1)
        state: ref.RunningStats | None = ref.init_running_stats(4)
        for x in a["seq/x"]:
            _, state = ref.batch_norm_step(x, state, spec, training=True)
        y, _ = ref.batch_norm_step(a["seq/x"][0], state, spec, training=False)
        assert state is not None  # every preset keeps running statistics
        key = f"seq/{preset or 'canonical'}"
        out[f"{key}/mean"], out[f"{key}/var"] = state.mean, state.var
        out[f"{key}/tracked"] = np.array(state.num_batches_tracked)
        out[f"{key}/y_eval"] = y
    return out


def _agc(a: Arrays) -> Arrays:
    out = {"agc/clipped_conv": ref.agc_clip(a["agc/g"], a["agc/w"], 0, clipping=0.01)}
    # The same dense arrays read in every backend layout whose units are not the logical
    # ``(out, in)`` rows (Keras's ``(in, out)``): one output per such backend.
    logical = LOGICAL.kernels["dense"].unit_axes("dense", 2)
    for p in plugins_in_order():
        axes = p.layouts["dense"].unit_axes("dense", 2)
        if axes != logical:
            out[f"agc/clipped_dense_{p.name}"] = ref.agc_clip(
                a["agc/dense_g"], a["agc/dense_w"], axes
            )
    return out


def _merge(a: Arrays) -> Arrays:
    x = a["merge/x"]
    merged = ref.merge_stats([ref.batch_stats(part) for part in (x[:4], x[4:4], x[4:])])
    return {"merge/count": np.array(merged.count), "merge/mean": merged.mean, "merge/m2": merged.m2}


def _fold(a: Arrays) -> Arrays:
    stats = (a["fold/mean"], a["fold/var"], a["fold/gamma"], a["fold/beta"])
    # A grouped transposed convolution (I, O/g, kh, kw) = (4, 3, 2, 2), g = 2: the output
    # channels are axes 0 and 2 of the view (g, I/g, O/g, kh, kw).
    w, b = ref.fold_batch_norm(
        a["fold/w"], a["fold/b"], *stats, eps=1e-3, out_axes=(0, 2), view=(2, 2, 3, 2, 2)
    )
    dw, db = ref.fold_batch_norm(a["fold/dense_w"], None, *stats, out_axes=0)
    return {"fold/grouped_w": w, "fold/grouped_b": b, "fold/dense_w": dw, "fold/dense_b": db}


def _after(a: Arrays) -> Arrays:
    x = a["after/x"]
    parts = (x[:6], x[6:12], x[12:])  # an uneven last batch
    out: Arrays = {}
    for unbiased in (True, False):
        stats = ref.recalibrated_stats(parts, axis=1, unbiased=unbiased)
        key = f"recalibrate/{'unbiased' if unbiased else 'biased'}"
        out[f"{key}/mean"], out[f"{key}/var"] = stats.mean, stats.var
        out[f"{key}/tracked"] = np.array(stats.num_batches_tracked)
    state = ref.init_running_stats(3)
    for spec in (BatchNormSpec(), BatchNormSpec(momentum=None)):
        micro = [ref.batch_stats(p) for p in parts]
        state = ref.accumulated_stats(state, micro, spec)  # two steps, the second cumulative
    out["accumulate/mean"], out["accumulate/var"] = state.mean, state.var
    out["accumulate/tracked"] = np.array(state.num_batches_tracked)
    return out


_PARTS: tuple[Callable[[Arrays], Arrays], ...] = (_bn, _sequence, _agc, _merge, _fold, _after)


def compute(inputs: Arrays) -> Arrays:
    """Every golden output, recomputed by the reference from ``inputs``."""
    out: Arrays = {}
    for part in _PARTS:
        out.update(part(inputs))
    return out


def write_golden(path: Path = GOLDEN_PATH) -> None:
    """Write inputs (``in:``), outputs (``out:``) and a JSON description to ``path``."""
    inputs = golden_inputs()
    outputs = compute(inputs)
    meta = {"version": VERSION, "numpy": np.__version__, "outputs": sorted(outputs)}
    arrays = {f"in:{k}": v for k, v in inputs.items()}
    arrays.update({f"out:{k}": np.asarray(v) for k, v in outputs.items()})
    arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)  # type: ignore[arg-type]  # numpy's stub mistypes **kwds


def check_golden(path: Path = GOLDEN_PATH) -> list[str]:
    """Recompute the golden outputs from the stored inputs; one line per difference."""
    with np.load(path, allow_pickle=False) as data:
        stored = {k: data[k] for k in data.files}
    meta = json.loads(str(stored.pop("meta")))
    if meta.get("version") != VERSION:
        return [f"{path.name}: version {meta.get('version')}, expected {VERSION}"]
    inputs = {k[3:]: v for k, v in stored.items() if k.startswith("in:")}
    want = {k[4:]: v for k, v in stored.items() if k.startswith("out:")}
    got = compute(inputs)
    problems = [f"{k}: no longer computed" for k in sorted(set(want) - set(got))]
    problems += [f"{k}: new output not in {path.name}" for k in sorted(set(got) - set(want))]
    for key in sorted(set(want) & set(got)):
        a, e = np.asarray(got[key], np.float64), np.asarray(want[key], np.float64)
        if a.shape != e.shape:
            problems.append(f"{key}: shape {a.shape}, golden {e.shape}")
        elif not np.allclose(a, e, rtol=RTOL, atol=RTOL * max(1.0, float(np.abs(e).max()))):
            problems.append(f"{key}: max abs difference {float(np.abs(a - e).max()):.3g}")
    return problems
