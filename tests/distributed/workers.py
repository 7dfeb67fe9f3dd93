"""What each spawned rank runs: the context-parallel op against the single-process op on the same data."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from mita import mita_attention, mita_causal_attention
from mita.distributed import (
    comm_stats,
    context_parallel_attention,
    context_parallel_causal_attention,
    shard_sequence,
)
from mita.distributed.selection import topk_lowest_index
from mita.distributed.sequence import ContextParallelSequence
from mita.landmarks import block_mean
from mita.models.sequence import SequenceClassifier
from mita.train.distributed import DistInfo, context_parallel, data_parallel


def make_case(
    world: int,
    n_local: int,
    *,
    seed: int = 0,
    b: int = 2,
    h: int = 4,
    hkv: int = 2,
    d: int = 8,
    dv: int = 6,
    m_local: int = 2,
    integer: bool = False,
    pad: bool = False,
) -> dict[str, Any]:
    """Full float64 inputs (the same on every rank), and a fixed cotangent for the output."""
    g = torch.Generator().manual_seed(seed)
    n, m = world * n_local, world * m_local

    def rand(*shape: int) -> torch.Tensor:
        if integer:  # small integers: many exactly equal scores, all products exact
            return torch.randint(-2, 3, shape, generator=g).double()
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    case = {"q": rand(b, h, n, d), "k": rand(b, hkv, n, d), "v": torch.randn(b, hkv, n, dv, generator=g,
            dtype=torch.float64), "landmarks": rand(b, h, m, d)}  # fmt: skip
    if integer:  # duplicate keys: equal scores straddle every top-k boundary
        case["k"][:, :, 1::2] = case["k"][:, :, ::2][:, :, : n // 2]
    case["cotangent"] = torch.randn(b, h, n, dv, generator=g, dtype=torch.float64)
    mask = None
    if pad:
        mask = torch.rand(b, n, generator=g) < 0.3
        mask[0, :n_local] = True  # rank 0 holds only padding in batch row 0
        mask[:, -1] = False
    case["mask"] = mask
    return case


def _reference(case: dict[str, Any], backend: str, **kw: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = [case[n].clone().requires_grad_() for n in ("q", "k", "v", "landmarks")]
    op = mita_causal_attention if "block_size" in kw else mita_attention
    out = op(*leaves, key_padding_mask=case["mask"], backend=backend, **kw)
    (out * case["cotangent"]).sum().backward()
    return out.detach(), [t.grad for t in leaves]


def _parallel(case: dict[str, Any], group: dist.ProcessGroup | None, **kw: Any):
    local = [shard_sequence(case[n], 2, group).clone().requires_grad_() for n in ("q", "k", "v", "landmarks")]
    mask = None if case["mask"] is None else shard_sequence(case["mask"], 1, group)
    op = context_parallel_causal_attention if "block_size" in kw else context_parallel_attention
    out = op(*local, key_padding_mask=mask, group=group, **kw)
    (out * shard_sequence(case["cotangent"], 2, group)).sum().backward()
    return out.detach(), [t.grad for t in local]


def max_errors(case: dict[str, Any], backend: str = "reference", group=None, **kw: Any) -> list[float]:
    """Largest |difference| of the output and of the gradients of q, k, v, landmarks on this rank."""
    ref_out, ref_grads = _reference(case, backend, **kw)
    out, grads = _parallel(case, group, **kw)
    errs = [(out - shard_sequence(ref_out, 2, group)).abs().max().item()]
    for g_ref, g in zip(ref_grads, grads, strict=True):
        if g_ref is None or g is None:  # no gradient (landmarks with shared=False): none on either side
            errs.append(0.0 if g_ref is None and g is None else float("inf"))
            continue
        errs.append((g - shard_sequence(g_ref, 2, group)).abs().max().item())
    return errs


EQUALITY_CASES: dict[str, dict[str, Any]] = {
    "gqa": {"topk": 5},
    "mha_k_beyond_shard": {"topk": 13, "case": {"hkv": 4, "n_local": 8}},
    "two_experts": {"topk": 4, "experts_per_query": 2},
    "two_experts_dedup": {"topk": 4, "experts_per_query": 2, "dedup": True},
    "shared_only": {"topk": 4, "routed": False},
    "routed_only": {"topk": 4, "shared": False},
    "padding": {"topk": 6, "case": {"pad": True}},
    "padding_routed_only_s2": {"topk": 6, "shared": False, "experts_per_query": 2, "case": {"pad": True}},
    "scales": {"topk": 3, "scale": 0.3, "landmark_scale": 0.05},
}


def equality(rank: int, world: int, names: list[str]) -> dict[str, list[float]]:
    out = {}
    for name in names:
        spec = dict(EQUALITY_CASES[name])
        case = make_case(world, **{"n_local": 12, **spec.pop("case", {})})
        out[name] = max_errors(case, **spec)
    return out


def ties(rank: int, world: int) -> dict[str, Any]:
    """Integer inputs with many equal scores, against the CPU kernel (ties to the lower key index)."""
    case, topk = make_case(world, 10, integer=True, seed=3), 5
    b, h, m, d = case["landmarks"].shape
    scores = case["landmarks"].reshape(b, 2, 2 * m, d) @ case["k"].transpose(-1, -2)
    top = scores.topk(topk + 1, dim=-1).values
    _, routing = mita_attention(
        case["q"], case["k"], case["v"], case["landmarks"], topk=topk, backend="cpu", return_routing=True
    )
    lowest = topk_lowest_index(scores, topk)[1].reshape(b, h, m, topk)
    return {
        "errors": max_errors(case, backend="cpu", topk=topk),
        # rows where the k-th and (k+1)-th best scores are equal: the tie decides which key is chosen
        "straddling_ties": int((top[..., topk - 1] == top[..., topk]).sum()),
        "cpu_kernel_picks_lowest_index": bool((routing.key_index.sort(-1).values == lowest).all()),
    }


def size_one_groups(rank: int, world: int) -> list[float]:
    """A group of one rank (each rank its own) equals the plain op on that rank's whole input."""
    groups = [dist.new_group([r]) for r in range(world)]
    case = make_case(1, 16, seed=5)
    if world > 1:  # another rank's group: refused
        x = case["q"]
        try:
            context_parallel_attention(x, x, x, x[:, :, :1], topk=2, group=groups[(rank + 1) % world])
        except ValueError as err:
            assert "not a member of the context-parallel group" in str(err)
        else:
            raise AssertionError("a group without this rank was accepted")
    return max_errors(case, group=groups[rank], topk=5, experts_per_query=2)


