"""unorm's conformance suite: every backend against the NumPy reference, one report.

Cases are declared once (:mod:`.cases`), inputs drawn in NumPy (:mod:`.data`), expected
values computed by :mod:`unorm.reference` at run time (:mod:`.expected`) and compared
with one per-dtype tolerance table (:mod:`.tolerance`). Each column is driven through its
adapter (``unorm/conformance/columns/<name>.py``, protocol in :mod:`.adapter`) in a
worker process of its own environment (:mod:`.worker`); the runner (:mod:`.runner`)
collects the JSON results and writes the report (:mod:`.report`). It ships with the
package: ``unorm conformance`` (or ``python -m unorm.conformance run``) runs it, in a
project checkout on every backend in its environment, elsewhere on every backend the
interpreter can import.

Example:
    >>> from unorm.conformance.cases import all_cases
    >>> len(all_cases()) > 100
    True
"""
