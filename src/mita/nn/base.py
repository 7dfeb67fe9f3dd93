"""The shared shell of every attention module: timm-compatible projections plus the SPEC §2.2 variants.

Parameter names and shapes follow timm's ``Attention`` (``qkv``, ``q_norm``, ``k_norm``, ``norm``,
``proj``), so a timm state dict loads unchanged. Subclasses implement only :meth:`AttentionBase.attend`,
the token mixing of head-split ``q, k, v``; the shell handles the projections, padding masks, QK norm,
RoPE, the depth-wise conv on V (``dwc``) and the SiLU gate (``gate``).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .layout import TokenLayout, check_layout, resolve_layout
from .rope import apply_rope, grid_positions, rope_angles


def check_padding_mask(key_padding_mask: torch.Tensor | None, b: int, n: int) -> torch.Tensor | None:
    """Accept ``None`` or a ``[B, N]`` bool key padding mask (True = padding); ValueError otherwise."""
    if key_padding_mask is None:
        return None
    mask = key_padding_mask
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != (b, n):
        got = (mask.dtype, tuple(mask.shape)) if isinstance(mask, torch.Tensor) else type(mask)
        raise ValueError(
            f"key_padding_mask must be a [B, N] = [{b}, {n}] bool tensor (True = padding), got {got}"
        )
    return mask


#: Additive ``attn_mask`` values at or below this mean "do not attend" (-inf, finfo.min, -1e9 all do).
MASKED_BELOW = -1e4


def padding_from_attn_mask(attn_mask: torch.Tensor, b: int, n: int) -> torch.Tensor:
    """timm's / SDPA's ``attn_mask`` -> a ``[B, N]`` key padding mask (True = padding), when it is key-only.

    ``attn_mask`` keeps SDPA's meaning: bool True = attend, or an additive float mask (0 = attend, a large
    negative such as ``-inf`` or ``finfo.min`` = do not attend). Only a mask that depends on the key alone
    can be expressed as key padding: shape ``[B or 1, 1, 1, N]`` (what timm's variable-resolution models
    build from ``patch_valid`` with a key-only mask). Any other shape, or additive values other than 0 and
    a large negative (a bias), raise ValueError.
    """
    if not isinstance(attn_mask, torch.Tensor):
        raise ValueError(f"attn_mask must be a tensor or None, got {type(attn_mask).__name__}")
    shape = tuple(attn_mask.shape)
    if attn_mask.dim() != 4 or shape[0] not in (1, b) or shape[1:] != (1, 1, n):
        hint = (
            " (for a [B, N] padding mask, True = padding, use key_padding_mask=)" if len(shape) == 2 else ""
        )
        raise ValueError(
            f"attn_mask must be a key-only SDPA-style mask of shape [B, 1, 1, N] = [{b}, 1, 1, {n}] (bool "
            f"True = attend, or additive float); MiTA supports key padding only, got shape {shape}{hint}"
        )
    keys = attn_mask[:, 0, 0, :].expand(b, n)
    if keys.dtype == torch.bool:
        return ~keys
    if not keys.is_floating_point():
        raise ValueError(f"attn_mask must be bool or floating point, got {keys.dtype}")
    pad = keys <= MASKED_BELOW
    # One host sync, only for a float mask and only outside compiled graphs (as the op's mask check).
    if not torch.compiler.is_compiling() and bool(((keys != 0) & ~pad).any()):
        raise ValueError(
            "attn_mask holds additive biases other than 0 (attend) and a large negative (masked); "
            "MiTA supports key padding only"
        )
    return pad


def config_of(init_locals: dict[str, Any]) -> dict[str, Any]:
    """The constructor arguments of a module, from ``locals()`` taken first thing in ``__init__``."""
    cfg = {k: v for k, v in init_locals.items() if k not in ("self", "__class__", "device", "dtype", "kw")}
    cfg.update({k: v for k, v in init_locals.get("kw", {}).items() if k not in ("device", "dtype")})
    return cfg


class AttentionBase(nn.Module):
    """Multi-head self-attention shell; see the module docstring. Subclasses override :meth:`attend`.

    Args:
        dim: model width; must be divisible by ``num_heads``.
        num_heads: attention heads.
        qkv_bias, proj_bias: biases of the ``qkv`` and ``proj`` linear layers.
        qk_norm: normalise q and k per head with ``norm_layer(head_dim)`` (timm's ``q_norm``/``k_norm``).
        scale_norm: normalise the attention output with ``norm_layer(dim)`` before ``proj`` (timm).
        attn_drop, proj_drop: dropout on attention weights (where the kind computes them) and output.
        norm_layer: normalisation class used by ``qk_norm`` / ``scale_norm``.
        layout, grid, prefix_tokens: token layout (see :mod:`mita.nn.layout`).
        dwc: add a depth-wise conv of V over the patch grid (3x3) or sequence (3) before ``proj``.
        gate: widen ``qkv`` to ``4 * dim`` and multiply the output by ``SiLU(g)`` before ``proj``.
        rope: None, or RoPE on q and k of the body tokens: ``True`` (theta 10000) or a float theta;
            2-D axial on a grid, 1-D on a sequence; prefix/suffix tokens are not rotated.
        num_kv_heads: key/value heads for grouped-query attention (default ``num_heads``; then ``qkv`` is
            timm's ``3 * dim`` wide). Query head ``h`` reads key/value head ``h // group``,
            ``group = num_heads // num_kv_heads``.

    Graph capture: ``torch.compile``, ``torch.export`` and ``torch.jit.trace`` work for every kind;
    ``torch.jit.script`` does not. TorchScript compiles a restricted subset of Python, and these modules
    use what it lacks: keyword-only arguments (``key_padding_mask``), the ``TokenLayout`` dataclass, options
    checked through ``numbers``/numpy types, and an op that dispatches to backends at run time. Rewriting
    them in that subset would buy nothing the other three do not give (TorchScript is deprecated in
    PyTorch); ``tests/nn/test_export.py`` checks trace and export against eager.
    """

    #: Whether :meth:`attend` takes key/value with fewer heads than queries (else they are repeated).
    native_gqa = False

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: type[nn.Module] | None = nn.LayerNorm,
        scale_norm: bool = False,
        layout: str = "grid",
        grid: tuple[int, int] | None = None,
        prefix_tokens: int = 1,
        dwc: bool = False,
        gate: bool = False,
        rope: bool | float | None = None,
        num_kv_heads: int | None = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        if not isinstance(dim, int) or not isinstance(num_heads, int) or num_heads < 1 or dim < 1:
            raise ValueError(
                f"dim and num_heads must be positive ints, got dim={dim!r}, num_heads={num_heads!r}"
            )
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        kv = num_heads if num_kv_heads is None else num_kv_heads
        if isinstance(kv, bool) or not isinstance(kv, int) or kv < 1 or num_heads % kv:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads!r}")
        self.num_kv_heads, self.kv_dim = kv, kv * self.head_dim
        self.scale = self.head_dim**-0.5
        self.layout, self.prefix_tokens = layout, prefix_tokens
        self.grid = check_layout(layout, grid, prefix_tokens)
        # The patch grid of the current input, when the model tells it per forward (mita.convert sets it
        # from the patch embedding of timm models built with dynamic_img_size=True); overrides ``grid``.
        self.input_grid: tuple[int, int] | None = None
        self.use_gate = bool(gate)
        self.rope_theta = self._rope_theta(rope)
        norm_layer = norm_layer or nn.LayerNorm  # timm passes None for its default
        dd = {"device": device, "dtype": dtype}
        width = dim + 2 * self.kv_dim + (dim if gate else 0)
        self.qkv = nn.Linear(dim, width, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(dim, **dd) if scale_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dwc: nn.Module | None = None
        if dwc:
            conv = nn.Conv2d if layout == "grid" else nn.Conv1d
            self.dwc = conv(self.kv_dim, self.kv_dim, 3, padding=1, groups=self.kv_dim, **dd)

    def _rope_theta(self, rope: bool | float | None) -> float | None:
        if rope is None or rope is False:
            return None
        theta = 10000.0 if rope is True else float(rope)
        if theta <= 0:
            raise ValueError(f"rope theta must be positive, got {rope!r}")
        axes = 2 if self.layout == "grid" else 1
        if self.head_dim % (2 * axes):
            raise ValueError(
                f"rope on layout={self.layout!r} needs head_dim divisible by {2 * axes}, got {self.head_dim}"
            )
        return theta

    @classmethod
    def accepted_kwargs(cls) -> set[str]:
        """Constructor keyword names of this class (used by :func:`mita.convert` to carry settings over)."""
        names: set[str] = set()
        for klass in cls.__mro__:
            if klass is nn.Module or not issubclass(klass, nn.Module):
                continue
            names |= set(inspect.signature(klass.__init__).parameters) - {"self", "args", "kwargs"}
        return names

    def layout_of(self, n: int) -> TokenLayout:
        """Resolve this module's layout for ``n`` tokens (ValueError naming the sizes if impossible)."""
        grid = self.input_grid if self.input_grid is not None else self.grid
        return resolve_layout(self.layout, grid, self.prefix_tokens, n)

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``x`` [B, N, dim] -> q [B, H, N, d], k and v [B, Hkv, N, d] (and g [B, H, N, d] with ``gate``).

        Channel layout of ``qkv``'s output: q, k, v(, g), each head-major (timm's when Hkv = H).
        """
        b, n, _ = x.shape
        sizes = [self.dim, self.kv_dim, self.kv_dim] + ([self.dim] if self.use_gate else [])
        parts = self.qkv(x).split(sizes, dim=-1)
        return tuple(t.reshape(b, n, -1, self.head_dim).transpose(1, 2) for t in parts)

    def _rope(self, q: torch.Tensor, k: torch.Tensor, tl: TokenLayout) -> tuple[torch.Tensor, torch.Tensor]:
        if tl.kind == "grid":
            pos = grid_positions(*tl.grid, device=q.device)
        else:
            pos = torch.arange(tl.body, device=q.device).unsqueeze(1)
        angles = rope_angles(pos, self.head_dim, self.rope_theta)
        return apply_rope(q, angles, tl.prefix), apply_rope(k, angles, tl.prefix)

    def _dwc(self, v: torch.Tensor, tl: TokenLayout, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Depth-wise conv of V over the body tokens, as [B, N, dim]; prefix/suffix tokens get zero.

        With GQA the conv runs on the ``kv_dim`` value channels and each query head gets its kv head's.
        Padded tokens (``mask`` [B, N], True = padding) enter the conv as zeros, as its border padding.
        """
        b, h, n, d = v.shape
        if mask is not None:
            v = v.masked_fill(mask[:, None, :, None], 0.0)
        body = v[:, :, tl.prefix : tl.prefix + tl.body].transpose(1, 2).reshape(b, tl.body, h * d)
        body = body.transpose(1, 2)
        if tl.kind == "grid":
            body = self.dwc(body.reshape(b, h * d, *tl.grid)).flatten(2)
        else:
            body = self.dwc(body)
        out = F.pad(body.transpose(1, 2), (0, 0, tl.prefix, tl.suffix))  # [B, N, kv_dim]
        if h != self.num_heads:
            out = (
                out.reshape(b, n, h, d).repeat_interleave(self.num_heads // h, dim=2).reshape(b, n, self.dim)
            )
        return out

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, tl: TokenLayout
    ) -> torch.Tensor:
        """Token mixing of ``[B, H, N, d]`` inputs -> ``[B, H, N, d]``; ``mask`` is [B, N], True = padding."""
        raise NotImplementedError

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        *,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x`` [B, N, dim] -> [B, N, dim].

        Args:
            x: tokens ``[B, N, dim]``.
            attn_mask: timm's argument with timm's (SDPA's) meaning, for use inside timm models: bool
                True = attend, or additive float. Only a key-only mask ``[B, 1, 1, N]`` is supported; it is
                turned into key padding (see :func:`padding_from_attn_mask`).
            is_causal: must be False: these modules are non-causal (the causal mixers are
                :mod:`mita.nn.causal`'s).
            key_padding_mask: ``[B, N]`` bool, True = padding: mita's own way to mask keys.
        """
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"expected input [B, N, {self.dim}], got {tuple(x.shape)}")
        if is_causal:
            raise ValueError(f"{type(self).__name__} is non-causal; is_causal=True is not supported")
        b, n, _ = x.shape
        mask = check_padding_mask(key_padding_mask, b, n)
        if attn_mask is not None:
            if mask is not None:
                raise ValueError("pass either attn_mask (SDPA-style) or key_padding_mask, not both")
            mask = padding_from_attn_mask(attn_mask, b, n)
        tl = self.layout_of(n)
        q, k, v, *g = self.split_heads(x)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope_theta is not None:
            q, k = self._rope(q, k, tl)
        kk, vv = k, v
        if self.num_kv_heads != self.num_heads and not self.native_gqa:
            group = self.num_heads // self.num_kv_heads
            kk, vv = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = self.attend(q, kk, vv, mask, tl).transpose(1, 2).reshape(b, n, self.dim)
        if self.dwc is not None:
            out = out + self._dwc(v, tl, mask)
        out = self.norm(out)
        if g:
            out = out * F.silu(g[0].transpose(1, 2).reshape(b, n, self.dim))
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, layout={self.layout!r}, "
            f"prefix_tokens={self.prefix_tokens}"
        )
