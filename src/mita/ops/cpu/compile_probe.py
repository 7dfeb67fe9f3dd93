"""The kernels' availability when the first MiTA call of a process happens while ``torch.compile``
traces it: the probe (file system, compiler, loading) runs eagerly at trace time and its answer enters
the graph as a constant, so ``fullgraph=True`` works on a cold start. Imported only while compiling
(``torch._dynamo`` is then loaded anyway)."""

from __future__ import annotations

import torch._dynamo

from . import build


@torch._dynamo.assume_constant_result
def probe_while_compiling(lib: str, probe: str) -> tuple[bool, str]:
    """``build.availability(lib, probe)``, evaluated outside the traced graph."""
    return build._cached_or_probe(lib, probe)
