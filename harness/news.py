"""The news pair for tests: where the models are, and texts as V2 ``BYTES``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
REPOSITORY = ROOT / "models" / "repository"
TEXT_REPOSITORY = ROOT / "models" / "text-repository"


def texts_array(texts: list[str]) -> np.ndarray:
    """Texts as a V2 ``BYTES`` array (UTF-8)."""
    array = np.empty(len(texts), dtype=object)
    array[:] = [text.encode("utf-8") for text in texts]
    return array
