"""Independent dense re-statements of every attention formula, written from the definitions.

Loops over batch, heads and queries; meant for float64 comparisons on small inputs only.
"""

from __future__ import annotations

import math

import torch


def windows(n: int, m: int) -> list[tuple[int, int]]:
    """Adaptive pooling windows ``[floor(j n / m), ceil((j + 1) n / m))``."""
    return [((j * n) // m, -(-((j + 1) * n) // m)) for j in range(m)]


def pool_seq(x: torch.Tensor, m: int) -> torch.Tensor:
    """[L, d] -> [m, d] window means."""
    return torch.stack([x[a:b].mean(0) for a, b in windows(x.shape[0], m)])


def pool_grid(x: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """[h*w, d] raster tokens -> [mh*mw, d] 2-D window means (raster order)."""
    h, w = grid
    img = x.reshape(h, w, -1)
    out = []
    for r0, r1 in windows(h, size[0]):
        for c0, c1 in windows(w, size[1]):
            out.append(img[r0:r1, c0:c1].reshape(-1, x.shape[-1]).mean(0))
    return torch.stack(out)


def mita_head(q, k, v, r, topk, s=1, lam=None, c=None, pad=None, shared=True, routed=True, dedup=False):
    """SPEC §2 for one (batch, head): q, k, v [N, d], landmarks r [m, d]; pad [N] bool or None."""
    n, d = q.shape
    lam = 1.0 / d if lam is None else lam
    c = d**-0.5 if c is None else c
    pad = torch.zeros(n, dtype=torch.bool) if pad is None else pad
    scores = (r @ k.T) * c
    scores[:, pad] = -math.inf
    chosen = scores.topk(topk, dim=1).indices  # [m, k]
    a = torch.softmax(scores, dim=1) @ v  # [m, dv]
    experts = (q @ r.T).topk(s, dim=1).indices  # [N, s]
    out = torch.empty(n, v.shape[1], dtype=q.dtype)
    for i in range(n):
        logits, vals = [], []
        if shared:
            logits.append(q[i] @ r.T * lam)
            vals.append(a)
        if routed:
            seen: set[int] = set()
            for e in experts[i]:
                idx = chosen[e]
                lg = q[i] @ k[idx].T * c
                lg[pad[idx]] = -math.inf
                if dedup:  # a key already offered by an earlier expert counts once
                    lg[torch.tensor([j in seen for j in idx.tolist()], dtype=torch.bool)] = -math.inf
                    seen.update(idx.tolist())
                logits.append(lg)
                vals.append(v[idx])
        w = torch.softmax(torch.cat(logits), dim=0)
        out[i] = w @ torch.cat(vals)
    return out


def softmax_attention(q, k, v, pad=None):
    """softmax(q k^T / sqrt(d)) v for one head, padded keys excluded."""
    logits = q @ k.T / math.sqrt(q.shape[1])
    if pad is not None:
        logits[:, pad] = -math.inf
    return torch.softmax(logits, dim=1) @ v


def split(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, heads: int, parts: int = 3):
    """x [N, C] -> list of ``parts`` tensors [heads, N, C/heads] from the linear layer (weight, bias)."""
    y = x @ weight.T + (0 if bias is None else bias)
    n, c = x.shape
    return [y[:, p * c : (p + 1) * c].reshape(n, heads, c // heads).transpose(0, 1) for p in range(parts)]


def merge(o: torch.Tensor) -> torch.Tensor:
    """[heads, N, d] -> [N, heads * d]."""
    return o.transpose(0, 1).reshape(o.shape[1], -1)
