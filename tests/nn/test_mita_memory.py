"""What a MiTA layer keeps for its backward on the fused CPU path: what full attention keeps, plus the
routing, the pooling weights and Q R^T (training memory no higher than full attention's)."""

from __future__ import annotations

import pytest
import torch

from mita.nn import MiTAAttention
from mita.ops import api

pytestmark = pytest.mark.skipif(not api.cpu_available()[0], reason="the fused CPU kernel is not built here")


def _saved_bytes(module: torch.nn.Module, x: torch.Tensor, pad: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves in one forward, parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x, key_padding_mask=pad)
    return sum(saved.values())


@pytest.mark.parametrize("b, n, dim, heads, m, k", [(2, 256, 64, 2, 16, 16), (3, 200, 96, 3, 8, 12)])
def test_saved_for_backward_is_full_attentions_plus_routing(b, n, dim, heads, m, k):
    torch.manual_seed(0)
    layer = MiTAAttention(dim, heads, num_landmarks=m, topk=k, layout="seq", prefix_tokens=0, backend="cpu")
    x = torch.randn(b, n, dim, requires_grad=True)
    pad = torch.zeros(b, n, dtype=torch.bool)
    pad[0, n - 9 :] = True
    d, f, i = dim // heads, 4, 8  # head dim, float32 and int64 bytes
    # SDPA attention keeps the input of qkv, its output (q, k, v), the output (= proj's input), lse, mask
    full = f * (b * n * dim + 3 * b * n * dim + b * n * dim + b * heads * n) + b * n
    # MiTA adds per query its expert, per landmark its keys and its vector, per sample the pooling weights
    routing = i * b * heads * n + i * b * heads * m * k + f * b * heads * m * d + f * b * m * n
    # and, so that the backward recomputes only the probabilities, Q R^T [N, m] and A [m, d] per head
    kept = f * b * heads * (n * m + m * d)
    # no copy of q, k, v or the output, no other [N, m] or [m, N] matrix per head
    assert _saved_bytes(layer, x, pad) <= full + routing + kept
