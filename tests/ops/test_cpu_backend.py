"""The fused CPU backend (``backend="cpu"``): its choice by ``"auto"``, its fallback, thread independence,
low precision, ``torch.compile``, its custom-op registrations and its top-k. The build layer (flags, cache,
locks, failures) is tested in test_cpu_build.py.

Agreement with the reference (forward and every gradient) is tested with the other backends in
test_agreement.py, test_gradcheck.py and test_known_answers.py.
"""

from __future__ import annotations

import pytest
import torch

from mita import mita_attention
from mita.ops import api
from mita.ops.cpu import build
from mita.ops.cpu_backend import cpu_attention, cpu_topk

from .helpers import make_inputs, padding_mask

needs_tools = pytest.mark.skipif(build._missing_tools() is not None, reason="no C++ compiler or ninja")


def _grads(out, inputs):
    return torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum(), inputs)


@needs_tools
def test_auto_picks_the_cpu_kernel_on_cpu():
    assert api.cpu_available() == (True, "")
    assert api._resolve_backend("auto", torch.device("cpu")) == "cpu"


def test_switch_off_falls_back_to_torch_silently(fresh_state, recwarn):
    fresh_state.setenv("MITA_CPU_KERNEL", "0")
    assert api._resolve_backend("auto", torch.device("cpu")) == "torch"
    q, k, v, r = make_inputs(2, 2, 1, 20, 8, 3, requires_grad=False)
    auto = mita_attention(q, k, v, r, topk=4)
    assert torch.equal(auto, mita_attention(q, k, v, r, topk=4, backend="torch"))
    assert not [w for w in recwarn if "CPU kernel" in str(w.message)]
    with pytest.raises(RuntimeError, match=r"backend='cpu' is unavailable: disabled by MITA_CPU_KERNEL=0"):
        mita_attention(q, k, v, r, topk=4, backend="cpu")


def test_missing_compiler_warns_once_and_uses_torch(fresh_state, tmp_path):
    """Nothing cached (an empty cache, a process without the ops) and no compiler: torch, one warning."""
    fresh_state.setenv("MITA_CACHE", str(tmp_path))
    fresh_state.setattr(build, "_registered", lambda lib, probe: False)
    fresh_state.setattr(build, "_missing_tools", lambda: "no C++ compiler ('c++' not found)")
    q, k, v, r = make_inputs(1, 2, 2, 16, 8, 3, requires_grad=False)
    with pytest.warns(UserWarning, match=r"fused CPU kernel unavailable \(no C\+\+ compiler") as record:
        out = mita_attention(q, k, v, r, topk=4)
        mita_attention(q, k, v, r, topk=4)
    assert len([w for w in record if "CPU kernel" in str(w.message)]) == 1
    assert torch.equal(out, mita_attention(q, k, v, r, topk=4, backend="torch"))


def test_build_failure_is_reported_with_its_error_line(fresh_state):
    fresh_state.setattr(build, "_missing_tools", lambda: None)

    def broken(lib: str) -> None:
        raise RuntimeError("Error building extension\nkernel.cpp:1: error: boom\nninja: build stopped")

    fresh_state.setattr(build, "_build", broken)
    fresh_state.setattr(
        build, "_registered", lambda lib, probe: False
    )  # as in a process that has not loaded it
    ok, why = build.availability()
    assert not ok and why == "building the CPU kernel failed: kernel.cpp:1: error: boom"
    with pytest.raises(RuntimeError, match="backend='cpu' is unavailable: building the CPU kernel failed"):
        mita_attention(*make_inputs(1, 1, 1, 8, 4, 2, requires_grad=False), topk=2, backend="cpu")


def test_cache_key_changes_with_the_source_and_torch(monkeypatch):
    key = build.build_key()
    assert len(key) == 16 and key == build.build_key()
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    assert build.build_key() != key
    monkeypatch.setenv("MITA_CACHE", "/some/where")
    assert build.cache_root() == build.Path("/some/where")


def _at_threads(threads: int, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


@needs_tools
def test_same_answer_at_one_and_two_threads():
    """The fused kernels are bitwise thread-independent (one thread per (batch, head), fixed order). Of
    the whole op's gradients, those of k and the landmarks also pass through torch's own landmark-side
    matmul backward, which MKL may round differently with the thread count (the torch backend shares it),
    so there they are compared to float32 rounding."""
    q, k, v, r = make_inputs(2, 4, 2, 90, 16, 5, dtype=torch.float32, seed=4)
    mask = padding_mask(2, 90, [0, 13])
    kw = dict(topk=9, experts_per_query=2, dedup=True, key_padding_mask=mask, backend="cpu")

    def whole():
        out = mita_attention(q, k, v, r, **kw)
        return [out, *_grads(out, [q, k, v, r])]

    one, two = _at_threads(1, whole), _at_threads(2, whole)
    for name, a, b in zip(["out", "q", "k", "v", "landmarks"], one, two):
        if name in ("k", "landmarks"):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
        else:
            assert torch.equal(a, b), name

    g = torch.Generator().manual_seed(2)
    b, h, hkv, n, d, m, kk = 3, 4, 2, 70, 16, 6, 11
    qq = torch.randn(b, h, n, d, generator=g, requires_grad=True)
    ks, vs = (torch.randn(b, hkv, n, d, generator=g, requires_grad=True) for _ in range(2))
    qr = torch.randn(b, h, n, m, generator=g, requires_grad=True)
    a = torch.randn(b, h, m, d, generator=g, requires_grad=True)
    key_index = torch.stack([torch.randperm(n, generator=g)[:kk] for _ in range(b * h * m)]).reshape(
        b, h, m, kk
    )

    def kernel_only():
        pad = padding_mask(b, n, [0, 7, 0])  # [B, N]: the kernels refuse a mask of another length
        out, lse, _ = cpu_attention(qq, ks, vs, qr, a, key_index, None, pad, None, d**-0.5, 1.0 / d, True)
        return [out, lse, *_grads(out, [qq, ks, vs, qr, a])]

    for x, y in zip(_at_threads(1, kernel_only), _at_threads(2, kernel_only)):
        assert torch.equal(x, y)


@needs_tools
@pytest.mark.parametrize(
    "d, dv, m, k, n", [(64, 64, 25, 25, 197), (20, 12, 7, 19, 61), (32, 32, 64, 64, 300)]
)
def test_vision_and_odd_sizes_match_reference(d, dv, m, k, n):
    """Register blocks and vector padding: head/value dims and k that are and are not multiples of 16."""
    g = torch.Generator().manual_seed(d + n)
    q, kk, r = (torch.randn(2, 2, x, d, generator=g, dtype=torch.float64) for x in (n, n, m))
    v = torch.randn(2, 2, n, dv, generator=g, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (q, kk, v, r)]
    ref = mita_attention(*inputs, topk=k, backend="reference")
    out = mita_attention(*inputs, topk=k, backend="cpu")
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-9)
    for a, e in zip(_grads(out, inputs), _grads(ref, inputs)):
        torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-9)


