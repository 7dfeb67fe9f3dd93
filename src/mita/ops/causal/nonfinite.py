"""Non-finite inputs in causal MiTA: excluded by selection, never multiplied by zero.

The formulas of SPEC §5 hide a future or masked position by giving it weight 0, and ``0 * NaN`` is NaN:
written literally, one NaN or Inf in token ``p`` would reach outputs before ``p``. mita defines instead:

    an output row is NaN exactly when the row reads a non-finite input; every other row is computed as
    if the non-finite values were absent (bitwise), and poisoned rows pass no gradient.

Row ``i`` (query block ``beta``) reads its query ``q_i``; the keys and values of its own block up to
``i``; the landmarks ``j < beta`` (routing and the shared logits); with the shared expert, every key and
value before its block (each ``A_j``, and ``A_{beta-1}`` sees all of them); without it, the keys its
experts' top-k was selected over (``"frozen"``: ``t < (e + 1) b``; ``"prefix"``: ``t < beta b``) and the
values of the selected keys. A token counts as non-finite when any of its features is.

Every causal backend (and :class:`~mita.ops.causal.MiTACache`) runs on :func:`finite_or_zero` copies of
its inputs and NaN-fills the rows :func:`poisoned_rows` names, so all of them agree.
"""

from __future__ import annotations

import torch

from .common import CausalProblem, CausalRouting


def bad_tokens(x: torch.Tensor) -> torch.Tensor:
    """``[..., N]`` bool: the token's feature vector holds a NaN or Inf. (``x - x`` is 0 where finite and NaN
    elsewhere, and a sum of zeros cannot overflow: one pass, several times cheaper than ``isfinite``.)"""
    with torch.no_grad():
        return torch.isnan((x - x).sum(-1))


def finite_or_zero(x: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """``x`` with the tokens ``bad`` (from :func:`bad_tokens`) zeroed, by selection: no gradient reaches
    them."""
    return x.masked_fill(bad[..., None], 0.0)


def _count(flags: torch.Tensor) -> torch.Tensor:
    """Inclusive running count of the flags along the last dim."""
    return flags.to(torch.int32).cumsum(-1)


def _before(counts: torch.Tensor, stop: torch.Tensor) -> torch.Tensor:
    """How many flags lie at positions ``< stop`` (``stop`` int64 [L'] or [..., L'], 0 allowed), from the
    inclusive running count ``counts`` [..., L]."""
    idx = (stop - 1).clamp_min(0)
    got = counts.gather(-1, idx.expand(*counts.shape[:-1], idx.shape[-1]))
    return torch.where(stop > 0, got, 0)


def poisoned_rows(
    p: CausalProblem,
    bad_q: torch.Tensor,
    bad_k: torch.Tensor,
    bad_v: torch.Tensor,
    bad_r: torch.Tensor,
    routing: CausalRouting | None,
) -> torch.Tensor:
    """``[B, H, N]`` bool: the rows that read a non-finite input (module docstring).

    ``bad_q`` [B, H, N], ``bad_k`` / ``bad_v`` [B, Hkv, N], ``bad_r`` [B, H, n_l]; ``routing`` (computed
    on the cleaned inputs) is needed only without the shared expert."""
    n, b, nl, g = p.seq_len, p.block_size, p.num_landmarks, p.group
    dev = bad_q.device
    bk = bad_k.repeat_interleave(g, dim=1) if g > 1 else bad_k
    bv = bad_v.repeat_interleave(g, dim=1) if g > 1 else bad_v
    pos = torch.arange(n, device=dev)
    block_start = pos // b * b
    kv_count = _count(bk | bv)  # bad k/v tokens at t <= i
    # Own block: a bad k/v at block_start <= t <= i.
    rows = bad_q | (kv_count > _before(kv_count, block_start))
    if nl == 0:
        return rows
    beta = pos // b
    rows = rows | (_before(_count(bad_r), beta) > 0)  # landmarks j < beta
    if p.shared:
        return rows | (_before(kv_count, block_start) > 0)  # every k/v before the block
    assert routing is not None, "routing is needed to know what a routed-only row reads"
    e = routing.expert_index  # [B, H, N, s], -1 = none
    has = e >= 0
    k_count = _count(bk)
    s, kk = p.experts_per_query, routing.key_index.shape[-1]
    if p.horizon == "frozen":
        stop = (e.clamp_min(0) + 1) * b  # [B, H, N, s]
        horizon = _before(k_count, stop.flatten(2)).view_as(e) > 0
        set_row = e.clamp_min(0)  # row of key_index [B, H, n_l, kk]
    else:
        horizon = (_before(k_count, block_start) > 0)[..., None].expand_as(e)
        set_row = beta[:, None] * nl + e.clamp_min(0)  # row of key_index [B, H, nq * n_l, kk]
    table = routing.key_index.reshape(*e.shape[:2], -1, kk)
    rows_idx = set_row.reshape(*e.shape[:2], n * s, 1).expand(-1, -1, -1, kk)
    chosen = table.gather(2, rows_idx)  # [B, H, N * s, kk]
    flat = chosen.clamp_min(0).reshape(*chosen.shape[:2], -1)
    v_hit = (bv.gather(2, flat).view_as(chosen) & (chosen >= 0)).any(-1).view_as(e)
    reads = (horizon | v_hit) & has
    return rows | reads.any(-1)


def poison(out: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """NaN in the rows ``rows`` [B, H, N] of ``out`` [B, H, N, dv]; they pass no gradient."""
    return out.masked_fill(rows[..., None], float("nan"))
