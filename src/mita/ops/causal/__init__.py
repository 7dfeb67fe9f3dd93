"""Causal MiTA (SPEC §5), mirroring :mod:`mita.ops` file for file: :mod:`.api` (the op
:func:`mita_causal_attention`), :mod:`.common` (validation, :class:`CausalRouting`, routing, partial
softmaxes), :mod:`.reference` (the dense definition), :mod:`.torch_backend` (block-major),
:mod:`.cpu_backend` (glue of the fused frozen-horizon kernels), plus the decoding cache :class:`MiTACache`
and the non-finite layer."""

from .api import mita_causal_attention
from .cache import MiTACache
from .common import CausalProblem, CausalRouting, validate_causal

__all__ = ["MiTACache", "CausalProblem", "CausalRouting", "mita_causal_attention", "validate_causal"]
