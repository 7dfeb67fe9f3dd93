"""A DistributedSampler that can start mid-epoch, so ``--resume`` skips exactly the batches already seen."""

from __future__ import annotations

from collections.abc import Iterator, Sized

from torch.utils.data import DistributedSampler


class ResumableSampler(DistributedSampler):
    """:class:`~torch.utils.data.DistributedSampler` (seeded shuffle per epoch, one shard per rank)
    whose iteration can begin ``start`` indices into the epoch's shard.

    The epoch's permutation depends only on ``seed`` and the epoch (``set_epoch``), so a resumed run
    sees the same order and, after skipping ``start`` indices, exactly the samples the killed run had
    not consumed yet. Works in a single process too (``num_replicas=1, rank=0``).
    """

    def __init__(
        self, dataset: Sized, *, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.start = 0

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` indices of the current epoch (reset by the next ``set_epoch``)."""
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start must be in [0, {self.num_samples}], got {start}")
        self.start = start

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start :])

    def __len__(self) -> int:
        return self.num_samples - self.start