@needs_tools
def test_bfloat16_inputs_compute_in_float32():
    q, k, v, r = make_inputs(1, 2, 2, 40, 16, 4, dtype=torch.float32)
    out = mita_attention(q, k, v, r, topk=6, backend="cpu")
    g32 = _grads(out, [q, k, v, r])
    qb, kb, vb, rb = (t.detach().bfloat16().requires_grad_() for t in (q, k, v, r))
    outb = mita_attention(qb, kb, vb, rb, topk=6, backend="cpu")
    assert outb.dtype == torch.bfloat16
    torch.testing.assert_close(outb.float(), out, atol=3e-2, rtol=3e-2)
    for a, e in zip(_grads(outb, [qb, kb, vb, rb]), g32):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), e, atol=6e-2, rtol=6e-2)


@needs_tools
def test_torch_compile_traces_the_custom_ops():
    """aot_eager runs the fake implementations and the registered autograd under torch.compile."""
    torch._dynamo.reset()
    q, k, v, r = make_inputs(2, 2, 1, 48, 8, 4, dtype=torch.float32)
    mask = padding_mask(2, 48, [0, 5])

    def f(q, k, v, r):
        return mita_attention(q, k, v, r, topk=6, key_padding_mask=mask, backend="cpu")

    eager = f(q, k, v, r)
    compiled = torch.compile(f, backend="aot_eager")(q, k, v, r)
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-6)
    for a, e in zip(_grads(compiled, [q, k, v, r]), _grads(eager, [q, k, v, r])):
        torch.testing.assert_close(a, e, atol=1e-6, rtol=1e-6)


@needs_tools
@pytest.mark.parametrize("s", [1, 2])
def test_custom_op_registrations_pass_opcheck(s):
    assert build.availability()[0]
    g = torch.Generator().manual_seed(1)
    b, h, n, d, m, k = 1, 2, 12, 4, 3, 5
    q, kk, v = (
        torch.randn(b, h, n, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)
    )
    qr = torch.randn(b, h, n, m, generator=g, dtype=torch.float64, requires_grad=True)
    a = torch.randn(b, h, m, d, generator=g, dtype=torch.float64, requires_grad=True)
    key_index = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(b * h * m)]).reshape(
        b, h, m, k
    )
    experts = qr.detach().topk(s, dim=-1).indices if s > 1 else None
    args = (q, kk, v, qr, a, key_index, experts, None, None, d**-0.5, 1.0 / d, True)
    torch.library.opcheck(cpu_attention, args)


@needs_tools
def test_topk_takes_the_largest_lowest_index_first_on_ties():
    assert build.availability()[0]
    g = torch.Generator().manual_seed(0)
    for n, k in ((197, 25), (40, 40), (1000, 7), (33, 1)):
        for dtype in (torch.float32, torch.float64):
            s = torch.randn(60, n, generator=g, dtype=dtype)
            s[:10] = torch.randint(0, 3, (10, n), generator=g).to(dtype)  # many ties
            s[10:20, -5:] = float("-inf")
            idx = cpu_topk(s, k)
            assert (idx.diff(dim=-1) > 0).all()  # increasing key index
            torch.testing.assert_close(
                s.gather(-1, idx).sort(-1).values, s.topk(k, -1).values.sort(-1).values
            )
    ties = torch.tensor([[1.0, 2.0, 2.0, 0.0, 2.0, 2.0]])
    assert cpu_topk(ties, 3).tolist() == [[1, 2, 4]]


def test_a_loaded_library_is_not_loaded_again_from_another_cache(fresh_state, tmp_path):
    """Once this process has the ops, a later availability check under another $MITA_CACHE (where a copy
    of the same build could sit) loads nothing: two copies of one op namespace abort the process."""
    assert build.availability()[0]
    build.reset_for_tests()
    fresh_state.setenv("MITA_CACHE", str(tmp_path))
    fresh_state.setattr(build, "_build", lambda lib: pytest.fail("loaded a second copy"))
    assert build.availability() == (True, "")
