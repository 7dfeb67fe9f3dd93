"""``MiTACache``: the per-layer decoding cache of causal MiTA (SPEC §5.8).

It keeps the full K, V (routed experts may pick any past key), per query head the landmarks of the
complete blocks, per landmark its shared value ``A_j`` with, for ``"prefix"``, its online-softmax state
(max, sum, numerator) and its top-k (indices and scores), and the queries of the current block. New
tokens are processed one block segment at a time: every query of a segment sees the same landmarks,
so a segment is one small batched attention over ``[landmarks] ++ [expert keys] ++ [own block]``.
Only after the last query of a block has its output is the block completed: ``"prefix"`` folds the
block's keys into every older landmark's state and top-k, then builds the new landmark (the mean of
the block's queries, exactly :func:`mita.landmarks.block_mean`) over all keys so far; ``"frozen"`` only
builds the new landmark. Storage grows geometrically (no ``torch.cat`` per token).

Per-token work is about ``(n_l + s k + b) d`` plus the amortised block update (``n_l b d`` to fold a
block in, ``N d`` to build a landmark), against ``N d`` for dense decoding.
"""

from __future__ import annotations

import torch

from ..arguments import as_experts, as_horizon, as_int, as_scale
from ..common import float32_if_half
from .common import merge_parts, partial_softmax
from .nonfinite import bad_tokens, finite_or_zero, poison


def _grow(buf: torch.Tensor | None, need: int, dim: int, template: torch.Tensor, fill: float = 0.0):
    """``buf`` with room for ``need`` entries along ``dim`` (capacity doubles; contents kept)."""
    have = 0 if buf is None else buf.shape[dim]
    if buf is not None and have >= need:
        return buf
    cap = max(need, 2 * have, 16)
    shape = list(template.shape)
    shape[dim] = cap
    new = torch.full(shape, fill, dtype=template.dtype, device=template.device)
    if buf is not None:
        new.narrow(dim, 0, have).copy_(buf)
    return new


