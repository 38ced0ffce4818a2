"""Confidence of a classifier's answer, per row: what a cascade compares with its threshold.

Every measure maps a row of class scores to ``[0, 1]``, higher meaning more sure:

* ``max_probability`` — the top class's probability;
* ``margin`` — the top probability minus the runner-up's;
* ``entropy`` — one minus the entropy normalised by ``log(classes)``.

Scores that are not already probabilities (negative, or rows not summing to one) are
taken as logits and put through a softmax first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

import numpy as np

Measure = Literal["max_probability", "margin", "entropy"]
MEASURES: tuple[str, ...] = get_args(Measure)


def as_probabilities(scores: np.ndarray) -> np.ndarray:
    """``[N, K]`` probabilities from probabilities or logits (float64)."""
    array = np.asarray(scores, dtype=np.float64)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] < 2:
        raise ValueError(f"confidence needs class scores of shape [N, K>=2], got {array.shape}")
    sums = array.sum(axis=1)
    if np.all(array >= 0) and np.allclose(sums, 1.0, atol=1e-3):
        return array
    shifted = array - array.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return np.asarray(exp / exp.sum(axis=1, keepdims=True))


def max_probability(probs: np.ndarray) -> np.ndarray:
    """The top class's probability, per row."""
    return np.asarray(probs.max(axis=1))


def margin(probs: np.ndarray) -> np.ndarray:
    """Top probability minus the second, per row."""
    top2 = np.sort(probs, axis=1)[:, -2:]
    return np.asarray(top2[:, 1] - top2[:, 0])


def entropy(probs: np.ndarray) -> np.ndarray:
    """One minus the normalised entropy, per row (1 = one-hot, 0 = uniform)."""
    clipped = np.clip(probs, 1e-12, 1.0)
    h = -(probs * np.log(clipped)).sum(axis=1)
    return np.asarray(np.clip(1.0 - h / np.log(probs.shape[1]), 0.0, 1.0))


_MEASURES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "max_probability": max_probability,
    "margin": margin,
    "entropy": entropy,
}


def confidence(scores: np.ndarray, measure: str = "max_probability") -> np.ndarray:
    """Per-row confidence in ``[0, 1]`` of class scores ``[N, K]`` under ``measure``."""
    try:
        fn = _MEASURES[measure]
    except KeyError:
        raise ValueError(f"unknown confidence measure {measure!r}; use one of {MEASURES}") from None
    return fn(as_probabilities(scores))
