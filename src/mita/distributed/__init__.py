"""Context parallelism for MiTA: a sequence sharded along N across the ranks of a process group.

:func:`context_parallel_attention` gives each rank its rows of :func:`mita.mita_attention` on the whole
sequence, and :func:`context_parallel_causal_attention` those of :func:`mita.mita_causal_attention` (the
frozen horizon), while the ranks exchange only landmarks, log-sum-exp partials, top-k candidates and the
selected key/value rows, whose sizes do not depend on N (the causal op's landmarks grow with N).
:func:`comm_stats` counts the bytes each collective sends.
"""

from .attention import context_parallel_attention
from .causal import context_parallel_causal_attention
from .collectives import CommStats, all_gather, all_reduce_sum, comm_stats
from .common import shard_sequence

__all__ = [
    "context_parallel_attention",
    "context_parallel_causal_attention",
    "shard_sequence",
    "comm_stats",
    "CommStats",
    "all_gather",
    "all_reduce_sum",
]
