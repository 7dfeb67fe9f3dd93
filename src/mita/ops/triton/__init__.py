"""The ``"triton"`` MiTA backend: ``backend.py`` (dispatch, imported lazily by ``mita.ops.api``) and kernels.

- :mod:`.landmark`: landmark scores ``R K^T c`` (written once, for the top-k) and the shared values
  ``A = softmax(R K^T c) V`` in one pass over K and V.
- :mod:`.attention`: expert-major attention over tiles of queries that share a routed expert, forward
  (shared + routed keys, one online softmax) and backward (dQ per tile, dK/dV per routed key).
- :mod:`.scatter`: deterministic segmented sum used to scatter per-tile dK/dV without atomics.

Importing any of these modules imports ``triton``; this package's ``__init__`` does not.
"""
