"""Sentence encoders: an ONNX graph (token ids -> pooled, normalised embedding) and its
``tokenizer.json``, run by ONNX Runtime and Hugging Face ``tokenizers``.

The graph is what ``tether models build`` exports (``models/text_embeddings.py``): the
transformer, mean pooling over the attention mask and L2 normalisation, so the runtime only
tokenizes (truncating to the model's ``max_seq_length``, padding to the longest text of the
batch) and runs it. Over V2 the model takes the token tensors like any ONNX model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from serving.model_config import ModelConfig
from serving.runtimes.base import RuntimeOptions, model_file
from serving.runtimes.generation import TextEmbedder
from serving.runtimes.onnx import OnnxRuntime
from shared.errors import InvalidInput, Unavailable

TOKENIZER_FILE = "tokenizer.json"
DEFAULT_MAX_SEQ_LENGTH = 256


class EmbeddingRuntime(OnnxRuntime, TextEmbedder):
    """A sentence encoder: texts in, one normalised vector per text out."""

    platform = "onnx_text_embedding"

    def __init__(
        self,
        name: str,
        version: str,
        version_dir: Path,
        config: ModelConfig,
        options: RuntimeOptions,
    ) -> None:
        super().__init__(name, version, version_dir, config, options)
        self.tokenizer_path = model_file(version_dir, TOKENIZER_FILE)
        self.max_seq_length = int(config.parameters.get("max_seq_length", DEFAULT_MAX_SEQ_LENGTH))
        self._tokenizer: object | None = None
        self._input_names: list[str] = []
        self._output = ""

    def load(self) -> None:
        from tokenizers import Tokenizer

        super().load()
        try:
            tokenizer = Tokenizer.from_file(str(self.tokenizer_path))
        except Exception as exc:
            raise Unavailable(f"model {self.name!r}: bad {TOKENIZER_FILE}: {exc}") from None
        pad = tokenizer.padding or {}
        tokenizer.enable_truncation(max_length=self.max_seq_length)
        tokenizer.enable_padding(
            pad_id=pad.get("pad_id", 0), pad_token=pad.get("pad_token", "[PAD]")
        )
        self._tokenizer = tokenizer
        self._input_names = [spec.name for spec in self.inputs]
        self._output = self.outputs[0].name
        self.dimension = int(self.outputs[0].shape[-1])

    def embed(self, texts: Sequence[str]) -> tuple[np.ndarray, int]:
        if self._tokenizer is None:
            raise Unavailable(f"model {self.name!r} v{self.version} is not loaded")
        if not texts:
            raise InvalidInput("no text to embed")
        encodings = self._tokenizer.encode_batch(list(texts))  # type: ignore[attr-defined]
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._input_names:
            feeds["token_type_ids"] = np.array([e.type_ids for e in encodings], dtype=np.int64)
        vectors = self.predict(feeds, [self._output])[self._output]
        return vectors.astype(np.float32, copy=False), int(mask.sum())

    def warm_up(self, batch_sizes: Sequence[int] = (1,)) -> None:
        """Embed a short text (the first call pays ONNX Runtime's set-up)."""
        self.embed(["warm up"])
