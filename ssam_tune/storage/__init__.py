"""The storage layer: the experiment folder (``experiment``) and atomic writes (``files``).
Imports nothing else of the package; every layer above may use it."""
