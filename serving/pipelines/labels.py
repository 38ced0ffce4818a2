"""Scores to class names: the top-k labels output of a classifier."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from serving.pipelines.config import TopKLabels
from shared.errors import InternalError


class TopKLabeller:
    """The ``k`` best class names of each row of scores, best first, as ``BYTES``."""

    def __init__(self, stage: TopKLabels, labels: list[str]) -> None:
        if not labels:
            raise InternalError(f"labels for output {stage.name!r}: the labels file is empty")
        self.stage = stage
        self.k = min(stage.k, len(labels))
        self._names = np.array([label.encode() for label in labels], dtype=object)

    @classmethod
    def from_file(cls, stage: TopKLabels, model_dir: Path) -> TopKLabeller:
        """Read the class names (one a line) from the model's folder."""
        path = model_dir / stage.labels_file
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise InternalError(f"cannot read the labels file {path}: {exc}") from exc
        return cls(stage, [line.strip() for line in lines if line.strip()])

    @property
    def classes(self) -> int:
        return len(self._names)

    @property
    def names(self) -> list[str]:
        """The class names, in class order."""
        return [name.decode() for name in self._names]

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        """``[batch, classes]`` scores -> ``[batch, k]`` class names."""
        if scores.ndim != 2 or scores.shape[1] != len(self._names):
            raise InternalError(
                f"output {self.stage.tensor!r} has shape {list(scores.shape)}, but the labels "
                f"file names {len(self._names)} classes"
            )
        top = np.argpartition(-scores, self.k - 1, axis=1)[:, : self.k]
        order = np.take_along_axis(scores, top, axis=1).argsort(axis=1)[:, ::-1]
        best = np.take_along_axis(top, order, axis=1)
        return self._names[best]
