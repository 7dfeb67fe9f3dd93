"""Input validation for :func:`mita.mita_attention`: every bad input gets a ValueError naming sizes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

BACKENDS = ("auto", "reference", "torch", "triton")


@dataclass(frozen=True)
class Problem:
    """Validated sizes and options of one MiTA call (what every backend needs besides tensors)."""

    batch: int
    heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    value_dim: int
    num_landmarks: int
    topk: int
    experts_per_query: int
    scale: float
    landmark_scale: float
    shared: bool
    routed: bool
    dedup: bool

    @property
    def group(self) -> int:
        """Query heads per key/value head (GQA)."""
        return self.heads // self.kv_heads


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def validate(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    landmarks: torch.Tensor,
    *,
    topk: int,
    experts_per_query: int,
    scale: float | None,
    landmark_scale: float | None,
    shared: bool,
    routed: bool,
    dedup: bool,
    key_padding_mask: torch.Tensor | None,
    backend: str,
) -> Problem:
    """Check shapes, dtypes, devices and options; return the resolved :class:`Problem`."""
    named = {"q": q, "k": k, "v": v, "landmarks": landmarks}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dimensions [B, heads, len, dim], got shape {_shape(t)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    for name, t in named.items():
        if t.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but q has dtype {q.dtype}; all inputs must match")
        if t.device != q.device:
            raise ValueError(
                f"{name} is on {t.device} but q is on {q.device}; all inputs must be on one device"
            )
    b, h, nq, d = q.shape
    bk, hkv, nk, dk = k.shape
    m = landmarks.shape[2]
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v shape {_shape(v)} must match k shape {_shape(k)} in [B, heads, len]")
    if bk != b or landmarks.shape[0] != b:
        raise ValueError(f"batch sizes differ: q {b}, k {bk}, v {v.shape[0]}, landmarks {landmarks.shape[0]}")
    if dk != d or landmarks.shape[3] != d:
        raise ValueError(
            f"head dims differ: q {d}, k {dk}, landmarks {landmarks.shape[3]} (q, k and landmarks must agree)"
        )
    if landmarks.shape[1] != h:
        raise ValueError(f"landmarks have {landmarks.shape[1]} heads but q has {h}")
    if hkv < 1 or h % hkv != 0:
        raise ValueError(f"q heads ({h}) must be a multiple of k/v heads ({hkv}) for grouped-query attention")
    if nk < 1 or nq < 1 or d < 1:
        raise ValueError(f"empty inputs: q {_shape(q)}, k {_shape(k)}")
    if m < 1:
        raise ValueError(f"need at least one landmark, got landmarks shape {_shape(landmarks)}")
    if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= nk:
        raise ValueError(f"topk must be an int in 1..N={nk}, got {topk!r}")
    s = experts_per_query
    if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= m:
        raise ValueError(f"experts_per_query must be an int in 1..m={m}, got {s!r}")
    if not shared and not routed:
        raise ValueError("shared=False and routed=False leaves no expert to attend to; enable at least one")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    for name, val in (("scale", scale), ("landmark_scale", landmark_scale)):
        if val is not None and not (isinstance(val, (int, float)) and val > 0):
            raise ValueError(f"{name} must be a positive number or None, got {val!r}")
    if key_padding_mask is not None:
        _check_mask(key_padding_mask, b, nk, q.device)
    return Problem(
        batch=b,
        heads=h,
        kv_heads=hkv,
        q_len=nq,
        kv_len=nk,
        head_dim=d,
        value_dim=v.shape[3],
        num_landmarks=m,
        topk=topk,
        experts_per_query=s,
        scale=float(scale) if scale is not None else d**-0.5,
        landmark_scale=float(landmark_scale) if landmark_scale is not None else 1.0 / d,
        shared=bool(shared),
        routed=bool(routed),
        dedup=bool(dedup),
    )


def _check_mask(mask: torch.Tensor, b: int, n: int, device: torch.device) -> None:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"key_padding_mask must be a bool tensor (True = padding), got {got}")
    if tuple(mask.shape) != (b, n):
        raise ValueError(f"key_padding_mask must have shape [B, N] = [{b}, {n}], got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"key_padding_mask is on {mask.device} but q is on {device}")
    # One host sync, only when a mask is given and only outside compiled graphs.
    if not torch.compiler.is_compiling() and bool(mask.all(dim=1).any()):
        rows = mask.all(dim=1).nonzero().flatten().tolist()
        raise ValueError(f"key_padding_mask marks every key as padding in batch rows {rows}")
