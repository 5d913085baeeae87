"""The training layer: one run of one config, no Ray.

``config`` (every YAML value's rule), ``models``, ``data``, ``batches``, ``trainer``
(``Trainer`` and checkpoints), ``distributed`` (exact data-parallel SSAM). Imports the
method and storage layers.
"""
