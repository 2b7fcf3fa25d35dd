"""The framework-free core: rules that are the same for every backend, written once.

- :mod:`.layer_kinds`: the layer-kind table (output-unit axes, layouts per backend).
- :mod:`.registry`: the backend plug-ins, found by discovery and imported only on use.
- :mod:`.agc_plan`: AGC's parameter resolution (unit axes, exclusion, ownership, messages).
- :mod:`.port_plan`: the port planner over a declared adapter, and ``unorm port``'s protocol.
- :mod:`.settings`: the read-only views of a BatchNorm layer's spec.
- :mod:`.after_training`: fold, recalibrate and freeze (``SPEC.md`` section 8): which
  BatchNorm folds and why not, the output-channel axes, the messages.

Nothing here imports a framework (``tests/test_no_framework_names.py``); the layers and
the direction of imports are described in ``docs/architecture.md``.
"""
