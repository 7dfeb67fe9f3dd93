"""Low precision on CPU and torch.compile of the torch backend."""

from __future__ import annotations

import pytest
import torch

from mita import mita_attention

from .helpers import make_inputs, padding_mask


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_float32(dtype):
    q, k, v, r = make_inputs(2, 2, 1, 40, 16, 4, dtype=torch.float32, requires_grad=False)
    ref = mita_attention(q, k, v, r, topk=6, backend="torch")
    out = mita_attention(q.to(dtype), k.to(dtype), v.to(dtype), r.to(dtype), topk=6, backend="torch")
    assert out.dtype == dtype
    # Inputs are rounded to dtype, so allow that rounding (bf16 has 8 mantissa bits) through the softmax.
    tol = 3e-2 if dtype == torch.bfloat16 else 4e-3
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


def test_bfloat16_backward_runs_and_is_close():
    q, k, v, r = make_inputs(1, 2, 2, 32, 16, 4, dtype=torch.float32)
    out = mita_attention(q, k, v, r, topk=5, backend="torch")
    g32 = torch.autograd.grad(out.sum(), [q, k, v])
    qb, kb, vb, rb = (t.detach().bfloat16().requires_grad_() for t in (q, k, v, r))
    outb = mita_attention(qb, kb, vb, rb, topk=5, backend="torch")
    gb = torch.autograd.grad(outb.sum(), [qb, kb, vb])
    for a, e in zip(gb, g32):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), e, atol=6e-2, rtol=6e-2)


def test_torch_compile_matches_eager():
    torch._dynamo.reset()
    q, k, v, r = make_inputs(2, 2, 1, 48, 8, 4, dtype=torch.float32)
    mask = padding_mask(2, 48, [0, 5])

    def f(q, k, v, r):
        return mita_attention(q, k, v, r, topk=6, experts_per_query=2, key_padding_mask=mask, backend="torch")

    eager = f(q, k, v, r)
    g_eager = torch.autograd.grad(eager.sum(), [q, k, v, r])
    compiled = torch.compile(f, fullgraph=False)
    out = compiled(q, k, v, r)
    g = torch.autograd.grad(out.sum(), [q, k, v, r])
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    for a, e in zip(g, g_eager):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)