def bytes_by_length(
    rank: int, world: int, n_locals: list[int], m_local: int, topk: int
) -> list[dict[str, int]]:
    """Bytes this rank sends per collective (forward, backward) at each shard length, fixed m and k."""
    res = []
    for n_local in n_locals:
        case = make_case(world, n_local, m_local=m_local, seed=n_local)
        with comm_stats() as stats:
            _parallel(case, None, topk=topk)
        res.append({f"{lab}/{d}": nb for (lab, d), nb in stats.bytes.items()})
    return res


def uneven(rank: int, world: int) -> list[str]:
    """Errors every rank must raise: differing shard sizes, an invalid input on one rank only, a batch row
    padded on every rank; and ``shard_sequence`` of a length that P does not divide."""
    case = make_case(world, 12)
    local = [shard_sequence(case[n], 2) for n in ("q", "k", "v", "landmarks")]
    short = [t[:, :, :-1] if i < 3 and rank == 1 else t for i, t in enumerate(local)]
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[1] = True
    msgs = []
    for args, kw in (
        (short, {"topk": 4}),
        (local, {"topk": 4 if rank == 0 else 0}),
        (local, {"topk": 4, "key_padding_mask": mask}),
    ):
        try:
            context_parallel_attention(*args, **kw)
        except ValueError as err:
            msgs.append(str(err))
    try:
        shard_sequence(torch.zeros(1, 1, 2 * world + 1, 1), 2)
    except ValueError as err:
        msgs.append(str(err))
    # every rank is still in step: one more call works
    out = context_parallel_attention(*local, topk=4)
    msgs.append(str(tuple(out.shape)))
    return msgs


