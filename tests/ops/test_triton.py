"""The Triton backend against the dense reference: forward, routing and every gradient.

CPU (CI): the kernels run in the Triton interpreter. ``triton.jit`` chooses between compiling and
interpreting when a function is *defined*, and ``import triton`` already defines its standard library
that way, so ``TRITON_INTERPRET=1`` must be set before triton is first imported in the process.
Setting it here at import time would leak into the rest of the suite (``triton_available()`` would
turn True on CPU) and would silently fail whenever something imported triton earlier (torch.compile
does). So :func:`test_kernels_in_the_interpreter` runs :class:`TestInterpreter` in a child pytest with
the variable set; its output is shown on failure. ``TRITON_INTERPRET=1 pytest tests/ops/test_triton.py``
runs those tests directly, one by one. Interpreter sizes are small (N <= 64, d <= 32): every program
runs in numpy. On a GPU, :class:`TestGPU` compares the compiled kernels at bf16/fp16/fp32.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

from mita import mita_attention
from mita.ops.triton import backend as triton_backend

from .helpers import make_inputs, padding_mask

triton = pytest.importorskip("triton", reason="triton is not installed (pip install 'mita[triton]')")
from triton.runtime.errors import OutOfResources  # noqa: E402

from mita.ops.triton import landmark, parallel, utils  # noqa: E402
from mita.ops.triton import utils as launch_mod  # noqa: E402
from mita.ops.triton.landmark import landmark_bwd, landmark_fwd  # noqa: E402
from mita.ops.triton.parallel import segment_sum  # noqa: E402
from mita.ops.triton.utils import launch  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def test_kernels_in_the_interpreter():
    if INTERPRETED:
        pytest.skip("already under TRITON_INTERPRET=1: TestInterpreter runs in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", __file__, "-k", "TestInterpreter", "-q", "-p", "no:cacheprovider"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"interpreter tests failed:\n{done.stdout[-8000:]}\n{done.stderr[-2000:]}"
    assert " passed" in done.stdout


@pytest.fixture
def deterministic(request):
    """Run a test with torch's deterministic mode on or off (it picks the dK/dV scatter)."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(request.param)
    yield request.param
    torch.use_deterministic_algorithms(before)


def _grads(out, inputs, weight):
    grads = torch.autograd.grad((out * weight).sum(), inputs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]


