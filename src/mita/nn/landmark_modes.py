"""Landmark construction for the attention modules (SPEC §2.1 and the paper's landmark ablations).

Modes: ``"pool"`` (adaptive average pooling of the queries over the grid or the sequence, prefix tokens
left out), ``"official"`` (the published DeiT code's pooling, cls included and last patch dropped),
``"random"`` (m body tokens drawn per forward in training, a fixed seeded draw in eval), ``"learned"``
(m learned vectors) and ``"conv"`` (a strided convolution over the grid or sequence of queries).
All modes work on head-split queries ``[B, H, N, d]`` and return ``[B, H, m, d]``.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .. import landmarks as lm
from .layout import TokenLayout

LANDMARK_MODES = ("pool", "official", "random", "learned", "conv")


def landmark_mode_arg(landmark_mode: str, landmarks: str | None, owner: str) -> str:
    """The landmark mode from ``landmark_mode=`` or the deprecated ``landmarks=`` (DeprecationWarning)."""
    if landmarks is None:
        return landmark_mode
    warnings.warn(
        f"{owner}(landmarks=...) is deprecated and will be removed in the next release; use landmark_mode=",
        DeprecationWarning,
        stacklevel=3,
    )
    if landmark_mode not in ("pool", landmarks):
        raise ValueError(f"landmarks={landmarks!r} and landmark_mode={landmark_mode!r} disagree; pass one")
    return landmarks


def landmark_size(
    num_landmarks: int | tuple[int, int], layout: str, mode: str
) -> tuple[int, tuple[int, int] | None]:
    """Return ``(m, (mh, mw) or None)``; grid pooling needs a square ``m`` or an explicit pair."""
    if isinstance(num_landmarks, (tuple, list)):
        if len(num_landmarks) != 2 or min(num_landmarks) < 1:
            raise ValueError(f"num_landmarks must be a positive int or (mh, mw), got {num_landmarks}")
        mh, mw = int(num_landmarks[0]), int(num_landmarks[1])
        return mh * mw, (mh, mw)
    if isinstance(num_landmarks, bool) or not isinstance(num_landmarks, int) or num_landmarks < 1:
        raise ValueError(f"num_landmarks must be a positive int or (mh, mw), got {num_landmarks!r}")
    needs_grid = mode == "official" or (layout == "grid" and mode in ("pool", "conv"))
    if not needs_grid:
        return num_landmarks, None
    side = math.isqrt(num_landmarks)
    if side * side != num_landmarks:
        raise ValueError(
            f"num_landmarks={num_landmarks} must be a square number (or an explicit (mh, mw)) "
            f"for landmark_mode={mode!r} on a grid"
        )
    return num_landmarks, (side, side)


def masked_pool_1d(x: torch.Tensor, valid: torch.Tensor, m: int) -> torch.Tensor:
    """Adaptive average pooling over the *valid* tokens of each row: ``[B, H, L, d] -> [B, H, m, d]``.

    Window ``j`` of a row with ``L_b`` valid tokens covers valid ranks ``floor(j L_b / m) ..
    ceil((j+1) L_b / m) - 1``, the windows of :func:`mita.landmarks.pool_1d`; so a padded row gives the
    landmarks of the same row unpadded. Costs one ``[m, L]`` membership matmul per row.
    """
    count = valid.sum(1, keepdim=True)  # [B, 1]
    rank = (valid.long().cumsum(1) - 1).masked_fill(~valid, -1)  # [B, L]: rank among valid tokens; padding -1
    j = torch.arange(m, device=x.device)
    start = torch.div(j * count, m, rounding_mode="floor")  # [B, m]
    end = -torch.div(-(j + 1) * count, m, rounding_mode="floor")  # ceil
    # Window j holds end - start tokens (padding, ranked -1, lies in none): dividing in place by that spares
    # [B, m, L] temporaries, which at evaluation batches stay in the C heap after they are freed.
    weights = ((rank[:, None, :] >= start[..., None]) & (rank[:, None, :] < end[..., None])).to(x.dtype)
    weights.div_((end - start).clamp_min(1).unsqueeze(-1).to(x.dtype))  # [B, m, L]
    return lm.rows_matmul(weights, x)


class LandmarkBuilder(nn.Module):
    """Builds the ``m`` landmarks of one attention layer.

    Args:
        dim: model width (``num_heads * head_dim``); learned and conv landmarks live in this width.
        num_heads: heads the landmarks are split into.
        num_landmarks: m (an int; a square or ``(mh, mw)`` when pooling or convolving a grid).
        mode: one of :data:`LANDMARK_MODES`.
        layout: ``"grid"`` or ``"seq"``.
        grid: the patch grid when known at construction (``"conv"`` on a grid needs it, or ``conv_kernel``).
        conv_kernel: kernel = stride of the ``"conv"`` mode (int, or pair on a grid); default grid // size.
        seed: the fixed draw of ``"random"`` landmarks in eval mode.

    With a key padding mask, no landmark reads a padded token: ``"pool"`` on a sequence pools the real
    tokens as if the row were unpadded (:func:`masked_pool_1d`); ``"pool"`` on a grid and ``"official"``
    average the real tokens of each window (a window of padding only gives zeros); ``"random"`` draws
    real tokens (zeros for the draws a row with fewer than m real tokens lacks); ``"conv"`` sees padded
    tokens as zeros (as its own border padding) and pools only the conv windows holding a real token;
    ``"learned"`` does not read the tokens.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_landmarks: int | tuple[int, int],
        mode: str,
        layout: str,
        grid: tuple[int, int] | None = None,
        conv_kernel: int | tuple[int, int] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if mode not in LANDMARK_MODES:
            raise ValueError(f"landmark_mode must be one of {LANDMARK_MODES}, got {mode!r}")
        self.mode, self.layout, self.num_heads, self.seed = mode, layout, num_heads, seed
        self.m, self.size = landmark_size(num_landmarks, layout, mode)
        if mode == "learned":
            self.queries = nn.Parameter(torch.empty(self.m, dim))
            nn.init.trunc_normal_(self.queries, std=0.02)
        if mode == "conv":
            self.conv = self._make_conv(dim, grid, conv_kernel)

    def _make_conv(
        self, dim: int, grid: tuple[int, int] | None, kernel: int | tuple[int, int] | None
    ) -> nn.Module:
        if self.layout == "seq":
            if kernel is None:
                raise ValueError(
                    "landmark_mode='conv' with layout='seq' needs conv_kernel (the window length)"
                )
            if not isinstance(kernel, int) or kernel < 1:
                raise ValueError(f"conv_kernel must be a positive int for layout='seq', got {kernel!r}")
            return nn.Conv1d(dim, dim, kernel, stride=kernel)
        if kernel is None:
            if grid is None:
                raise ValueError(
                    "landmark_mode='conv' on a grid needs grid=(h, w) or conv_kernel at construction"
                )
            kernel = (max(1, grid[0] // self.size[0]), max(1, grid[1] // self.size[1]))
        kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
        return nn.Conv2d(dim, dim, kernel, stride=kernel)

    def forward(
        self, q: torch.Tensor, tl: TokenLayout, key_padding_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Landmarks ``[B, H, m, d]`` of head-split queries ``q`` ``[B, H, N, d]`` laid out as ``tl``."""
        b, h, n, d = q.shape
        body = q[:, :, tl.prefix : tl.prefix + tl.body]
        if self.mode == "learned":
            return self.queries.to(q.dtype).reshape(self.m, h, d).transpose(0, 1).expand(b, -1, -1, -1)
        if self.mode == "official":
            return lm.official_pool(q, self.size, None if key_padding_mask is None else ~key_padding_mask)
        if self.m > tl.body:
            raise ValueError(f"num_landmarks m={self.m} exceeds the {tl.body} pooled tokens (N={n})")
        valid = None
        if key_padding_mask is not None:
            valid = ~key_padding_mask[:, tl.prefix : tl.prefix + tl.body]
        if self.mode == "random":
            return self._random(body, valid)
        if self.mode == "conv":
            return self._conv(body, tl, valid)
        if tl.kind == "grid":
            return lm.pool_2d(body, tl.grid, self.size, valid=valid)
        return lm.pool_1d(body, self.m) if valid is None else masked_pool_1d(body, valid, self.m)

    def _random(self, body: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        b, h, length, d = body.shape
        if self.training:
            scores = torch.rand(b, length, device=body.device)
        else:  # a fixed draw: the same landmarks on every eval forward
            gen = torch.Generator().manual_seed(self.seed)
            scores = torch.rand(length, generator=gen).to(body.device).expand(b, -1)
        if valid is not None:
            scores = scores.masked_fill(~valid, -1.0)  # padding only if a row has fewer than m tokens
        idx = scores.topk(self.m, dim=1).indices.sort(dim=1).values  # [B, m], in token order
        picked = body.gather(2, idx[:, None, :, None].expand(-1, h, -1, d))
        if valid is None:
            return picked
        return picked.masked_fill(~valid.gather(1, idx)[:, None, :, None], 0.0)  # padding drawn: zeros

    def _conv(self, body: torch.Tensor, tl: TokenLayout, valid: torch.Tensor | None) -> torch.Tensor:
        b, h, length, d = body.shape
        if valid is not None:
            body = body.masked_fill(~valid[:, None, :, None], 0.0)
        x = body.transpose(1, 2).reshape(b, length, h * d).transpose(1, 2)  # [B, C, L]
        if tl.kind == "grid":
            x = self.conv(x.reshape(b, h * d, *tl.grid))
            if valid is None:
                x = F.adaptive_avg_pool2d(x, self.size).flatten(2)
            else:  # pool the conv windows that hold a real token
                kernel = self.conv.kernel_size
                hit = F.max_pool2d(valid.reshape(b, 1, *tl.grid).to(x.dtype), kernel, kernel).flatten(1) > 0
                x = lm.pool_2d(x.flatten(2).transpose(1, 2), tuple(x.shape[2:]), self.size, valid=hit)
                x = x.transpose(1, 2)
        else:
            x = self.conv(x)
            if valid is None:
                x = F.adaptive_avg_pool1d(x, self.m)
            else:
                kernel = self.conv.kernel_size[0]
                hit = F.max_pool1d(valid[:, None].to(x.dtype), kernel, kernel)[:, 0] > 0  # [B, L']
                x = masked_pool_1d(x.transpose(1, 2)[:, None], hit, self.m)[:, 0].transpose(1, 2)
        return x.reshape(b, h, d, self.m).transpose(-1, -2)
