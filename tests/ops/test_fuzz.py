"""Property-based fuzzing of every CPU backend against the reference (hypothesis; a bounded example count
keeps it to about a minute). Shapes from N = 1 up, topk up to N, m > N, GQA ratios, odd head dims,
strided and expanded views, float32/float64, padding masks; values normal, huge, tied, denormal, or
with NaN/Inf. Finite inputs: outputs and every gradient agree with the reference. Non-finite inputs:
the same entries are non-finite, and nothing crashes or reads out of bounds (the sanitizer job runs
this file too)."""

from __future__ import annotations

import os

import pytest
import torch

from mita import mita_attention, mita_causal_attention
from mita.landmarks import block_mean

from .helpers import CPU

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies
given, settings, HealthCheck = hypothesis.given, hypothesis.settings, hypothesis.HealthCheck

BACKENDS = ["torch"] + ([] if CPU.marks[0].args[0] else ["cpu"])
KINDS = ("normal", "huge", "ties", "denormal", "nonfinite")
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
EXAMPLES = int(os.environ.get("MITA_FUZZ_EXAMPLES", "100"))  # fewer in the sanitizer/target builds


def _values(draw, shape, kind: str, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    if kind == "huge":
        # float32: logits up to ~1e3; beyond ~1e5 the log-sum-exp that every fused backward recomputes
        # probabilities from has an ulp above 0.01 (as in flash attention), so gradients drift.
        x = x * (1e4 if dtype == torch.float64 else 10.0)
    elif kind == "ties":
        x = x.round().clamp(-1, 1)  # three values: many exact ties in every score
    elif kind == "denormal":
        x = x * (1e-41 if dtype == torch.float32 else 1e-310)
    x = x.to(dtype)
    if kind == "nonfinite" and x.numel():
        flat = x.view(-1)
        for _ in range(draw(st.integers(1, 2))):
            bad = draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
            flat[draw(st.integers(0, flat.numel() - 1))] = bad
    return x


def _layout(draw, x: torch.Tensor) -> torch.Tensor:
    """The same values as a contiguous tensor, a transposed-back view or (one head) an expanded view."""
    how = draw(st.sampled_from(["contiguous", "strided", "expanded"]))
    if how == "strided":
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if how == "expanded" and x.shape[1] > 1:
        return x[:, :1].expand_as(x)
    return x


@st.composite
def problems(draw):
    b, hkv, g = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 3]))
    n, d = draw(st.integers(1, 40)), draw(st.sampled_from([1, 3, 8, 17, 33]))
    m = draw(st.integers(1, n + 3))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    kind = draw(st.sampled_from(KINDS))
    seed = draw(st.integers(0, 2**16))
    q = _layout(draw, _values(draw, (b, hkv * g, n, d), kind, dtype, seed))
    k = _layout(draw, _values(draw, (b, hkv, n, d), kind, dtype, seed + 1))
    v = _layout(draw, _values(draw, (b, hkv, n, d), kind, dtype, seed + 2))
    r = _values(draw, (b, hkv * g, m, d), "normal" if kind == "nonfinite" else kind, dtype, seed + 3)
    mask = None
    if n > 1 and draw(st.booleans()):
        mask = torch.rand(b, n, generator=torch.Generator().manual_seed(seed)) < 0.3
        mask[:, draw(st.integers(0, n - 1))] = False  # every row keeps a real key
    opts = dict(
        topk=draw(st.integers(1, n)),
        experts_per_query=draw(st.integers(1, min(m, 3))),
        shared=draw(st.booleans()),
        key_padding_mask=mask,
    )
    if not opts["shared"]:
        opts["routed"] = True
    return q, k, v, r, opts, kind


def _check(out, ref, kind, dtype):
    assert out.shape == ref.shape
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref))
    if kind in ("ties", "denormal", "nonfinite"):
        # Tied scores (denormal products underflow to exact ties) may select other, equally ranked keys;
        # non-finite inputs: the pattern above is the property.
        return
    tol = dict(rtol=2e-4, atol=2e-4) if dtype == torch.float32 else dict(rtol=1e-7, atol=1e-9)
    if kind == "huge":  # large logits: the log-sum-exp's rounding shows in near-zero gradients
        tol = {key: max(val, 1e-6 if dtype == torch.float64 else 2e-3) for key, val in tol.items()}
    torch.testing.assert_close(out, ref, **tol)


@settings(max_examples=EXAMPLES, **SETTINGS)
@given(problems())
def test_every_backend_agrees_with_the_reference(problem):
    q, k, v, r, opts, kind = problem
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, r)]
    ref = mita_attention(*leaves, backend="reference", **opts)
    grads_ref = None
    if kind not in ("ties", "denormal", "nonfinite"):
        grads_ref = torch.autograd.grad(ref.sum(), leaves, allow_unused=True)
    for backend in BACKENDS:
        x = [t.detach().clone().requires_grad_() for t in (q, k, v, r)]
        out, routing = mita_attention(*x, backend=backend, return_routing=True, **opts)
        e, ki = routing.expert_index, routing.key_index
        assert ((e >= 0) & (e < r.shape[2])).all() and ((ki >= 0) & (ki < k.shape[2])).all()
        _check(out.detach(), ref.detach(), kind, q.dtype)
        if grads_ref is not None:
            grads = torch.autograd.grad(out.sum(), x, allow_unused=True)
            for got, want in zip(grads, grads_ref):
                if want is None or got is None:
                    assert (want is None or not want.any()) and (got is None or not got.any())
                    continue
                _check(got, want, kind, q.dtype)


@st.composite
def causal_problems(draw):
    b, hkv, g = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.sampled_from([1, 2]))
    n, d, bs = draw(st.integers(1, 40)), draw(st.sampled_from([1, 5, 8, 17])), draw(st.integers(1, 12))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    kind = draw(st.sampled_from(KINDS))
    seed = draw(st.integers(0, 2**16))
    q = _values(draw, (b, hkv * g, n, d), kind, dtype, seed)
    k = _values(draw, (b, hkv, n, d), kind, dtype, seed + 1)
    v = _values(draw, (b, hkv, n, d), kind, dtype, seed + 2)
    opts = dict(
        topk=draw(st.integers(1, n + 8)),  # topk may exceed the visible keys
        block_size=bs,
        landmark_horizon=draw(st.sampled_from(["prefix", "frozen"])),
        experts_per_query=draw(st.integers(1, 3)),
        shared=draw(st.booleans()),
    )
    return q, k, v, opts, kind


@settings(max_examples=max(1, EXAMPLES * 3 // 5), **SETTINGS)
@given(causal_problems())
def test_every_causal_backend_agrees_with_the_reference(problem):
    q, k, v, opts, kind = problem
    r = block_mean(q, opts["block_size"])
    ref = mita_causal_attention(q, k, v, r, backend="reference", **opts)
    for backend in BACKENDS:
        if backend == "cpu" and opts["landmark_horizon"] != "frozen":
            continue
        out = mita_causal_attention(q, k, v, r, backend=backend, **opts)
        _check(out, ref, kind, q.dtype)
