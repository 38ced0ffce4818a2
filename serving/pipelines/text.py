"""Texts to a transformer's token tensors, with the model's own ``tokenizer.json``.

Texts arrive as ``BYTES`` elements, one UTF-8 text per row (JSON strings, the binary
extension, MQTT payloads). Each must be valid UTF-8, not blank, and at most
``max_text_bytes`` long; a bad row is a 4xx error naming it, never a crash. The Hugging
Face ``tokenizers`` library (Rust, no torch) tokenizes the batch, truncates each text to
``max_tokens`` and pads to the longest text of the batch, so the graph sees exactly what the
model was trained on.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from serving.pipelines.config import TextInput
from serving.runtimes.base import TensorSpec
from shared.errors import InvalidInput, PayloadTooLarge, Unavailable

#: Token tensors are INT64 (what sentence-transformers' exported graphs take).
TOKEN_DATATYPE = "INT64"


class TextTokenizer:
    """Turns one model's texts into its token tensors (configured once, reused)."""

    def __init__(self, stage: TextInput, tokenizer: Any) -> None:
        self.stage = stage
        tokenizer.enable_truncation(max_length=stage.max_tokens)
        pad = tokenizer.padding or {}
        tokenizer.enable_padding(
            pad_id=pad.get("pad_id", 0), pad_token=pad.get("pad_token", "[PAD]")
        )
        self._tokenizer = tokenizer

    @classmethod
    def from_folder(cls, stage: TextInput, version_dir: Path) -> TextTokenizer:
        """Read the stage's ``tokenizer.json`` from the model's version folder."""
        from tokenizers import Tokenizer

        path = version_dir / stage.tokenizer_file
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:
            raise Unavailable(f"cannot read the tokenizer {path}: {exc}") from None
        return cls(stage, tokenizer)

    @property
    def tensors(self) -> tuple[str, ...]:
        return self.stage.tensors

    def client_spec(self, network: Mapping[str, TensorSpec]) -> TensorSpec:
        """The ``BYTES`` input clients send, once the network's token inputs are checked."""
        for name in self.tensors:
            spec = network.get(name)
            if spec is None or spec.datatype != TOKEN_DATATYPE or len(spec.shape) != 2:
                shown = f"{spec.datatype}{list(spec.shape)}" if spec else "missing"
                raise Unavailable(
                    f"input {name!r} is {shown}, but the text pipeline makes INT64[batch, tokens]"
                )
        return TensorSpec(self.stage.name, "BYTES", (network[self.tensors[0]].shape[0],))

    def texts(self, items: np.ndarray) -> list[str]:
        """A ``BYTES`` array of texts -> the texts, each checked."""
        return [self.text(item, row) for row, item in enumerate(items.ravel())]

    def text(self, item: object, row: int = 0) -> str:
        """One ``BYTES`` element -> its text (valid UTF-8, not blank, within the bound)."""
        if isinstance(item, str):
            item = item.encode("utf-8", "surrogatepass")
        if not isinstance(item, (bytes, bytearray, memoryview)):
            raise InvalidInput(f"text {row}: expected UTF-8 text, got {type(item).__name__}")
        data = bytes(item)
        if len(data) > self.stage.max_text_bytes:
            raise PayloadTooLarge(
                f"text {row}: {len(data):,} bytes is over the limit of "
                f"{self.stage.max_text_bytes:,}"
            )
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInput(
                f"text {row}: not valid UTF-8 ({exc.reason} at byte {exc.start})"
            ) from None
        if not text.strip():
            raise InvalidInput(f"text {row}: empty")
        return text

    def feeds(self, items: np.ndarray) -> dict[str, np.ndarray]:
        """A ``BYTES`` array of texts -> the network's token tensors ``[batch, tokens]``."""
        encodings = self._tokenizer.encode_batch(self.texts(items))
        stage = self.stage
        feeds = {
            stage.input_ids: np.array([e.ids for e in encodings], dtype=np.int64),
            stage.attention_mask: np.array([e.attention_mask for e in encodings], dtype=np.int64),
        }
        if stage.token_type_ids is not None:
            feeds[stage.token_type_ids] = np.array([e.type_ids for e in encodings], np.int64)
        return feeds

    def wire(self, items: np.ndarray) -> np.ndarray:
        """The texts as UTF-8 bytes: what an escalation sends (the cloud model tokenizes with
        its own vocabulary, so token ids are never the faithful form)."""
        raw = np.empty(items.shape, dtype=object)
        for row, item in enumerate(items.ravel()):
            raw.flat[row] = self.text(item, row).encode("utf-8")
        return raw

    def fits(self, cloud: Mapping[str, TensorSpec]) -> bool:
        """Never: another model's token ids would be read with another vocabulary."""
        return False

    def sample(self, batch: int) -> np.ndarray:
        """Texts for a warm-up run: as long as the stage keeps."""
        texts = np.empty(batch, dtype=object)
        texts[:] = [("warm up " * self.stage.max_tokens).encode()] * batch
        return texts
