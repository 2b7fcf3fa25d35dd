"""unorm's conformance suite: every backend against the NumPy reference, one report.

Cases are declared once (:mod:`conformance.cases`), inputs drawn in NumPy
(:mod:`conformance.data`), expected values computed by :mod:`unorm.reference` at run time
(:mod:`conformance.expected`) and compared with one per-dtype tolerance table
(:mod:`conformance.tolerance`). Each backend is driven through its adapter
(``backends/<name>/adapter.py``, protocol in :mod:`conformance.adapter`) in a worker
process of its own environment (:mod:`conformance.worker`); the runner
(:mod:`conformance.runner`) collects the JSON results and writes the report
(:mod:`conformance.report`). Run it with ``python -m conformance run`` or
``unorm conformance``.

Example:
    >>> from conformance.cases import all_cases
    >>> len(all_cases()) > 100
    True
"""
