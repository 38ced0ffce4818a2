"""The digits data set and its fixed splits, shared by training, distillation and calibration.

The data is scikit-learn's ``load_digits`` (1,797 8x8 greyscale digits, pixel values 0..16).
It is split once, stratified and with seed 0, into 60 % train, 20 % calibration and 20 %
test, so every tool (the build, cascade calibration, INT8 calibration) sees the same rows.
scikit-learn is imported lazily: serving never needs it.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal, get_args

import numpy as np

SplitName = Literal["train", "calibration", "test"]

#: The seed of the one split every tool uses.
SPLIT_SEED = 0
#: Fractions of the data set in each split, in order.
SPLIT_FRACTIONS: dict[SplitName, float] = {"train": 0.6, "calibration": 0.2, "test": 0.2}
#: How the data set is named in model configs.
DATASET_DESCRIPTION = "sklearn load_digits, seed 0"
#: Pixels per image (8x8) and classes (digits 0..9).
NUM_FEATURES = 64
NUM_CLASSES = 10


@lru_cache(maxsize=1)
def _splits() -> dict[SplitName, tuple[np.ndarray, np.ndarray]]:
    """Load the data set once and cut it into the three fixed, stratified splits."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the digits data set needs scikit-learn: pip install 'tether[train]'"
        ) from exc

    data = load_digits()
    x = np.asarray(data.data, dtype=np.float32)
    y = np.asarray(data.target, dtype=np.int64)
    x_train, x_rest, y_train, y_rest = train_test_split(
        x, y, train_size=SPLIT_FRACTIONS["train"], stratify=y, random_state=SPLIT_SEED
    )
    x_cal, x_test, y_cal, y_test = train_test_split(
        x_rest, y_rest, train_size=0.5, stratify=y_rest, random_state=SPLIT_SEED
    )
    return {
        "train": (x_train, y_train),
        "calibration": (x_cal, y_cal),
        "test": (x_test, y_test),
    }


def load_split(name: SplitName) -> tuple[np.ndarray, np.ndarray]:
    """One split as ``(pixels, labels)``: float32 ``[N, 64]`` raw 0..16 values, int64 labels.

    The arrays are fresh copies, so callers may modify them.
    """
    if name not in get_args(SplitName):
        raise ValueError(f"unknown split {name!r}; expected one of {get_args(SplitName)}")
    x, y = _splits()[name]
    return x.copy(), y.copy()
