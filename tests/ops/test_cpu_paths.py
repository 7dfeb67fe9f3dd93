"""The cpu backend's two shapes: the whole-op path (landmark side fused, recomputed in the backward) and
the split path (torch landmark products + the attention-step kernel). Each against the dense reference,
forward and every gradient, and against each other; which one runs is asserted, not assumed."""

from __future__ import annotations

import pytest
import torch

from mita import mita_attention
from mita.ops import cpu_backend
from mita.ops.api import validate
from mita.ops.cpu import build

from .helpers import make_inputs, padding_mask, same_routing

pytestmark = pytest.mark.skipif(build._missing_tools() is not None, reason="no C++ compiler or ninja")

# (B, H, Hkv, N, d, m, k, pad, shared, routed): head dims that are multiples of the vector length (the
# whole-op path's condition), N not a multiple of m or of a vector.
CASES = {
    "basic": (2, 2, 2, 37, 16, 5, 7, None, True, True),
    "vision": (2, 3, 3, 197, 64, 25, 25, None, True, True),
    "gqa": (2, 4, 2, 45, 16, 6, 9, None, True, True),
    "mqa_k_eq_n": (1, 4, 1, 23, 16, 3, 23, None, True, True),
    "m1": (1, 2, 2, 29, 32, 1, 6, None, True, True),
    "padding": (3, 2, 2, 26, 16, 4, 5, [0, 4, 11], True, True),
    "padding_fewer_valid_than_k": (2, 2, 1, 20, 16, 3, 9, [2, 15], True, True),
    "shared_only": (2, 2, 2, 37, 16, 5, 7, [0, 6], True, False),
    "routed_only": (2, 2, 2, 37, 16, 5, 7, [0, 6], False, True),
}


@pytest.fixture
def calls(monkeypatch):
    """Counts of the whole-op forward and of the split path's landmark side, per test."""
    seen = {"whole": 0, "split": 0}
    whole, split = cpu_backend._whole_op, cpu_backend._landmark_side

    def count_whole(*a):
        seen["whole"] += 1
        return whole(*a)

    def count_split(*a):
        seen["split"] += 1
        return split(*a)

    monkeypatch.setattr(cpu_backend, "_whole_op", count_whole)
    monkeypatch.setattr(cpu_backend, "_landmark_side", count_split)
    return seen


def _grads(out, inputs):
    weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    grads = torch.autograd.grad((out * weight).sum(), inputs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]


def _check(case, dtype, atol, rtol, path, calls, monkeypatch):
    b, h, hkv, n, d, m, k, pad, shared, routed = CASES[case]
    if path == "split":
        monkeypatch.setattr(cpu_backend, "WHOLE_OP_MAX_KEYS", 0)
    inputs = make_inputs(b, h, hkv, n, d, m, dtype=dtype, seed=len(case))
    mask = padding_mask(b, n, pad) if pad else None
    kw = dict(topk=k, key_padding_mask=mask, shared=shared, routed=routed, return_routing=True)
    ref, rt_ref = mita_attention(*inputs, backend="reference", **kw)
    out, rt = mita_attention(*inputs, backend="cpu", **kw)
    assert calls == ({"whole": 1, "split": 0} if path == "whole" else {"whole": 0, "split": 1})
    assert same_routing(rt_ref, rt, "cpu", mask)
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    for name, a, e in zip("q k v landmarks".split(), _grads(out, inputs), _grads(ref, inputs)):
        torch.testing.assert_close(a, e, atol=atol, rtol=rtol, msg=lambda s, name=name: f"grad {name}: {s}")
    return out


