"""Speed benchmarks of unorm against each framework's native operations.

One harness (:mod:`benchmarks.harness`) times every backend's benchmarks the same way: the
unorm operation and its native counterpart run alternately in one process, several repeats
after a warm-up, and the medians are compared. Each backend plugs in through a module
``benchmarks/bench_<backend>.py``; :mod:`benchmarks.run` runs one plug-in and writes
``benchmarks/results/<backend>.json``, and :mod:`benchmarks.report` renders the results
files as a Markdown table for the README. See ``benchmarks/README.md``.

Example:
    >>> from benchmarks.harness import Benchmark, measure
    >>> bench = Benchmark("noop", "python", {}, unorm=lambda: None, native=lambda: None)
    >>> measure(bench, repeats=1, warmup=0, number=1).name
    'noop'
"""
