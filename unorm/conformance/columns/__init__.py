"""The conformance columns: one adapter module per column of the report.

``reference`` runs :mod:`unorm.reference`; each plug-in's columns (``unorm/_<name>/plugin.py``,
``columns``) are ``<name>`` (unorm's layers) and ``<name>_native`` (the framework's own);
``<name>_sync_worker`` is the helper process of a column's cross-replica cases. Each
imports its framework only when the column runs, so the package imports anywhere.
"""
