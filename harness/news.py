"""The news pair for tests: where the built models are, and real 20 Newsgroups documents."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.news import REPORT_FILE, STUDENT_NAME, TEACHER_NAME, VERSION

ROOT = Path(__file__).resolve().parent.parent
REPOSITORY = ROOT / "models" / "repository"
TEXT_REPOSITORY = ROOT / "models" / "text-repository"
STUDENT = STUDENT_NAME
TEACHER = TEACHER_NAME


def news_built() -> bool:
    """Whether ``tether models build`` (run by ``make install``) built the news pair."""
    return (REPOSITORY / REPORT_FILE).is_file() and all(
        (REPOSITORY / name / VERSION / "model.onnx").is_file() for name in (STUDENT, TEACHER)
    )


def texts_array(texts: list[str]) -> np.ndarray:
    """Texts as a V2 ``BYTES`` array (UTF-8)."""
    array = np.empty(len(texts), dtype=object)
    array[:] = [text.encode("utf-8") for text in texts]
    return array
