"""The framework-free core: rules that are the same for every backend, written once.

- :mod:`.layer_kinds`: the layer-kind table (output-unit axes, layouts per backend).
- :mod:`.registry`: the backend plug-ins, found by name and imported only on use.
- :mod:`.agc_plan`: AGC's parameter resolution (unit axes, exclusion, ownership, messages).

Nothing here imports a framework (``tests/test_no_framework_names.py``).
"""
