"""torch.autograd.gradcheck in float64 on small shapes for every CPU backend."""

from __future__ import annotations

import pytest
import torch

from mita import mita_attention

from .helpers import CPU, make_inputs, padding_mask

SETTINGS = {
    "s1": dict(topk=4),
    "s2_dedup_pad": dict(topk=5, experts_per_query=2, dedup=True, pad=True),
    "route_only": dict(topk=3, shared=False),
    "shared_only": dict(topk=3, routed=False),
}


@pytest.mark.parametrize("backend", ["reference", "torch", CPU])
@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_gradcheck(backend, setting):
    kw = dict(SETTINGS[setting])
    q, k, v, r = make_inputs(1, 2, 1, 11, 4, 3, seed=3)
    mask = padding_mask(1, 11, [2]) if kw.pop("pad", False) else None
    inputs = (q, k, v) if kw.get("shared", True) is False else (q, k, v, r)

    def fn(*xs):
        args = list(xs) + [r] * (4 - len(xs))
        return mita_attention(*args, key_padding_mask=mask, backend=backend, **kw)

    # Routing is piecewise constant: the random inputs keep every choice far from a tie at eps = 1e-6.
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)