def _same_keys(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Top-k index sets agree (``topk(sorted=False)`` may list them in any order)."""
    return torch.equal(a.sort(-1).values, b.sort(-1).values)


def _check(q, k, v, r, *, atol, rtol, ref_inputs=None, **kw):
    """Compare forward, routing and the four gradients of backend='triton' with backend='reference'.

    ``ref_inputs`` (float32 copies of half inputs) lets the reference run at full precision.
    """
    out, rt = mita_attention(q, k, v, r, backend="triton", return_routing=True, **kw)
    rq, rk, rv, rr = ref_inputs if ref_inputs is not None else (q, k, v, r)
    ref, rt_ref = mita_attention(rq, rk, rv, rr, backend="reference", return_routing=True, **kw)
    assert out.dtype == q.dtype and out.shape == ref.shape
    assert torch.equal(rt.expert_index, rt_ref.expert_index)
    assert _same_keys(rt.key_index, rt_ref.key_index)
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)
    weight = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float32)
    got = _grads(out, [q, k, v, r], weight.to(out.device, out.dtype))
    want = _grads(ref, [rq, rk, rv, rr], weight.to(ref.device, ref.dtype))
    for name, a, e in zip(("q", "k", "v", "landmarks"), got, want):
        assert a.dtype == e.dtype or ref_inputs is not None
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(
            a.float(), e.float(), atol=atol, rtol=rtol, msg=lambda m, name=name: f"grad {name}: {m}"
        )


# (B, H, Hkv, N, d, m, k, pad): N is not a multiple of m, of the tile (16) or of the key block.
CASES = {
    "basic": (2, 2, 2, 37, 16, 4, 7, None),
    "m1": (1, 2, 2, 29, 16, 1, 6, None),
    "k_eq_n": (1, 2, 2, 23, 16, 3, 23, None),
    "gqa": (1, 4, 2, 30, 16, 3, 6, None),
    "mqa": (2, 4, 1, 20, 16, 2, 5, None),
    "padding": (3, 2, 2, 26, 16, 4, 5, [0, 4, 11]),
    "padding_fewer_valid_than_k": (2, 2, 1, 20, 16, 3, 9, [2, 15]),
    "d32_many_tiles": (1, 1, 1, 64, 32, 2, 8, None),
}

F32 = dict(atol=2e-5, rtol=2e-5)


@pytest.mark.skipif(not INTERPRETED, reason="runs in a TRITON_INTERPRET=1 child (see the module docstring)")
class TestInterpreter:
    @pytest.mark.parametrize("case", sorted(CASES))
    def test_matches_reference_float32(self, case):
        b, h, hkv, n, d, m, k, pad = CASES[case]
        q, kk, v, r = make_inputs(b, h, hkv, n, d, m, dtype=torch.float32, seed=len(case))
        mask = padding_mask(b, n, pad) if pad else None
        _check(q, kk, v, r, topk=k, key_padding_mask=mask, **F32)

    def test_multi_block_loops_match_reference(self, monkeypatch):
        # Blocks capped at 16: 2 landmark blocks (m = 18), 3 routed-key blocks (k = 33), 3 key/query
        # blocks in the landmark, routing and shared kernels; padding on top.
        monkeypatch.setattr(utils, "BLOCK_CAP", 16)
        q, k, v, r = make_inputs(1, 1, 1, 36, 16, 18, dtype=torch.float32, seed=12)
        _check(q, k, v, r, topk=33, key_padding_mask=padding_mask(1, 36, [2]), **F32)

    # The grid above runs the default atomic dK/dV scatter; these run the deterministic one where keys
    # collect contributions from many tiles (MQA) and where padded keys are selected.
    @pytest.mark.parametrize("deterministic", [True], indirect=True)
    @pytest.mark.parametrize("case", ["mqa", "padding_fewer_valid_than_k"])
    def test_deterministic_scatter_matches_reference(self, case, deterministic):
        b, h, hkv, n, d, m, k, pad = CASES[case]
        q, kk, v, r = make_inputs(b, h, hkv, n, d, m, dtype=torch.float32, seed=7)
        mask = padding_mask(b, n, pad) if pad else None
        _check(q, kk, v, r, topk=k, key_padding_mask=mask, **F32)

    @pytest.mark.parametrize("deterministic", [True], indirect=True)
    def test_deterministic_mode_is_bitwise_reproducible(self, deterministic):
        # MQA with many landmarks: the same key is picked by several experts and heads.
        q, k, v, r = make_inputs(1, 2, 1, 24, 16, 4, dtype=torch.float32, seed=3)
        weight = torch.randn(1, 2, 24, 16)
        runs = [
            _grads(mita_attention(q, k, v, r, topk=12, backend="triton"), [q, k, v, r], weight) for _ in "ab"
        ]
        for a, b in zip(*runs):
            assert torch.equal(a, b)

    @pytest.mark.parametrize("splits,score_bytes", [(1, 1 << 28), (3, 1)], ids=["whole", "split_chunked"])
    def test_landmark_kernels_match_formula(self, splits, score_bytes):
        # GQA (4 query heads on 2 kv heads); padding covers the whole last key chunk when split in 3;
        # score_bytes=1 forces one head per pass through the score buffer.
        g = torch.Generator().manual_seed(8)
        q, k, v, r = make_inputs(2, 4, 2, 150, 16, 3, dtype=torch.float32, seed=8)
        mask = padding_mask(2, 150, [0, 86])
        u8 = mask.to(torch.uint8)
        with torch.no_grad():
            keys, values, lse = landmark_fwd(r, k, v, u8, 0.25, 9, splits=splits, score_bytes=score_bytes)
        kh, vh = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        scores = (r @ kh.transpose(-1, -2) * 0.25).masked_fill(mask[:, None, None, :], float("-inf"))
        want = torch.softmax(scores, -1) @ vh
        assert _same_keys(keys, scores.topk(9, dim=-1).indices)
        torch.testing.assert_close(lse, torch.logsumexp(scores, -1).detach(), **F32)
        torch.testing.assert_close(values, want.detach(), **F32)
        # Backward given dA: compare with autograd through the formula above.
        d_values = torch.randn(values.shape, generator=g)
        dk, dv = torch.zeros(k.shape), torch.zeros(v.shape)
        dr = landmark_bwd(r, k, v, u8, 0.25, values, lse, d_values, dk, dv, splits=splits)
        for name, got, exp in zip("rkv", (dr, dk, dv), torch.autograd.grad(want, (r, k, v), d_values)):
            torch.testing.assert_close(got, exp, msg=lambda m, name=name: f"d{name}: {m}", **F32)

    def test_segment_sum_adds_rows_by_target(self):
        g = torch.Generator().manual_seed(6)
        src = torch.randn(40, 20, generator=g)
        target = torch.randint(0, 9, (40,), generator=g)  # 9 rows, some of them never hit
        want = torch.zeros(12, 20, dtype=torch.float64).index_add_(0, target, src.double())
        got = segment_sum(src, target, 12)
        torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-6)
        assert not got[9:].any()

    @pytest.mark.parametrize("which", ["shared_only", "routed_only"])
    def test_ablations_match_reference(self, which):
        q, k, v, r = make_inputs(2, 2, 1, 27, 16, 3, dtype=torch.float32, seed=5)
        mask = padding_mask(2, 27, [0, 6])
        shared = which == "shared_only"
        _check(q, k, v, r, topk=6, key_padding_mask=mask, shared=shared, routed=not shared, **F32)

    def test_scales_value_dim_and_cross_length(self):
        # dv != d, N_q != N_kv, and both scale options set explicitly (the paper's d^-1/2 for lambda).
        g = torch.Generator().manual_seed(11)
        q = torch.randn(2, 2, 19, 16, generator=g).requires_grad_()
        k = torch.randn(2, 1, 33, 16, generator=g).requires_grad_()
        v = torch.randn(2, 1, 33, 24, generator=g).requires_grad_()
        r = torch.randn(2, 2, 3, 16, generator=g).requires_grad_()
        _check(q, k, v, r, topk=5, scale=0.3, landmark_scale=16**-0.5, **F32)

    def test_float16_matches_float32_reference(self):
        q, k, v, r = make_inputs(2, 2, 2, 32, 16, 4, dtype=torch.float32, seed=9, requires_grad=False)
        half = [t.half().requires_grad_() for t in (q, k, v, r)]
        full = [t.detach().float().requires_grad_() for t in half]  # same values, float32 reference
        _check(*half, topk=6, ref_inputs=full, atol=2e-3, rtol=1e-2)

    def test_bfloat16_is_skipped_in_the_interpreter(self):
        pytest.skip("bfloat16 is not emulated faithfully by the Triton interpreter (numpy has no bf16)")

    def test_two_experts_per_query_falls_back_to_torch_once(self, monkeypatch):
        monkeypatch.setattr(triton_backend, "_warned", set())
        q, k, v, r = make_inputs(1, 2, 2, 20, 16, 4, dtype=torch.float32, seed=2, requires_grad=False)
        with pytest.warns(UserWarning, match="experts_per_query=2"):
            out = mita_attention(q, k, v, r, topk=5, experts_per_query=2, dedup=True, backend="triton")
        want = mita_attention(q, k, v, r, topk=5, experts_per_query=2, dedup=True, backend="torch")
        assert torch.equal(out, want)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the second call must not warn again
            mita_attention(q, k, v, r, topk=5, experts_per_query=2, backend="triton")

    def test_float64_falls_back_to_torch(self, monkeypatch):
        monkeypatch.setattr(triton_backend, "_warned", set())
        q, k, v, r = make_inputs(1, 1, 1, 16, 16, 2, dtype=torch.float64, seed=4, requires_grad=False)
        with pytest.warns(UserWarning, match="float64"):
            out = mita_attention(q, k, v, r, topk=4, backend="triton")
        assert torch.equal(out, mita_attention(q, k, v, r, topk=4, backend="torch"))

    def test_available_under_the_interpreter(self):
        ok, why = triton_backend.availability()
        assert ok and why


class TestAvailability:
    def test_no_cuda_and_no_interpreter_says_why(self, monkeypatch):
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        ok, why = triton_backend.availability()
        assert not ok and "no CUDA device" in why and "TRITON_INTERPRET=1" in why

    def test_missing_triton_says_how_to_install(self, monkeypatch):
        monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
        ok, why = triton_backend.availability()
        assert not ok and "pip install" in why and "triton" in why

    @pytest.mark.skipif(INTERPRETED, reason="the kernels are interpreted in this process")
    def test_cpu_tensors_without_interpreter_raise(self, monkeypatch):
        monkeypatch.setattr(triton_backend, "availability", lambda: (True, "forced for the test"))
        q, k, v, r = make_inputs(1, 1, 1, 16, 16, 2, dtype=torch.float32, requires_grad=False)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            mita_attention(q, k, v, r, topk=4, backend="triton")


class TestLaunchFallback:
    def test_retries_lighter_configs_on_out_of_resources_and_remembers(self):
        calls = []

        class FakeKernel:  # needs <= 1 pipeline stage and BLOCK_K <= 32 to "fit"
            def __getitem__(self, grid):
                def run(*args, **kw):
                    calls.append(kw)
                    if kw.get("num_stages", 3) > 1 or kw["BLOCK_K"] > 32:
                        raise OutOfResources(300_000, 232_448, "shared memory")

                return run

        kernel = FakeKernel()
        consts = {"BLOCK_K": 64, "BLOCK_T": 64}
        launch_mod.launch(kernel, (1,), {}, consts, loop_blocks=("BLOCK_K",))
        assert calls == [consts, {**consts, "num_stages": 1}, {"BLOCK_K": 32, "BLOCK_T": 64, "num_stages": 1}]
        launch_mod.launch(kernel, (1,), {}, consts, loop_blocks=("BLOCK_K",))
        assert len(calls) == 4 and calls[-1] == calls[2]  # the working config is reused directly

    def test_gives_up_after_the_last_config(self):
        class NeverFits:
            def __getitem__(self, grid):
                def run(*args, **kw):
                    raise OutOfResources(1, 0, "shared memory")

                return run

        with pytest.raises(OutOfResources):
            launch(NeverFits(), (1,), {}, {"BLOCK_K": 16})


def _aot_jobs(dt: str, d: int) -> list:
    """(kernel, signature, constexprs, num_warps) for every kernel at head dim d and input dtype dt."""
    x, prec = "*" + dt, "ieee" if dt == "fp32" else "tf32"
    types = dict.fromkeys(["Q", "K", "V", "R", "O", "DO"], x)
    types.update(dict.fromkeys(["KEYS", "TILE_EXPERT", "TILE_ROWS", "EXPERT", "ORDER", "OFFSETS"], "*i64"))
    types.update(MASK="*u8", TILE_OK="*u8", scale="fp32", lam="fp32")
    f32 = ["A", "LSE", "S", "DELTA", "DQ", "DK", "DV_", "DA", "DL", "DR", "SRC", "OUT"]
    types.update(dict.fromkeys(f32, "*fp32"))
    dims = dict(D=d, DV=d, BLOCK_D=d, BLOCK_DV=d, PREC=prec, HAS_MASK=True, SHARED=True, ROUTED=True)
    blocks = dict(BLOCK_T=64, BLOCK_M=64, BLOCK_K=64, BLOCK_N=64, BLOCK_R=16, BLOCK_W=d, ATOMIC=True)
    kernels = [
        (parallel.attn_fwd_kernel.fn, 8), (parallel.attn_bwd_kernel.fn, 8),  # .fn: inside triton.heuristics
        (landmark.landmark_fwd_kernel.fn, 4), (landmark.landmark_bwd_kv_kernel.fn, 4),
        (landmark.landmark_bwd_r_kernel.fn, 4), (parallel.route_kernel, 4),
        (parallel.shared_bwd_kernel, 4), (parallel.segment_sum_kernel, 4),
    ]  # fmt: skip
    jobs = []
    for kernel, warps in kernels:
        consts = {a: v for a, v in {**dims, **blocks}.items() if a in kernel.arg_names}
        sig = {a: "constexpr" if a in consts else types.get(a, "i32") for a in kernel.arg_names}
        jobs.append((kernel, sig, consts, warps))
    return jobs


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETED, reason="the kernels are interpreted in this process")
@pytest.mark.parametrize("dt,d", [("bf16", 128), ("fp16", 64), ("fp32", 32)])
def test_kernels_compile_for_h100_without_a_gpu(dt, d):
    """Ahead-of-time compile every kernel for sm_90 (triton ships ptxas; no driver needed): catches
    what the interpreter cannot (type rules of the compiler, layouts, shared-memory size)."""
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415 - ahead-of-time compile checks only
    from triton.compiler import ASTSource  # noqa: PLC0415

    h100_shared = 232_448  # bytes of shared memory one block may use on an H100
    for kernel, sig, consts, warps in _aot_jobs(dt, d):
        try:
            compiled = triton.compile(
                ASTSource(kernel, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                options={"num_warps": warps},
            )  # fmt: skip
        except RuntimeError as err:  # e.g. no ptxas for this platform in the triton wheel
            if "ptxas" in str(err):
                pytest.skip(f"triton cannot assemble for sm_90 here: {err}")
            raise
        assert compiled.metadata.shared <= h100_shared, (kernel.fn.__name__, compiled.metadata.shared)


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETED, reason="the kernels are interpreted in this process")
def test_kernels_without_a_mask_compile_for_h100():
    """``MASK=None`` is what an unmasked call launches (``HAS_MASK`` False by ``triton.heuristics``): the
    kernels must compile with the pointer specialised away, at the largest configuration (bf16, d = 128)."""
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415 - ahead-of-time compile checks only
    from triton.compiler import ASTSource  # noqa: PLC0415

    masked = [job for job in _aot_jobs("bf16", 128) if "MASK" in job[0].arg_names]
    assert len(masked) == 5  # tile forward/backward and the three landmark kernels
    for kernel, sig, consts, warps in masked:
        source = ASTSource(
            kernel, {**sig, "MASK": "constexpr"}, constexprs={**consts, "HAS_MASK": False, "MASK": None}
        )
        try:
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        except RuntimeError as err:
            if "ptxas" in str(err):
                pytest.skip(f"triton cannot assemble for sm_90 here: {err}")
            raise
        assert compiled.metadata.shared <= 232_448, (kernel.fn.__name__, compiled.metadata.shared)


GPU_CASES = {
    "gqa_pad": (2, 4, 2, 300, 4, 16, [0, 37]),
    "mqa": (1, 8, 1, 513, 7, 33, None),
    "wide": (1, 2, 2, 1000, 64, 64, [100]),
}
GPU_TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (3e-3, 2e-2), torch.bfloat16: (2e-2, 5e-2)}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(INTERPRETED, reason="the kernels are interpreted in this process")
class TestGPU:
    @pytest.mark.parametrize("deterministic", [True, False], indirect=True, ids=["deterministic", "atomic"])
    @pytest.mark.parametrize("case", sorted(GPU_CASES))
    @pytest.mark.parametrize("d", [32, 64, 128])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
    def test_matches_reference(self, dtype, d, case, deterministic):
        b, h, hkv, n, m, k, pad = GPU_CASES[case]
        q, kk, v, r = make_inputs(b, h, hkv, n, d, m, dtype=torch.float32, seed=d, requires_grad=False)
        low = [t.cuda().to(dtype).requires_grad_() for t in (q, kk, v, r)]
        full = [t.detach().float().requires_grad_() for t in low]
        mask = padding_mask(b, n, pad).cuda() if pad else None
        atol, rtol = GPU_TOL[dtype]
        _check(*low, topk=k, key_padding_mask=mask, ref_inputs=full, atol=atol, rtol=rtol)

    @pytest.mark.parametrize("n", [8192, 65536])
    def test_large_n_matches_torch_backend(self, n):
        # bf16, d = 128, m = k = 64. Both backends score keys in float32 but sum in different orders,
        # so at large N a landmark's k-th and (k+1)-th keys may swap on a near-tie: require almost all
        # key sets to agree and compare outputs/dQ exactly on the queries whose expert agrees.
        inputs = make_inputs(1, 4, 2, n, 128, 64, dtype=torch.float32, requires_grad=False)
        lows = [t.cuda().bfloat16().requires_grad_() for t in inputs]
        out, rt = mita_attention(*lows, topk=64, backend="triton", return_routing=True)
        want, rt_w = mita_attention(*lows, topk=64, backend="torch", return_routing=True)
        assert torch.equal(rt.expert_index, rt_w.expert_index)
        agree = (rt.key_index.sort(-1).values == rt_w.key_index.sort(-1).values).all(-1)  # [B, H, m]
        assert agree.float().mean() >= 0.98
        rows = agree.gather(2, rt.expert_index[..., 0])  # [B, H, N]
        torch.testing.assert_close(out[rows].float(), want[rows].float(), atol=2e-2, rtol=5e-2)
        weight = torch.randn_like(out)
        g_t = torch.autograd.grad((out * weight).sum(), lows)
        g_w = torch.autograd.grad((want * weight).sum(), lows)
        torch.testing.assert_close(g_t[0][rows].float(), g_w[0][rows].float(), atol=5e-2, rtol=5e-2)
        for a, e in zip(g_t[1:], g_w[1:]):  # K, V, R: a swapped key moves little mass in aggregate
            assert ((a.float() - e.float()).norm() / e.float().norm()) < 3e-2
