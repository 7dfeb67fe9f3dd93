"""The ``"triton"`` MiTA backend, in fla's layout (each kernel file reads kernels -> launchers -> autograd).

- :mod:`.backend`: the entry ``mita.ops.api`` calls (``availability``, ``triton_forward``: fallbacks to
  the torch backend, device check). It does not import ``triton``.
- :mod:`.parallel`: the fused op. Routing, expert-tile attention forward/backward, the query-major
  shared-logit backward and the deterministic segment sum; their launchers; ``MitaFunction``; and
  ``parallel_mita``.
- :mod:`.landmark`: the landmark side, scores ``R K^T c`` for the top-k and ``A = softmax(R K^T c) V``
  in one pass over K and V, and its backward.
- :mod:`.interpreter`: whether ``TRITON_INTERPRET`` asks for the interpreter (a leaf both sides read).
- :mod:`.utils`: block sizes, loads/stores by row index, and ``launch`` (keyword launches with a
  fallback on ``OutOfResources``).

Importing any module but :mod:`.backend` and :mod:`.interpreter` imports ``triton``; this package's
``__init__`` does not.
"""
