"""The text model repository: language and embedding models built from PyPI packages.

It is a repository of its own (``models/text-repository``, not committed: the files are
hundreds of megabytes and come from PyPI), so tools and tests that serve the digits
repository do not load language models. ``tether up`` seeds the device's and the cloud's
repositories from both.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from models.language_models import LANGUAGE_MODELS, build_language_model
from models.language_models import is_built as language_built
from models.text_embeddings import EMBEDDING_MODELS, build_embedding_model
from models.text_embeddings import is_built as embedding_built

DEFAULT_TEXT_REPOSITORY = Path("models/text-repository")
#: Every text model ``tether models build`` sets up, in build order.
TEXT_MODEL_NAMES: tuple[str, ...] = (*LANGUAGE_MODELS, *EMBEDDING_MODELS)


def is_built(name: str, repository: Path) -> bool:
    """Whether the text model ``name`` is already in ``repository``."""
    if name in LANGUAGE_MODELS:
        return language_built(LANGUAGE_MODELS[name], repository)
    return embedding_built(EMBEDDING_MODELS[name], repository)


def build_text_models(
    repository: Path,
    names: Sequence[str] = TEXT_MODEL_NAMES,
    *,
    force: bool = False,
    echo: Callable[[str], None] = print,
) -> list[str]:
    """Build the named text models into ``repository``; returns the names built now."""
    unknown = [n for n in names if n not in TEXT_MODEL_NAMES]
    if unknown:
        raise ValueError(f"unknown text model(s) {unknown}; known: {list(TEXT_MODEL_NAMES)}")
    built = []
    work_dir = repository / ".work"
    try:
        for name in names:
            if not force and is_built(name, repository):
                echo(f"{name}: already built in {repository}")
                continue
            started = time.monotonic()
            if name in LANGUAGE_MODELS:
                build_language_model(LANGUAGE_MODELS[name], repository)
            else:
                build_embedding_model(EMBEDDING_MODELS[name], repository, work_dir)
            echo(f"{name}: built in {time.monotonic() - started:.0f} s")
            built.append(name)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return built
