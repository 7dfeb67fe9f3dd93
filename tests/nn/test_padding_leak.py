"""Padding never reaches real tokens: changing only the padded tokens leaves every real token's output
bitwise unchanged, for every kind x layout x landmark mode (and the depth-wise conv on V)."""

from __future__ import annotations

import pytest
import torch

from mita.nn import ATTENTION_KINDS, build_attention
from mita.nn.landmark_modes import LANDMARK_MODES

N, DIM, HEADS = 17, 16, 2  # cls + a 4 x 4 grid (or a sequence of 16)
_OTHER = {"moba": dict(block_size=4), "topk": dict(topk=5)}


def _cases() -> list[tuple[str, str, str | None]]:
    cases = []
    for kind in ATTENTION_KINDS:
        for layout in ("grid", "seq"):
            modes = LANDMARK_MODES if kind in ("mita", "agent") else (None,)
            cases += [(kind, layout, mode) for mode in modes]
    return cases


def _module(kind: str, layout: str, mode: str | None, **extra) -> torch.nn.Module:
    kw: dict = dict(layout=layout, prefix_tokens=1, **_OTHER.get(kind, {}), **extra)
    if mode is not None:
        kw.update(num_landmarks=4, landmark_mode=mode)
        if kind == "mita":
            kw["topk"] = 5
        if mode == "conv":
            kw["conv_kernel"] = 2 if layout == "seq" else None
            kw["grid"] = (4, 4) if layout == "grid" else None
    torch.manual_seed(0)
    return build_attention(kind, DIM, HEADS, **kw).double().eval()


def _padding(b: int = 3) -> torch.Tensor:
    pad = torch.zeros(b, N, dtype=torch.bool)
    pad[0, 13:] = True  # the last grid row
    pad[1, 1::3] = True  # scattered over the grid, cls kept
    pad[2, 4:] = True  # three real body tokens: fewer than the 4 landmarks
    return pad


def _check_no_leak(mod: torch.nn.Module, attn_mask: bool = False) -> None:
    torch.manual_seed(1)
    pad = _padding()
    x = torch.randn(pad.shape[0], N, DIM, dtype=torch.float64)
    junk = x + 50 * torch.randn_like(x) * pad[..., None]
    kw = {"attn_mask": (~pad)[:, None, None, :]} if attn_mask else {"key_padding_mask": pad}
    with torch.no_grad():
        out, out_junk = mod(x, **kw), mod(junk, **kw)
        unmasked = mod(junk)
    real = ~pad
    assert torch.equal(out[real], out_junk[real])
    assert not torch.allclose(out[real], unmasked[real])  # the padding would matter without the mask


@pytest.mark.parametrize("kind, layout, mode", _cases())
def test_padded_tokens_do_not_reach_real_outputs(kind, layout, mode):
    _check_no_leak(_module(kind, layout, mode))


@pytest.mark.parametrize("layout", ["grid", "seq"])
@pytest.mark.parametrize("kind", ["full", "mita"])
def test_dwc_does_not_read_padded_values(kind, layout):
    _check_no_leak(_module(kind, layout, "pool" if kind == "mita" else None, dwc=True))


@pytest.mark.parametrize("mode", LANDMARK_MODES)
def test_timm_key_only_attn_mask_on_a_grid(mode):
    _check_no_leak(_module("mita", "grid", mode), attn_mask=True)


def test_random_landmarks_in_training_skip_padding():
    mod = _module("mita", "grid", "random").train()
    torch.manual_seed(2)
    pad = _padding()
    x = torch.randn(3, N, DIM, dtype=torch.float64)
    junk = x + 50 * torch.randn_like(x) * pad[..., None]
    torch.manual_seed(3)
    out = mod(x, key_padding_mask=pad)
    torch.manual_seed(3)
    assert torch.equal(out[~pad], mod(junk, key_padding_mask=pad)[~pad])
