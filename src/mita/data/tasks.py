"""Task descriptions: what each data set yields, so models can be sized without loading any data."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TaskInfo", "TASKS", "DATA_TASKS", "get_task", "PAD_ID"]

PAD_ID = 0  # token id 0 is padding in every sequence/pair task


@dataclass(frozen=True)
class TaskInfo:
    """Static description of a task.

    ``kind`` says what ``x`` is: ``"image"``: float ``[C, H, W]``; ``"sequence"``: long ``[L]``;
    ``"pair"``: a tuple of two long ``[L]`` tensors; ``"lm"``: ``(x, y)``, both long ``[L]``, ``y`` the
    next-token targets with ``-100`` where a position has no loss (``num_classes`` = ``vocab_size``);
    ``"segmentation"``: ``(x float [C, H, W], y long [H, W])``, a class per pixel.
    Sequence tasks built from images (``pathfinder``, ``image``) also give their raster
    ``image_size``/``channels`` so models may pool landmarks in 2-D. ``bytes_per_token`` (language
    modelling on text) converts a loss in nats per token to bits per byte: ``loss / ln 2 / bytes_per_token``.
    """

    name: str
    kind: str
    num_classes: int
    vocab_size: int | None
    seq_len: int | None
    image_size: tuple[int, int] | None
    channels: int | None
    bytes_per_token: float | None = None


TASKS: dict[str, TaskInfo] = {
    "fmnist": TaskInfo("fmnist", "image", 10, None, None, (28, 28), 1),
    # pad + 10 digits + [MAX [MIN [MED [SM + ]
    "listops": TaskInfo("listops", "sequence", 10, 16, 2000, None, None),
    # byte/pixel tasks: token = value + 1, so 256 levels + pad = 257
    "pathfinder": TaskInfo("pathfinder", "sequence", 2, 257, 1024, (32, 32), 1),
    "image": TaskInfo("image", "sequence", 10, 257, 1024, (32, 32), 1),
    "text": TaskInfo("text", "sequence", 3, 257, 4000, None, None),
    "retrieval": TaskInfo("retrieval", "pair", 2, 257, 4000, None, None),
    # byte-level language modelling on the plays (split by play); context up to 4096 (seq_len)
    "shakespeare-char": TaskInfo("shakespeare-char", "lm", 256, 256, 1024, None, None, 1.0),
    # multi-query associative recall (Zoology); vocab_size, num_pairs and seq_len are data arguments
    "mqar": TaskInfo("mqar", "lm", 1024, 1024, 512, None, None),
    # scenes of Fashion-MNIST items with per-pixel labels (background + 10); canvas is a data argument
    "fmnist-seg": TaskInfo("fmnist-seg", "segmentation", 11, None, None, (128, 128), 1),
}


# Tasks sized by their data (classes, image size, channels: mita.data.imagefolder.folder_info): the entry
# here only says what kind of task it is; the dataset's ``.info`` is the real description.
DATA_TASKS: dict[str, TaskInfo] = {"imagefolder": TaskInfo("imagefolder", "image", 0, None, None, None, None)}


def get_task(name: str) -> TaskInfo:
    """The canonical :class:`TaskInfo` of ``name``; ``ValueError`` listing the valid names otherwise."""
    try:
        return TASKS[name] if name in TASKS else DATA_TASKS[name]
    except (KeyError, TypeError):
        valid = ", ".join([*TASKS, *DATA_TASKS])
        raise ValueError(f"unknown task {name!r}; valid tasks: {valid}") from None
