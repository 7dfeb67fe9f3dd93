"""Special cases with answers known in closed form (SPEC §2.4-2.7)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mita import mita_attention

from .helpers import CPU, make_inputs, padding_mask

BACKENDS = ["reference", "torch", CPU]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hkv", [1, 2, 4])
def test_route_only_with_topk_n_is_full_attention(backend, hkv):
    q, k, v, r = make_inputs(2, 4, hkv, 31, 8, 3, requires_grad=False)
    out = mita_attention(q, k, v, r, topk=31, shared=False, backend=backend)
    expected = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_route_only_topk_n_with_padding_is_masked_full_attention(backend):
    q, k, v, r = make_inputs(2, 2, 2, 20, 8, 3, requires_grad=False)
    mask = padding_mask(2, 20, [0, 6])
    out = mita_attention(q, k, v, r, topk=20, shared=False, key_padding_mask=mask, backend=backend)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=~mask[:, None, None, :])
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-10)


def _shared_by_hand(q, k, v, r, lam, c, mask=None):
    scores = torch.einsum("bhmd,bhnd->bhmn", r, k) * c
    if mask is not None:
        scores = scores.masked_fill(mask[:, None, None, :], float("-inf"))
    a = torch.einsum("bhmn,bhne->bhme", scores.softmax(-1), v)
    w = (torch.einsum("bhnd,bhmd->bhnm", q, r) * lam).softmax(-1)
    return torch.einsum("bhnm,bhme->bhne", w, a)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lam", [None, 8**-0.5])
def test_shared_only_is_the_shared_expert_formula(backend, lam):
    q, k, v, r = make_inputs(2, 2, 2, 27, 8, 5, requires_grad=False)
    mask = padding_mask(2, 27, [3, 0])
    out = mita_attention(
        q, k, v, r, topk=4, routed=False, landmark_scale=lam, key_padding_mask=mask, backend=backend
    )
    expected = _shared_by_hand(q, k, v, r, lam if lam is not None else 1 / 8, 8**-0.5, mask)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-10)


def _mita_by_hand(q, k, v, r, topk):
    """SPEC §2 for s = 1 with explicit loops over queries: the most literal statement possible."""
    b, h, n, d = q.shape
    c, lam = d**-0.5, 1.0 / d
    out = torch.empty_like(q)
    for bi in range(b):
        for hi in range(h):
            R, K, V, Q = r[bi, hi], k[bi, hi], v[bi, hi], q[bi, hi]
            sel = (R @ K.T).topk(topk, dim=-1).indices
            A = torch.softmax(R @ K.T * c, -1) @ V
            for i in range(n):
                e = int((R @ Q[i]).argmax())
                logits = torch.cat([R @ Q[i] * lam, K[sel[e]] @ Q[i] * c])
                w = logits.softmax(0)
                out[bi, hi, i] = w[: len(R)] @ A + w[len(R) :] @ V[sel[e]]
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_loop_over_queries(backend):
    q, k, v, r = make_inputs(2, 2, 2, 17, 6, 3, requires_grad=False)
    out = mita_attention(q, k, v, r, topk=5, backend=backend)
    torch.testing.assert_close(out, _mita_by_hand(q, k, v, r, 5), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_keys_never_selected_and_never_attended(backend):
    q, k, v, r = make_inputs(2, 2, 1, 30, 8, 4, requires_grad=False)
    mask = padding_mask(2, 30, [10, 3])
    out, routing = mita_attention(
        q, k, v, r, topk=6, experts_per_query=2, key_padding_mask=mask, backend=backend, return_routing=True
    )
    selected_pad = mask[:, None, None, :].expand(-1, 2, 4, -1).gather(3, routing.key_index)
    assert not selected_pad.any()
    # Changing what sits in padded positions changes nothing.
    k2, v2 = k.clone(), v.clone()
    k2[mask[:, None, :, None].expand_as(k)] = 1e3
    v2[mask[:, None, :, None].expand_as(v)] = -1e3
    out2 = mita_attention(q, k2, v2, r, topk=6, experts_per_query=2, key_padding_mask=mask, backend=backend)
    torch.testing.assert_close(out2, out, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicate_keys_count_twice_unless_dedup(backend):
    """With s = m and k = N, every expert offers every key: dedup gives full attention + shared expert."""
    q, k, v, r = make_inputs(1, 1, 1, 12, 4, 3, requires_grad=False)
    kw = dict(topk=12, experts_per_query=3, shared=False, backend=backend)
    full = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(mita_attention(q, k, v, r, dedup=True, **kw), full, atol=1e-12, rtol=1e-10)
    # Without dedup each key appears 3 times: the softmax is unchanged (every logit tripled in count).
    torch.testing.assert_close(mita_attention(q, k, v, r, dedup=False, **kw), full, atol=1e-12, rtol=1e-10)
    # With the shared expert present, multiplicity matters: triple weight on the routed keys.
    d = 4
    sh = torch.einsum("bhnd,bhmd->bhnm", q, r) / d
    ro = torch.einsum("bhnd,bhtd->bhnt", q, k) * d**-0.5
    a = torch.softmax(torch.einsum("bhmd,bhtd->bhmt", r, k) * d**-0.5, -1) @ v
    for dedup, mult in ((False, 3.0), (True, 1.0)):
        logits = torch.cat([sh, ro + torch.log(torch.tensor(mult, dtype=q.dtype))], -1)
        w = logits.softmax(-1)
        expected = w[..., :3] @ a + w[..., 3:] @ v
        got = mita_attention(q, k, v, r, topk=12, experts_per_query=3, dedup=dedup, backend=backend)
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_routing_is_argmax_of_query_landmark_products(backend):
    q, k, v, r = make_inputs(2, 2, 2, 25, 8, 5, requires_grad=False)
    _, routing = mita_attention(q, k, v, r, topk=4, experts_per_query=2, backend=backend, return_routing=True)
    qr = torch.einsum("bhnd,bhmd->bhnm", q, r)
    assert torch.equal(routing.expert_index[..., 0], qr.argmax(-1))
    best2 = qr.topk(2, -1).indices
    assert torch.equal(routing.expert_index, best2)
    scores = torch.einsum("bhmd,bhnd->bhmn", r, k)
    chosen = scores.gather(3, routing.key_index)
    kth = scores.topk(4, -1).values[..., -1:]
    assert (chosen >= kth).all()
    assert routing.key_index.shape == (2, 2, 5, 4) and routing.expert_index.shape == (2, 2, 25, 2)
