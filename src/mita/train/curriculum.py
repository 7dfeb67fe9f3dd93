"""``mita train --curriculum LEN:PAIRS:STEPS[:BATCH],...``: short MQAR stages before the task itself.

Zoology trains MQAR on a mixture of lengths, most of it short; a curriculum does the same in order:
each stage trains ``STEPS`` optimizer steps on sequences of ``LEN`` tokens with ``PAIRS`` key-value pairs
(the task's other data options, e.g. its vocabulary, kept), ``BATCH`` sequences per step (default: the
run's batch size). The task's own steps (``--max-steps``) follow, under one learning-rate schedule over
all of them; the test set is always the task's. Stage batches are a pure function of (seed, stage,
step), so a run resumed inside a stage continues with the batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from mita.data import build_dataset

__all__ = ["Stage", "parse_curriculum", "stage_batches"]


@dataclass(frozen=True)
class Stage:
    """One curriculum stage: ``steps`` optimizer steps of ``batch_size`` sequences of ``seq_len`` tokens
    with ``num_pairs`` pairs (``batch_size`` None: the run's batch size)."""

    seq_len: int
    num_pairs: int
    steps: int
    batch_size: int | None = None


def parse_curriculum(text: str | None) -> list[Stage]:
    """The stages of ``LEN:PAIRS:STEPS[:BATCH],...`` (empty for None or ""); ValueError naming the stage."""
    if not text:
        return []
    stages = []
    for item in text.split(","):
        parts = item.strip().split(":")
        try:
            values = [int(v) for v in parts]
        except ValueError:
            values = []
        if len(values) not in (3, 4) or min(values) < 1:
            raise ValueError(
                f"--curriculum: stage {item!r} is not LEN:PAIRS:STEPS[:BATCH] with positive integers"
            )
        stages.append(Stage(*values))
    return stages


def check_stages(stages: list[Stage], task: str, data_kwargs: dict[str, Any]) -> None:
    """Build one example of every stage (the task's own checks, e.g. too many pairs for the length or the
    vocabulary) before any training; ValueError naming the stage."""
    if stages and task != "mqar":
        raise ValueError(f"--curriculum is for --task mqar (stages of LEN:PAIRS), not {task!r}")
    seq_len = data_kwargs.get("seq_len")
    for st in stages:
        if seq_len is not None and st.seq_len > seq_len:
            raise ValueError(
                f"--curriculum: stage {st.seq_len}:{st.num_pairs}:{st.steps} is longer than the task's "
                f"seq_len={seq_len} (the model's positions end there)"
            )
        try:
            build_dataset(task, "test", size=1, **_stage_kwargs(st, data_kwargs))
        except ValueError as err:
            raise ValueError(f"--curriculum: stage {st.seq_len}:{st.num_pairs}:{st.steps}: {err}") from None


def _stage_kwargs(st: Stage, data_kwargs: dict[str, Any]) -> dict[str, Any]:
    return {**{k: v for k, v in data_kwargs.items() if k not in ("size",)}, "seq_len": st.seq_len,
            "num_pairs": st.num_pairs}  # fmt: skip


def stage_batches(
    stages: list[Stage],
    task: str,
    data_kwargs: dict[str, Any],
    *,
    start: int,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The curriculum's batches ``(x, y)`` from overall step ``start`` to the end of the last stage.

    Step ``j`` of stage ``s`` takes this rank's share of the ``j``-th block of a permutation of the
    stage's training set seeded by ``(seed, s, pass)``: nothing depends on earlier steps."""
    offset = 0
    for s, st in enumerate(stages):
        if start >= offset + st.steps:
            offset += st.steps
            continue
        ds = build_dataset(task, "train", **_stage_kwargs(st, data_kwargs))
        per = st.batch_size or batch_size
        glob = per * world_size
        per_pass = len(ds) // glob
        if per_pass < 1:
            raise ValueError(f"--curriculum: stage {s}'s training set ({len(ds)}) is smaller than one batch")
        perm, perm_pass = None, -1
        for j in range(max(0, start - offset), st.steps):
            p, i = divmod(j, per_pass)
            if p != perm_pass:
                g = torch.Generator().manual_seed(seed * 1_000_003 + s * 1009 + p)
                perm, perm_pass = torch.randperm(len(ds), generator=g), p
            idx = perm[i * glob + rank * per : i * glob + (rank + 1) * per]
            xs, ys = zip(*(ds[int(t)] for t in idx))
            yield torch.stack(xs), torch.stack(ys)
        offset += st.steps
