"""The ``pipeline`` section of a model config: which stages turn client data into the
model's tensors and its outputs into answers.

Each stage names its ``kind``; adding one is a class here (joined to the stage unions
below) and its runner in :mod:`serving.pipelines.runtime` (``INPUT_RUNNERS``). This module
imports only pydantic: listing a repository needs no imaging or tokenizing library.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: Formats the image stage decodes unless a config narrows them (Pillow's format names).
IMAGE_FORMATS = ("JPEG", "PNG")
#: Largest image (width x height) decoded by default: 40 megapixels.
DEFAULT_MAX_PIXELS = 40_000_000


class ImageInput(BaseModel):
    """Encoded images in (a ``BYTES`` input, one image per row), the model's tensor out:
    decode -> resize the shorter side -> center-crop -> scale and normalise -> NCHW."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["image"] = "image"
    #: The client-facing ``BYTES`` input (shape ``[batch]``).
    name: str = "image"
    #: The model input the decoded images fill.
    tensor: str
    #: The shorter side after resizing, in pixels.
    resize: int = Field(gt=0)
    #: The square center crop taken after resizing (the network's input size).
    crop: int = Field(gt=0)
    #: Multiplier applied to 0..255 pixel values before ``mean`` and ``std``.
    scale: float = 1.0 / 255.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    resample: Literal["nearest", "bilinear", "bicubic", "lanczos"] = "bilinear"
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    formats: tuple[str, ...] = IMAGE_FORMATS
    #: Images with more pixels are refused from their header, before any pixel is decoded.
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0)

    @property
    def tensors(self) -> tuple[str, ...]:
        """The model inputs this stage fills."""
        return (self.tensor,)

    @model_validator(mode="after")
    def _crop_fits(self) -> ImageInput:
        if self.crop > self.resize:
            raise ValueError(f"crop {self.crop} is larger than resize {self.resize}")
        if any(s == 0 for s in self.std):
            raise ValueError("std must not contain 0")
        return self


class TopKLabels(BaseModel):
    """The ``k`` best class names of a score output, as a ``BYTES`` output ``[batch, k]``."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["top_k_labels"] = "top_k_labels"
    #: The added output's name.
    name: str = "labels"
    #: The model output holding one score per class.
    tensor: str
    k: int = Field(5, gt=0)
    #: Class names, one a line in class order, relative to the model's folder.
    labels_file: str = "labels.txt"


#: Tokens a text stage keeps per text unless its config says otherwise.
DEFAULT_MAX_TOKENS = 128
#: Largest text (UTF-8 bytes) a text stage accepts: 1 MiB.
DEFAULT_MAX_TEXT_BYTES = 1 << 20


class TextInput(BaseModel):
    """Texts in (a ``BYTES`` input, one UTF-8 text per row), a transformer's token tensors
    out: tokenize with the model's ``tokenizer.json``, truncate to ``max_tokens``, pad to
    the longest text of the batch."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["text"] = "text"
    #: The client-facing ``BYTES`` input (shape ``[batch]``).
    name: str = "text"
    #: The Hugging Face ``tokenizers`` file, relative to the version folder (it belongs to
    #: the graph's vocabulary, so it travels with each version).
    tokenizer_file: str = "tokenizer.json"
    #: Tokens kept per text (special tokens included); longer texts are truncated.
    max_tokens: int = Field(DEFAULT_MAX_TOKENS, gt=0)
    #: Texts longer than this (UTF-8 bytes) are refused with a 413 before tokenizing.
    max_text_bytes: int = Field(DEFAULT_MAX_TEXT_BYTES, gt=0)
    #: The model inputs filled: token ids, attention mask, and token type ids (for the
    #: models that take them; ``None`` for those that do not).
    input_ids: str = "input_ids"
    attention_mask: str = "attention_mask"
    token_type_ids: str | None = None

    @property
    def tensors(self) -> tuple[str, ...]:
        """The model inputs this stage fills."""
        names = (self.input_ids, self.attention_mask, self.token_type_ids)
        return tuple(name for name in names if name is not None)


#: Input stages, told apart by ``kind``.
InputStage = Annotated[ImageInput | TextInput, Field(discriminator="kind")]
#: Output stages (likewise).
OutputStage = TopKLabels


class PipelineConfig(BaseModel):
    """What the server does before and after the model (either side may be absent)."""

    model_config = ConfigDict(extra="forbid")

    input: InputStage | None = None
    output: OutputStage | None = None