@pytest.mark.parametrize("path", ["whole", "split"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_both_paths_match_reference_float64(case, path, calls, monkeypatch):
    _check(case, torch.float64, 1e-10, 1e-9, path, calls, monkeypatch)


@pytest.mark.parametrize("path", ["whole", "split"])
@pytest.mark.parametrize("case", ["basic", "vision", "gqa", "padding", "routed_only"])
def test_both_paths_match_reference_float32(case, path, calls, monkeypatch):
    _check(case, torch.float32, 2e-5, 2e-5, path, calls, monkeypatch)


def test_whole_op_path_conditions():
    """s > 1, dedup, head dims off the vector length and long key sequences take the split path."""

    def applies(d=16, dv=16, n=64, s=1, dedup=False, dtype=torch.float32):
        q, k, v, r = make_inputs(1, 2, 2, n, d, 4, dtype=dtype, requires_grad=False)
        v = torch.randn(1, 2, n, dv, dtype=dtype)
        p = validate(q, k, v, r, topk=4, experts_per_query=s, scale=None, landmark_scale=None, shared=True,
                     routed=True, dedup=dedup, key_padding_mask=None, backend="cpu")  # fmt: skip
        return cpu_backend._whole_op_applies(p, q, v)

    assert applies() and applies(d=8, dv=8, dtype=torch.float64)
    assert not applies(d=8, dv=8)  # float32 vectors hold 16
    assert not applies(dv=24) and not applies(s=2) and not applies(s=2, dedup=True)
    assert not applies(n=cpu_backend.WHOLE_OP_MAX_KEYS + 1)


def test_whole_op_path_is_bitwise_thread_independent(calls):
    """Nothing in the whole-op path goes through a library matmul: every output and gradient is bitwise
    the same at 1 and 2 threads."""
    inputs = make_inputs(2, 4, 2, 90, 16, 5, dtype=torch.float32, seed=4)
    mask = padding_mask(2, 90, [0, 13])

    def run(threads):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            out = mita_attention(*inputs, topk=9, key_padding_mask=mask, backend="cpu")
            return [out, *_grads(out, inputs)]
        finally:
            torch.set_num_threads(before)

    for a, b in zip(run(1), run(2)):
        assert torch.equal(a, b)
    assert calls["whole"] == 2 and calls["split"] == 0


def test_whole_op_gradcheck():
    inputs = make_inputs(1, 2, 1, 13, 8, 3, dtype=torch.float64, seed=7)
    mask = padding_mask(1, 13, [2])

    def f(q, k, v, r):
        return mita_attention(q, k, v, r, topk=4, key_padding_mask=mask, backend="cpu")

    assert torch.autograd.gradcheck(f, inputs)


def test_whole_op_custom_op_passes_opcheck():
    q, k, v, r = make_inputs(1, 2, 2, 12, 8, 3, dtype=torch.float64, seed=1)
    mask = padding_mask(1, 12, [3])
    args = (q, k, v, r, mask, 5, 8**-0.5, 1.0 / 8, True, True, True)
    torch.library.opcheck(cpu_backend.cpu_whole_op, args)


def test_whole_op_under_torch_compile():
    torch._dynamo.reset()
    inputs = make_inputs(2, 2, 1, 48, 16, 4, dtype=torch.float32)
    mask = padding_mask(2, 48, [0, 5])

    def f(q, k, v, r):
        return mita_attention(q, k, v, r, topk=6, key_padding_mask=mask, backend="cpu")

    eager = f(*inputs)
    compiled = torch.compile(f, backend="aot_eager")(*inputs)
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-6)
    for a, e in zip(_grads(compiled, inputs), _grads(eager, inputs)):
        torch.testing.assert_close(a, e, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("layout", ["heads_last", "qkv_slices"])
def test_whole_op_reads_strided_heads_in_place(layout, calls):
    """q, k, v as views of a projection (heads last, or slices of one qkv output) give the same output
    and gradients as contiguous copies; the output is [B, N, H, dv] underneath, so merging the heads is a
    view, and each gradient comes back in its input's layout."""
    b, h, n, d, m = 2, 3, 41, 16, 5
    g = torch.Generator().manual_seed(3)
    if layout == "heads_last":
        leaves = [
            torch.randn(b, n, h, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)
        ]
        q, k, v = (t.transpose(1, 2) for t in leaves)
    else:
        leaves = [torch.randn(b, n, 3 * h * d, generator=g, dtype=torch.float64, requires_grad=True)]
        q, k, v = leaves[0].view(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
    r = torch.randn(b, h, m, d, generator=g, dtype=torch.float64, requires_grad=True)
    out = mita_attention(q, k, v, r, topk=7, backend="cpu")
    assert out.transpose(1, 2).is_contiguous()
    copies = [t.detach().contiguous().requires_grad_() for t in (q, k, v)]
    ref = mita_attention(*copies, r, topk=7, backend="cpu")
    assert torch.equal(out, ref)
    weight = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out * weight).sum(), [q, k, v, r])
    expected = torch.autograd.grad((ref * weight).sum(), [*copies, r])
    for a, e in zip(grads, expected):
        assert torch.equal(a, e)
    if layout == "heads_last":
        for a, x in zip(grads, (q, k, v)):
            assert a.stride() == x.stride()
    assert calls["whole"] == 2


def test_whole_op_keeps_qr_and_shared_values_only_for_a_backward(monkeypatch):
    """With a gradient to come, the forward hands Q R^T and A to the backward (which then recomputes only
    the probabilities); without one (no_grad, or no input needing a gradient) it keeps nothing."""
    seen = []
    whole = cpu_backend._whole_op

    def spy(*a):
        out = whole(*a)
        seen.append((a[-1], tuple(out[4].shape), tuple(out[5].shape)))
        return out

    monkeypatch.setattr(cpu_backend, "_whole_op", spy)
    q, k, v, r = make_inputs(2, 2, 2, 30, 16, 4, dtype=torch.float32)
    mita_attention(q, k, v, r, topk=5, backend="cpu").sum().backward()
    with torch.no_grad():
        mita_attention(q, k, v, r, topk=5, backend="cpu")
    mita_attention(*(t.detach() for t in (q, k, v, r)), topk=5, backend="cpu")
    mita_attention(q, k, v, r, topk=5, shared=False, backend="cpu")
    assert seen == [
        (True, (2, 2, 30, 4), (2, 2, 4, 16)),
        (False, (0, 2, 30, 4), (0, 2, 4, 16)),
        (False, (0, 2, 30, 4), (0, 2, 4, 16)),
        (True, (0, 2, 30, 4), (0, 2, 4, 16)),  # routing only: the backward needs neither
    ]


def test_whole_op_backward_refuses_a_forward_that_kept_nothing():
    assert build.availability()[0]
    q, k, v, r = make_inputs(1, 2, 2, 20, 16, 3, dtype=torch.float32, requires_grad=False)
    out, lse, experts, keys, qr, values = torch.ops.mita_cpu.whole_fwd(
        q, k, v, r, None, 4, 0.25, 1 / 16, True, True, False
    )
    assert qr.shape[0] == 0 and values.shape[0] == 0
    with pytest.raises(RuntimeError, match="must come from a forward run with save=True"):
        torch.ops.mita_cpu.whole_bwd(
            q,
            k,
            v,
            r,
            None,
            keys,
            experts,
            out,
            lse,
            qr,
            values,
            torch.ones_like(out),
            0.25,
            1 / 16,
            True,
            True,
        )
