"""Bad input gets a ValueError naming the argument and the sizes; unavailable backends say why."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mita import mita_attention
from mita.ops import api

from .helpers import make_inputs


@pytest.fixture
def qkvr():
    return make_inputs(2, 4, 2, 10, 8, 3, dtype=torch.float32, requires_grad=False)


def call(q, k, v, r, **kw):
    kw.setdefault("topk", 3)
    return mita_attention(q, k, v, r, **kw)


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda q, k, v, r: (q[0], k, v, r), r"q must have 4 dimensions.*\(4, 10, 8\)"),
        (lambda q, k, v, r: (q, k, v, r[..., 0]), r"landmarks must have 4 dimensions"),
        (lambda q, k, v, r: (q, k[:1], v[:1], r), r"batch sizes differ: q 2, k 1"),
        (lambda q, k, v, r: (q, k, v[:, :, :9], r), r"v shape .* must match k shape"),
        (lambda q, k, v, r: (q, k[..., :4], v, r), r"head dims differ: q 8, k 4"),
        (lambda q, k, v, r: (q, k, v, r[:, :2]), r"landmarks have 2 heads but q has 4"),
        (
            lambda q, k, v, r: (q, k[:, :1].expand(-1, 3, -1, -1), v[:, :1].expand(-1, 3, -1, -1), r),
            r"q heads \(4\) must be a multiple of k/v heads \(3\)",
        ),
        (
            lambda q, k, v, r: (q, k.double(), v, r),
            r"k has dtype torch.float64 but q has dtype torch.float32",
        ),
        (lambda q, k, v, r: (q, k, v, r.to(torch.int64)), r"landmarks must be a floating-point tensor"),
        (lambda q, k, v, r: (q.numpy(), k, v, r), r"q must be a torch.Tensor"),
    ],
)
def test_shape_dtype_errors(qkvr, mutate, pattern):
    with pytest.raises(ValueError, match=pattern):
        call(*mutate(*qkvr))


@pytest.mark.parametrize(
    "kw, pattern",
    [
        (dict(topk=0), r"topk must be an int in 1..N=10, got 0"),
        (dict(topk=11), r"topk must be an int in 1..N=10, got 11"),
        (dict(topk=2.5), r"topk must be an int"),
        (dict(experts_per_query=0), r"experts_per_query must be an int in 1..m=3, got 0"),
        (dict(experts_per_query=4), r"experts_per_query must be an int in 1..m=3, got 4"),
        (dict(shared=False, routed=False), r"shared=False and routed=False"),
        (dict(backend="cuda"), r"backend must be one of"),
        (dict(scale=-1.0), r"scale must be a positive number"),
        (dict(landmark_scale=0), r"landmark_scale must be a positive number"),
        (dict(scale=float("inf")), r"scale must be a positive number \(finite\) or None, got inf"),
        (dict(landmark_scale=float("inf")), r"landmark_scale must be a positive number \(finite\)"),
        (dict(scale=float("nan")), r"scale must be a positive number"),
        (dict(scale=True), r"scale must be a positive number .*got True"),
        (dict(landmark_scale=False), r"landmark_scale must be a positive number .*got False"),
        (dict(scale="0.5"), r"scale must be a positive number"),
        (dict(shared="no"), r"shared must be True or False, got 'no'"),
        (dict(routed=1), r"routed must be True or False, got 1"),
        (dict(dedup=None), r"dedup must be True or False, got None"),
        (dict(topk=True), r"topk must be an int"),
        (dict(experts_per_query=2.0), r"experts_per_query must be an int"),
    ],
)
def test_option_errors(qkvr, kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        call(*qkvr, **kw)


def test_mask_errors(qkvr):
    with pytest.raises(
        ValueError, match=r"key_padding_mask must have shape \[B, N\] = \[2, 10\], got \(2, 9\)"
    ):
        call(*qkvr, key_padding_mask=torch.zeros(2, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"key_padding_mask must be a bool tensor"):
        call(*qkvr, key_padding_mask=torch.zeros(2, 10))
    all_pad = torch.zeros(2, 10, dtype=torch.bool)
    all_pad[1] = True
    with pytest.raises(ValueError, match=r"every key as padding in batch rows \[1\]"):
        call(*qkvr, key_padding_mask=all_pad)


def test_device_mismatch_named(qkvr):
    q, k, v, r = qkvr
    meta = r.to("meta")
    with pytest.raises(ValueError, match=r"landmarks is on meta but q is on cpu"):
        call(q, k, v, meta)


def test_triton_backend_unavailable_says_why(qkvr, monkeypatch):
    monkeypatch.setattr(api, "triton_available", lambda: (False, "no CUDA device"))
    with pytest.raises(RuntimeError, match=r"backend='triton' is unavailable: no CUDA device"):
        call(*qkvr, backend="triton")
    # auto falls back to the torch backend on CPU and still works
    assert call(*qkvr, backend="auto").shape == (2, 4, 10, 8)


def test_empty_value_dim_is_a_value_error(qkvr):
    q, k, v, r = qkvr
    with pytest.raises(ValueError, match=r"v must have a value dim dv >= 1, got shape \(2, 2, 10, 0\)"):
        call(q, k, v[..., :0], r)


def test_numpy_integers_are_accepted(qkvr):
    want = call(*qkvr, topk=3, experts_per_query=2, shared=True)
    got = call(*qkvr, topk=np.int64(3), experts_per_query=np.int32(2), shared=np.bool_(True))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"topk must be an int in 1..N=10, got 11"):
        call(*qkvr, topk=np.int64(11))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_backend_computes_half_inputs_in_float32(dtype):
    """q, k x 300: fp16 logits overflow (inf - inf = NaN) unless computed in float32, as torch does."""
    q, k, v, r = make_inputs(2, 2, 1, 32, 16, 4, dtype=torch.float32, requires_grad=False)
    q, k = q * 300, k * 300
    r = r * 300
    half = [t.to(dtype) for t in (q, k, v, r)]
    ref = mita_attention(*half, topk=5, backend="reference")
    assert ref.dtype == dtype and torch.isfinite(ref).all()
    torch.testing.assert_close(ref, mita_attention(*half, topk=5, backend="torch"), rtol=0, atol=0)
    exact = mita_attention(*(t.float() for t in half), topk=5, backend="reference")
    torch.testing.assert_close(ref.float(), exact, rtol=0, atol=2e-2 if dtype == torch.bfloat16 else 2e-3)


@pytest.mark.slow
def test_all_padding_row_under_compile_raises():
    """Eager raises ValueError; a compiled graph (no host sync) raises RuntimeError with the same message
    from a device-side check instead of returning NaN rows."""
    torch._dynamo.reset()
    q, k, v, r = make_inputs(2, 2, 1, 16, 8, 3, dtype=torch.float32, requires_grad=False)

    def f(q, k, v, r, mask):
        return mita_attention(q, k, v, r, topk=4, key_padding_mask=mask, backend="torch")

    compiled = torch.compile(f, fullgraph=True)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, 12:] = True
    torch.testing.assert_close(compiled(q, k, v, r, mask), f(q, k, v, r, mask), rtol=1e-5, atol=1e-5)
    mask[1] = True
    with pytest.raises(ValueError, match="every key as padding"):
        f(q, k, v, r, mask)
    with pytest.raises(RuntimeError, match="key_padding_mask marks every key as padding"):
        compiled(q, k, v, r, mask)
