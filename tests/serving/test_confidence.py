"""Confidence measures."""

from __future__ import annotations

import numpy as np
import pytest

from serving.confidence import as_probabilities, confidence

PROBS = np.array([[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0]], dtype=np.float32)


def test_max_probability() -> None:
    np.testing.assert_allclose(confidence(PROBS), [0.7, 1 / 3, 1.0], rtol=1e-6)


def test_margin() -> None:
    np.testing.assert_allclose(confidence(PROBS, "margin"), [0.5, 0.0, 1.0], atol=1e-6)


def test_entropy_is_one_for_one_hot_and_zero_for_uniform() -> None:
    conf = confidence(PROBS, "entropy")
    assert conf[2] == pytest.approx(1.0)
    assert conf[1] == pytest.approx(0.0, abs=1e-6)
    assert 0.0 < conf[0] < 1.0


def test_logits_are_softmaxed() -> None:
    logits = np.array([[2.0, 0.0, -1.0]])
    probs = as_probabilities(logits)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    assert confidence(logits)[0] == pytest.approx(probs.max())


def test_unknown_measure_and_bad_shape() -> None:
    with pytest.raises(ValueError, match="unknown confidence measure"):
        confidence(PROBS, "vibes")
    with pytest.raises(ValueError, match="shape"):
        confidence(np.zeros((2, 1)))