class MiTACache:
    """Decoding cache of one causal MiTA layer; :meth:`append` returns the new tokens' outputs.

    ``cache.append(q, k, v)`` with q ``[B, H, T, d]``, k/v ``[B, Hkv, T, d / dv]`` (``T >= 1``, GQA
    with ``H % Hkv == 0``) returns ``[B, H, T, dv]``, the same as :func:`mita.mita_causal_attention`
    over everything appended so far with ``landmarks = block_mean(q, block_size)``; appending T tokens
    at once (chunked prefill) equals appending them one by one. Options as in ``mita_causal_attention``.
    Half-precision inputs are computed and stored in float32. ``append`` runs without autograd (decoding).
    """

    def __init__(
        self,
        topk: int,
        block_size: int = 64,
        landmark_horizon: str = "prefix",
        *,
        experts_per_query: int = 1,
        scale: float | None = None,
        landmark_scale: float | None = None,
        shared: bool = True,
        routed: bool = True,
    ) -> None:
        self.topk = as_int("topk", topk)
        self.block_size = as_int("block_size", block_size)
        self.experts_per_query = as_int("experts_per_query", experts_per_query)
        landmark_horizon = as_horizon(landmark_horizon)
        shared, routed = as_experts(shared, routed)
        self.horizon, self.shared, self.routed = landmark_horizon, shared, routed
        self._scale = as_scale("scale", scale)
        self._landmark_scale = as_scale("landmark_scale", landmark_scale)
        self.reset()

    def reset(self) -> None:
        """Forget everything appended (the options stay)."""
        self.length = 0  # tokens appended
        self.num_landmarks = 0  # complete blocks
        self._shape: tuple | None = None  # (B, H, Hkv, d, dv, dtype, device)
        self._k = self._v = None  # [B, Hkv, cap, d / dv]
        self._r = self._a = None  # [B, H, capL, d / dv]: landmarks and their shared values
        self._max = self._sum = self._num = None  # prefix online-softmax state [B, H, capL(, dv)]
        self._top_val = self._top_idx = None  # [B, H, capL, topk]: scores (prefix) and key indices
        self._qblock = None  # [B, H, b, d]: queries of the current block
        # Non-finite inputs (nonfinite.py): tokens are stored cleaned; these flags say which were not.
        self._bad_k = self._bad_v = None  # [B, Hkv, cap] per token
        self._bad_qblock = None  # [B, H, b]: per query of the current block
        self._bad_r = None  # [B, H, capL]: landmark j averages a non-finite query

    def __len__(self) -> int:
        return self.length

    @property
    def landmarks(self) -> torch.Tensor | None:
        """Landmarks of the complete blocks, ``[B, H, n_l, d]`` (None before the first append)."""
        if self._r is None:
            return None if self._qblock is None else self._qblock[:, :, :0]
        return self._r[:, :, : self.num_landmarks]

    def memory(self) -> dict[str, int | float]:
        """Bytes in use: ``kv_bytes`` (K and V of the tokens so far), ``extra_bytes`` (landmarks, their
        states and top-k, the current block's queries), ``extra_fraction`` (extra / kv) and
        ``allocated_bytes`` (all buffers at their current, geometrically grown, capacity)."""
        if self._k is None:
            return {"kv_bytes": 0, "extra_bytes": 0, "extra_fraction": 0.0, "allocated_bytes": 0}

        def used(t: torch.Tensor | None, n: int) -> int:
            return 0 if t is None else t[:, :, :n].numel() * t.element_size()

        kv = used(self._k, self.length) + used(self._v, self.length)
        nl = self.num_landmarks
        extra = sum(used(t, nl) for t in (self._r, self._a, self._max, self._sum, self._num))
        extra += used(self._top_val, nl) + used(self._top_idx, nl) + used(self._qblock, self.block_size)
        bufs = (self._k, self._v, self._r, self._a, self._max, self._sum, self._num, self._top_val,
                self._top_idx, self._qblock)  # fmt: skip
        alloc = sum(t.numel() * t.element_size() for t in bufs if t is not None)
        return {
            "kv_bytes": kv,
            "extra_bytes": extra,
            "extra_fraction": extra / max(1, kv),
            "allocated_bytes": alloc,
        }

    # ------------------------------------------------------------------ input checks
    def _check(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.is_floating_point():
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must be a floating-point tensor [B, heads, T, dim], got {got}")
            if t.dtype != q.dtype or t.device != q.device:
                raise ValueError(f"{name} must have q's dtype and device ({q.dtype}, {q.device})")
        b, h, t, d = q.shape
        if t < 1:
            raise ValueError(f"q must hold at least one new token, got shape {tuple(q.shape)}")
        if k.shape[:3] != v.shape[:3] or k.shape[0] != b or k.shape[2] != t or k.shape[3] != d:
            raise ValueError(
                f"k {tuple(k.shape)} and v {tuple(v.shape)} must be [B, Hkv, T, d] with q {tuple(q.shape)}"
            )
        hkv = k.shape[1]
        if hkv < 1 or h % hkv:
            raise ValueError(
                f"q heads ({h}) must be a multiple of k/v heads ({hkv}) for grouped-query attention"
            )
        shape = (b, h, hkv, d, v.shape[3], q.dtype, q.device)
        if self._shape is not None and shape != self._shape:
            raise ValueError(
                f"new tokens have (B, H, Hkv, d, dv, dtype, device) = {shape}, the cache holds {self._shape}"
            )
        self._shape = shape

    # ------------------------------------------------------------------ public step
    def append(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Append ``T >= 1`` new tokens; return their outputs ``[B, H, T, dv]``."""
        self._check(q, k, v)
        q, k, v = float32_if_half(q, k, v)
        with torch.no_grad():
            bad_q, bad_k, bad_v = bad_tokens(q), bad_tokens(k), bad_tokens(v)
            q, k, v = finite_or_zero(q, bad_q), finite_or_zero(k, bad_k), finite_or_zero(v, bad_v)
            outs, pos, t = [], 0, q.shape[2]
            while pos < t:  # one segment per block touched
                take = min(t - pos, self.block_size - self.length % self.block_size)
                seg = slice(pos, pos + take)
                outs.append(
                    self._segment(
                        q[:, :, seg],
                        k[:, :, seg],
                        v[:, :, seg],
                        bad_q[:, :, seg],
                        bad_k[:, :, seg],
                        bad_v[:, :, seg],
                    )
                )
                pos += take
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        return out.to(self._shape[5])

    # ------------------------------------------------------------------ internals
    def _segment(self, q, k, v, bad_q, bad_k, bad_v) -> torch.Tensor:
        bsz, h, t, d = q.shape
        hkv, dv, bs = k.shape[1], v.shape[3], self.block_size
        g = h // hkv
        c = self._scale if self._scale is not None else float(d) ** -0.5
        lam = self._landmark_scale if self._landmark_scale is not None else 1.0 / float(d)
        start, offset = self.length - self.length % bs, self.length % bs
        end = self.length + t
        self._k = _grow(self._k, end, 2, k)
        self._v = _grow(self._v, end, 2, v)
        self._k[:, :, self.length : end].copy_(k)
        self._v[:, :, self.length : end].copy_(v)
        self._bad_k = _grow(self._bad_k, end, 2, bad_k)
        self._bad_v = _grow(self._bad_v, end, 2, bad_v)
        self._bad_k[:, :, self.length : end] = bad_k
        self._bad_v[:, :, self.length : end] = bad_v
        if self._qblock is None:
            self._qblock = q.new_zeros(bsz, h, bs, d)
            self._bad_qblock = bad_q.new_zeros(bsz, h, bs)
        self._qblock[:, :, offset : offset + t].copy_(q)
        self._bad_qblock[:, :, offset : offset + t] = bad_q

        # Own block: keys start .. i, causal inside the segment.
        qg = q.view(bsz, hkv, g, t, d)
        kb, vb = self._k[:, :, None, start:end], self._v[:, :, None, start:end]
        logits = (qg @ kb.transpose(-1, -2)) * c  # [B, Hkv, g, t, offset + t]
        if t > 1:
            ii = torch.arange(t, device=q.device)[:, None] + offset
            logits = logits.masked_fill(
                torch.arange(end - start, device=q.device)[None, :] > ii, float("-inf")
            )
        lse, out = partial_softmax(logits, vb)
        parts = [(lse.view(bsz, h, t, 1), out.view(bsz, h, t, dv))]

        nl = self.num_landmarks
        reads = self._reads_bad(bad_q, start, offset, end)
        if nl > 0:
            r = self._r[:, :, :nl]
            qr = q @ r.transpose(-1, -2)  # [B, H, t, n_l]
            if self.shared:
                parts.append(partial_softmax(qr * lam, self._a[:, :, :nl]))
            if self.routed:
                lse_r, out_r, e, idx = self._routed(q, qr, c)
                parts.append((lse_r, out_r))
                if not self.shared:
                    reads = reads | self._routed_reads_bad(e, idx, start, end)
        out = poison(merge_parts(parts), reads)
        self.length = end
        if self.length % bs == 0:
            self._complete_block(c)
        return out

    def _routed(self, q: torch.Tensor, qr: torch.Tensor, c: float):
        bsz, h, t, d = q.shape
        hkv, kk, nl = self._k.shape[1], self.topk, self.num_landmarks
        s = min(self.experts_per_query, nl)
        e = qr.argmax(-1, keepdim=True) if s == 1 else qr.topk(s, dim=-1).indices  # [B, H, t, s]
        rows = e.reshape(bsz, h, t * s, 1).expand(-1, -1, -1, kk)
        idx = self._top_idx[:, :, :nl].gather(2, rows).view(bsz, h, t, s * kk).long()
        valid = idx >= 0
        dev = q.device
        kv_row = torch.arange(bsz, device=dev)[:, None] * hkv + torch.arange(h, device=dev) // (h // hkv)
        flat = (kv_row[:, :, None, None] * self._k.shape[2] + idx.clamp_min(0)).reshape(-1)
        kg = self._k.reshape(-1, d).index_select(0, flat).view(bsz * h * t, s * kk, d)
        vg = self._v.reshape(-1, self._v.shape[-1]).index_select(0, flat).view(bsz * h * t, s * kk, -1)
        logits = (q.reshape(bsz * h * t, 1, d) @ kg.transpose(1, 2)) * c
        logits = logits.masked_fill(~valid.view(bsz * h * t, 1, s * kk), float("-inf"))
        lse, out = partial_softmax(logits, vg)
        return lse.view(bsz, h, t, 1), out.view(bsz, h, t, -1), e, idx

    def _kv_flags(self, flags: torch.Tensor) -> torch.Tensor:
        """Per-token flags of the k/v heads, seen from every query head: [B, H, L]."""
        g = self._shape[1] // self._shape[2]
        return flags.repeat_interleave(g, dim=1) if g > 1 else flags

    def _reads_bad(self, bad_q: torch.Tensor, start: int, offset: int, end: int) -> torch.Tensor:
        """Rows of the segment that read a non-finite input through their query, their own block, the
        landmarks and (shared expert) every key/value before the block: [B, H, t]."""
        t = bad_q.shape[2]
        own = self._kv_flags(self._bad_k[:, :, start:end] | self._bad_v[:, :, start:end])
        own = own.to(torch.int32).cumsum(-1)[:, :, offset:] > 0  # t' <= i inside the block
        rows = bad_q | own
        nl = self.num_landmarks
        if nl > 0:
            rows = rows | self._bad_r[:, :, :nl].any(-1, keepdim=True).expand(-1, -1, t)
            if self.shared:
                before = self._bad_k[:, :, :start] | self._bad_v[:, :, :start]
                rows = rows | self._kv_flags(before).any(-1, keepdim=True)
        return rows

    def _routed_reads_bad(self, e: torch.Tensor, idx: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Without the shared expert: the keys each expert's top-k was chosen over and the values of the
        chosen keys. ``e`` [B, H, t, s] (the experts), ``idx`` [B, H, t, s * k] (their keys, -1 = none)."""
        bs = self.block_size
        bad_k = self._kv_flags(self._bad_k[:, :, :end])
        if self.horizon == "frozen":
            count = bad_k.to(torch.int32).cumsum(-1)
            stop = ((e + 1) * bs).flatten(2)  # keys t < (e + 1) b
            horizon = (count.gather(-1, stop - 1) > 0).view_as(e).any(-1)
        else:
            horizon = bad_k[:, :, :start].any(-1, keepdim=True).expand(*e.shape[:3])
        bad_v = self._kv_flags(self._bad_v[:, :, :end])
        v_hit = (bad_v.gather(2, idx.clamp_min(0).flatten(2)).view_as(idx) & (idx >= 0)).any(-1)
        return horizon | v_hit

    def _scores(self, r: torch.Tensor, lo: int, hi: int, c: float) -> torch.Tensor:
        """``c r . k_t`` for landmarks r [B, H, L, d] and keys lo..hi-1: [B, H, L, hi - lo]."""
        bsz, h, nr, d = r.shape
        hkv = self._k.shape[1]
        rk = r.reshape(bsz, hkv, (h // hkv) * nr, d)
        return ((rk @ self._k[:, :, lo:hi].transpose(-1, -2)) * c).view(bsz, h, nr, hi - lo)

    def _complete_block(self, c: float) -> None:
        bs, kk, nl = self.block_size, self.topk, self.num_landmarks
        end, start = self.length, self.length - bs
        vv = self._v
        hkv = vv.shape[1]
        prefix = self.horizon == "prefix"
        if prefix and nl > 0:  # fold this block's keys into every older landmark
            sc = self._scores(self._r[:, :, :nl], start, end, c)  # [B, H, n_l, b]
            if self.shared:
                self._fold(sc, start, end)
            if self.routed:
                self._merge_top(sc, start, end)
        # The new landmark: the mean of the block's queries, over all keys so far.
        r = self._qblock.mean(dim=2, keepdim=True)  # same reduction as block_mean
        bsz, h = r.shape[:2]
        self._r = _grow(self._r, nl + 1, 2, self._qblock)
        self._r[:, :, nl : nl + 1] = r
        bad_r = self._bad_qblock.any(-1, keepdim=True)  # block_mean of a non-finite query is not finite
        self._bad_r = _grow(self._bad_r, nl + 1, 2, bad_r)
        self._bad_r[:, :, nl : nl + 1] = bad_r
        sc = self._scores(r, 0, end, c)  # [B, H, 1, end]
        if self.shared:
            mx = sc.amax(-1)
            e = torch.exp(sc - mx[..., None])
            total = e.sum(-1)
            num = (e.view(bsz, hkv, -1, end) @ vv[:, :, :end]).view(bsz, h, 1, -1)
            self._a = _grow(self._a, nl + 1, 2, num)
            self._a[:, :, nl : nl + 1] = num / total[..., None]
            if prefix:
                self._max = _grow(self._max, nl + 1, 2, mx)
                self._sum = _grow(self._sum, nl + 1, 2, total)
                self._num = _grow(self._num, nl + 1, 2, num)
                self._max[:, :, nl : nl + 1], self._sum[:, :, nl : nl + 1] = mx, total
                self._num[:, :, nl : nl + 1] = num
        if self.routed:
            take = min(kk, end)
            top = sc.topk(take, dim=-1, sorted=False)
            idx = torch.full((bsz, h, 1, kk), -1, dtype=torch.int32, device=sc.device)
            idx[..., :take] = top.indices.to(torch.int32)
            self._top_idx = _grow(self._top_idx, nl + 1, 2, idx, fill=-1)
            self._top_idx[:, :, nl : nl + 1] = idx
            if prefix:
                val = sc.new_full((bsz, h, 1, kk), float("-inf"))
                val[..., :take] = top.values
                self._top_val = _grow(self._top_val, nl + 1, 2, val, fill=float("-inf"))
                self._top_val[:, :, nl : nl + 1] = val
        self.num_landmarks = nl + 1

    def _fold(self, sc: torch.Tensor, start: int, end: int) -> None:
        """Online-softmax update of the older landmarks' shared values with keys start..end-1."""
        nl = sc.shape[2]
        bsz, h = sc.shape[:2]
        hkv = self._v.shape[1]
        mb = sc.amax(-1)
        e = torch.exp(sc - mb[..., None])
        num_b = (e.view(bsz, hkv, -1, end - start) @ self._v[:, :, start:end]).view(bsz, h, nl, -1)
        old = self._max[:, :, :nl]
        new = torch.maximum(old, mb)
        keep, add = torch.exp(old - new), torch.exp(mb - new)
        self._sum[:, :, :nl] = self._sum[:, :, :nl] * keep + e.sum(-1) * add
        self._num[:, :, :nl] = self._num[:, :, :nl] * keep[..., None] + num_b * add[..., None]
        self._max[:, :, :nl] = new
        self._a[:, :, :nl] = self._num[:, :, :nl] / self._sum[:, :, :nl, None]

    def _merge_top(self, sc: torch.Tensor, start: int, end: int) -> None:
        """Merge keys start..end-1 (scores ``sc`` [B, H, n_l, b]) into the older landmarks' top-k.

        Only landmarks where some new key beats the current k-th best can change (few, once the
        context is long), so only those rows are merged; this one host sync per block is cheap here."""
        bsz, h, nl, bs = sc.shape
        kk = self.topk
        vals = self._top_val.view(bsz * h, -1, kk)
        idxs = self._top_idx.view(bsz * h, -1, kk)
        kth = vals[:, :nl].amin(-1)  # -inf while a set is not full
        rows = (sc.reshape(bsz * h, nl, bs) > kth[..., None]).any(-1).nonzero()
        if rows.numel() == 0:
            return
        bh, j = rows[:, 0], rows[:, 1]
        ar = torch.arange(start, end, device=sc.device, dtype=idxs.dtype)
        cand_val = torch.cat([vals[bh, j], sc.reshape(bsz * h, nl, bs)[bh, j]], dim=-1)
        cand_idx = torch.cat([idxs[bh, j], ar.expand(len(bh), bs)], dim=-1)
        top = cand_val.topk(kk, dim=-1, sorted=False)
        vals[bh, j] = top.values
        idxs[bh, j] = torch.where(top.values > float("-inf"), cand_idx.gather(-1, top.indices), -1)
