"""The MXNet benchmark plug-in runs end to end (quick sizes) and times like work."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.mxnet
pytest.importorskip("mxnet")

from benchmarks import bench_mxnet  # noqa: E402
from benchmarks.harness import measure  # noqa: E402


def test_fold_and_recalibrate_rows_time_equal_work() -> None:
    """The folded stack computes the unfolded one's inference output (Gluon's own
    BatchNorm in the unfolded one), so the fold_eval row times the same function."""
    rows = {b.name: b for b in bench_mxnet.benchmarks(quick=True)}
    fold_row = rows["fold_eval"]
    folded, unfolded = fold_row.unorm().asnumpy(), fold_row.native().asnumpy()
    np.testing.assert_allclose(folded, unfolded, rtol=1e-4, atol=1e-5)
    result = measure(rows["recalibrate"], repeats=1, warmup=0, number=1)
    assert result.unorm_s > 0 and result.native_s > 0
