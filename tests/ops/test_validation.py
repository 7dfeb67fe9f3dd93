"""Bad input gets a ValueError naming the argument and the sizes; unavailable backends say why."""

from __future__ import annotations

import pytest
import torch

from mita import mita_attention

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
    from mita.ops import api

    monkeypatch.setattr(api, "triton_available", lambda: (False, "no CUDA device"))
    with pytest.raises(RuntimeError, match=r"backend='triton' is unavailable: no CUDA device"):
        call(*qkvr, backend="triton")
    # auto falls back to the torch backend on CPU and still works
    assert call(*qkvr, backend="auto").shape == (2, 4, 10, 8)