def sequence_model(rank: int, world: int, pair: bool) -> list[float]:
    """The context-parallel classifier against the plain one (float64): logits, loss and the gradients
    (summed over the ranks and divided by P, as DDP over the group would), largest |difference| of each."""
    torch.manual_seed(0)
    model = SequenceClassifier(
        11, 3, 48, dim=16, depth=2, num_heads=2, attention="mita", num_landmarks=4, topk=5, pair=pair
    ).double()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, 11, (3, 48), generator=g)
    tokens[0, 30:] = 0  # padding: landmarks pool the valid tokens only, whatever rank holds them
    tokens[2, 5:] = 0
    x = (tokens, tokens.flip(0)) if pair else tokens
    y = torch.tensor([0, 2, 1])
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    ref_logits = model(x).detach()
    model.zero_grad()
    cp = ContextParallelSequence(model)
    logits = cp(x)
    loss_cp = torch.nn.functional.cross_entropy(logits, y)
    loss_cp.backward()
    errs = [(logits - ref_logits).abs().max().item(), abs(loss_cp.item() - loss.item())]
    worst = 0.0
    for n, p in model.named_parameters():
        grad = p.grad.clone()
        dist.all_reduce(grad)
        worst = max(worst, (grad / world - ref[n]).abs().max().item())
    return [*errs, worst]


CAUSAL_CASES: dict[str, dict[str, Any]] = {
    "gqa": {"topk": 5},
    "topk_beyond_n": {"topk": 1000, "experts_per_query": 2},
    "three_experts_routed_only": {"topk": 3, "experts_per_query": 3, "shared": False},
    "shared_only": {"topk": 3, "routed": False},
    "more_experts_than_landmarks": {"topk": 2, "experts_per_query": 8},
}


def causal_equality(rank: int, world: int, block: int, n_local: int) -> dict[str, list[float]]:
    """Frozen-horizon causal MiTA: landmarks are the block means of the queries (of every rank)."""
    out = {}
    for name, spec in CAUSAL_CASES.items():
        case = make_case(world, n_local, seed=7)
        case["landmarks"] = block_mean(case["q"], block)
        case["landmarks"] += 0.1 * torch.randn_like(case["landmarks"])  # a leaf of its own: its gradient
        kw = {"block_size": block, "landmark_horizon": "frozen", **spec}
        out[name] = max_errors(case, **kw)
    return out


def causal_errors(rank: int, world: int) -> list[str]:
    """What the causal form rejects, on every rank before any collective."""
    case = make_case(world, 12)
    q, k, v = (shard_sequence(case[n], 2) for n in ("q", "k", "v"))
    msgs = []
    for kw, lm in (({"landmark_horizon": "prefix"}, 3), ({"block_size": 5}, 2), ({}, 2)):
        try:
            kw = {"block_size": 4, "landmark_horizon": "frozen", **kw}
            context_parallel_causal_attention(q, k, v, q[:, :, :lm], topk=3, **kw)
        except ValueError as err:
            msgs.append(str(err))
    return msgs


def half_precision(rank: int, world: int) -> float:
    """bfloat16 inputs (computed in float32, as the single-process op): largest |difference| of outputs."""
    case = make_case(world, 12, seed=11)
    full = [case[n].to(torch.bfloat16) for n in ("q", "k", "v", "landmarks")]
    ref = mita_attention(*full, topk=4, backend="torch")
    out = context_parallel_attention(*(shard_sequence(t, 2) for t in full), topk=4)
    assert out.dtype == torch.bfloat16
    return (out.float() - shard_sequence(ref, 2).float()).abs().max().item()


def context_and_data_parallel(rank: int, world: int, cp: int) -> float:
    """DDP over all ranks around the sharded classifier, groups of ``cp`` consecutive ranks sharing a
    batch (as ``mita train --context-parallel``): after one backward, every rank's gradient equals the
    mean over the data-parallel groups of the plain model's gradients on their batches (float64)."""
    from torch.nn.parallel import DistributedDataParallel  # noqa: PLC0415 - once per forked rank, not at import

    torch.manual_seed(0)
    model = SequenceClassifier(11, 3, 48, dim=16, depth=2, num_heads=2, num_landmarks=4, topk=5).double()
    replicas, replica = data_parallel(DistInfo(rank, world), cp)
    g = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, 11, (3, 48), generator=g) for _ in range(replicas)]  # token 0 pads
    labels = [torch.randint(0, 3, (3,), generator=g) for _ in range(replicas)]
    ref = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for x, y in zip(batches, labels, strict=True):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        for n, p in model.named_parameters():
            ref[n] += p.grad / replicas
    model.zero_grad()
    ddp = DistributedDataParallel(context_parallel(model, DistInfo(rank, world), cp))
    torch.nn.functional.cross_entropy(ddp(batches[replica]), labels[replica]).backward()
    return max((p.grad - ref[n]).abs().max().item() for n, p in model.named_parameters())
