"""Task descriptions: what each data set yields, so models can be sized without loading any data."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TaskInfo", "TASKS", "get_task", "PAD_ID"]

PAD_ID = 0  # token id 0 is padding in every sequence/pair task


@dataclass(frozen=True)
class TaskInfo:
    """Static description of a task.

    ``kind`` says what ``x`` is: ``"image"``: float ``[C, H, W]``; ``"sequence"``: long ``[L]``;
    ``"pair"``: a tuple of two long ``[L]`` tensors. Sequence tasks built from images (``pathfinder``,
    ``image``) also give their raster ``image_size``/``channels`` so models may pool landmarks in 2-D.
    """

    name: str
    kind: str
    num_classes: int
    vocab_size: int | None
    seq_len: int | None
    image_size: tuple[int, int] | None
    channels: int | None


TASKS: dict[str, TaskInfo] = {
    "fmnist": TaskInfo("fmnist", "image", 10, None, None, (28, 28), 1),
    # pad + 10 digits + [MAX [MIN [MED [SM + ]
    "listops": TaskInfo("listops", "sequence", 10, 16, 2000, None, None),
    # byte/pixel tasks: token = value + 1, so 256 levels + pad = 257
    "pathfinder": TaskInfo("pathfinder", "sequence", 2, 257, 1024, (32, 32), 1),
    "image": TaskInfo("image", "sequence", 10, 257, 1024, (32, 32), 1),
    "text": TaskInfo("text", "sequence", 3, 257, 4000, None, None),
    "retrieval": TaskInfo("retrieval", "pair", 2, 257, 4000, None, None),
}


def get_task(name: str) -> TaskInfo:
    """The canonical :class:`TaskInfo` of ``name``; ``ValueError`` listing the valid names otherwise."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}") from None
