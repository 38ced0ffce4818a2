"""Encoded images to a model's input tensor, with Pillow, within bounds.

Decoding is bounded before it starts: Pillow reads only the header when it opens an
image, so the format and the pixel count are checked first and an image over
``max_pixels`` (a decompression bomb: a few kilobytes of PNG that would decode to
gigabytes) is refused without decoding a pixel. JPEGs much larger than the model's input
are decoded at a reduced DCT scale (Pillow's ``draft``), which is both faster and smaller
in memory; the result still has at least ``resize`` pixels on its shorter side.

Images arrive as ``BYTES`` elements: raw file bytes (the binary extension, MQTT) or the
same base64-encoded (JSON, whose strings cannot carry raw bytes). The two cannot be
confused: JPEG and PNG files start with bytes that base64 text never contains.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from collections.abc import Mapping

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from serving.pipelines.config import ImageInput
from serving.runtimes.base import TensorSpec
from shared.errors import InvalidInput, PayloadTooLarge, Unavailable

#: File signatures of the formats Pillow may be asked to decode (checked before base64).
_SIGNATURES = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",  # PNG
    b"GIF8",
    b"BM",
    b"RIFF",  # WebP
    b"II*\x00",  # TIFF
    b"MM\x00*",
)
_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


class ImageDecoder:
    """Turns one model's encoded images into its input tensor (configured once, reused)."""

    def __init__(self, stage: ImageInput) -> None:
        self.stage = stage
        self._resample = _RESAMPLE[stage.resample]
        std = np.asarray(stage.std, dtype=np.float32)
        #: ``pixel * gain + offset`` == ``(pixel * scale - mean) / std``, per channel.
        self._gain = (np.float32(stage.scale) / std).astype(np.float32)
        self._offset = (-np.asarray(stage.mean, dtype=np.float32) / std).astype(np.float32)

    @property
    def shape(self) -> tuple[int, int, int]:
        """One image's tensor shape (without the batch)."""
        c = self.stage.crop
        return (3, c, c) if self.stage.layout == "NCHW" else (c, c, 3)

    @property
    def tensors(self) -> tuple[str, ...]:
        return self.stage.tensors

    def client_spec(self, network: Mapping[str, TensorSpec]) -> TensorSpec:
        """The ``BYTES`` input clients send, once the network's image input is checked."""
        spec = network.get(self.stage.tensor)
        if spec is None or tuple(spec.shape[1:]) != self.shape or spec.datatype != "FP32":
            shown = f"{spec.datatype}{list(spec.shape)}" if spec else "missing"
            raise Unavailable(
                f"input {self.stage.tensor!r} is {shown}, but the image pipeline makes "
                f"FP32{[-1, *self.shape]}"
            )
        return TensorSpec(self.stage.name, "BYTES", (spec.shape[0],))

    def feeds(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """A ``BYTES`` array of encoded images -> the network's input tensor."""
        return {self.stage.tensor: self.batch(images)}

    def wire(self, images: np.ndarray) -> np.ndarray:
        """Each image as its file's bytes (a JSON client's base64 text decoded): the
        smallest faithful form, what an escalation sends."""
        raw = np.empty(images.shape, dtype=object)
        for index, item in enumerate(images.ravel()):
            raw.flat[index] = file_bytes(item, index)
        return raw

    def fits(self, cloud: Mapping[str, TensorSpec]) -> bool:
        """Whether ``cloud`` takes exactly this stage's tensor (and not the images)."""
        tensor = cloud.get(self.stage.tensor)
        return (
            self.stage.name not in cloud
            and tensor is not None
            and tensor.datatype == "FP32"
            and tuple(tensor.shape[1:]) == self.shape
        )

    def sample(self, batch: int) -> np.ndarray:
        """Synthetic JPEGs for a warm-up run (decoding included)."""
        side = self.stage.resize + 16
        gradient = np.linspace(0, 255, side * side * 3).reshape(side, side, 3)
        images = np.empty(batch, dtype=object)
        images[:] = [encode_image(gradient.astype(np.uint8))] * batch
        return images

    def batch(self, images: np.ndarray) -> np.ndarray:
        """A ``BYTES`` array of encoded images -> FP32 ``[batch, *shape]``."""
        flat = images.ravel()
        out = np.empty((len(flat), *self.shape), dtype=np.float32)
        for i, item in enumerate(flat):
            out[i] = self.tensor(item, i)
        return out

    def tensor(self, item: object, row: int = 0) -> np.ndarray:
        """One encoded image -> its normalised tensor."""
        pixels = np.asarray(self.decode(item, row), dtype=np.float32)
        pixels = pixels * self._gain + self._offset
        if self.stage.layout == "NCHW":
            pixels = pixels.transpose(2, 0, 1)
        return pixels

    def decode(self, item: object, row: int = 0) -> Image.Image:
        """One encoded image -> an RGB image of ``crop`` x ``crop`` pixels."""
        data = file_bytes(item, row)
        stage = self.stage
        try:
            with warnings.catch_warnings():
                # Pillow warns past its own bomb limit; ours is checked just below
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data), formats=list(stage.formats))
            with image:
                self.check_header(image, row)
                image.draft("RGB", (stage.resize, stage.resize))
                upright = ImageOps.exif_transpose(image)
                if upright.mode != "RGB":
                    upright = upright.convert("RGB")
                return upright.resize(
                    (stage.crop, stage.crop), self._resample, box=self._box(upright)
                )
        except UnidentifiedImageError:
            raise InvalidInput(
                f"image {row}: not a {' or '.join(stage.formats)} image this model can read"
            ) from None
        except Image.DecompressionBombError as exc:  # Pillow's own header check, past ours
            raise PayloadTooLarge(
                f"image {row}: over the limit of {stage.max_pixels:,} pixels (refused from its "
                f"header, not decoded): {exc}"
            ) from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise InvalidInput(f"image {row}: cannot decode it: {exc}") from None

    def check_header(self, image: Image.Image, row: int) -> None:
        """Refuse an image by its header (its size), before its pixels are decoded."""
        width, height = image.size
        if width <= 0 or height <= 0:
            raise InvalidInput(f"image {row}: empty ({width} x {height} pixels)")
        if width * height > self.stage.max_pixels:
            raise PayloadTooLarge(
                f"image {row}: {width} x {height} pixels is over the limit of "
                f"{self.stage.max_pixels:,} pixels (refused from its header, not decoded)"
            )

    def _box(self, image: Image.Image) -> tuple[float, float, float, float]:
        """The source region that resizing the shorter side to ``resize`` and then cropping
        the center ``crop`` square would keep: resize and crop become one resampling."""
        width, height = image.size
        side = min(width, height) * self.stage.crop / self.stage.resize
        left = (width - side) / 2.0
        top = (height - side) / 2.0
        return (left, top, left + side, top + side)


def file_bytes(item: object, row: int = 0) -> bytes:
    """A ``BYTES`` element as the image file's bytes: raw, or base64 text of them."""
    if isinstance(item, str):
        item = item.encode("latin-1", "replace")
    if not isinstance(item, (bytes, bytearray, memoryview)):
        raise InvalidInput(f"image {row}: expected encoded image bytes, got {type(item).__name__}")
    data = bytes(item)
    if not data:
        raise InvalidInput(f"image {row}: empty")
    if data.startswith(_SIGNATURES):
        return data
    try:
        decoded = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"image {row}: neither an image file nor base64 text of one") from None
    if not decoded.startswith(_SIGNATURES):
        raise InvalidInput(f"image {row}: the base64 text does not hold an image file")
    return decoded


def encode_image(pixels: np.ndarray, fmt: str = "JPEG", quality: int = 90) -> bytes:
    """An ``HxWx3`` uint8 array as an encoded image (warm-up inputs, tests, benchmarks)."""
    buffer = io.BytesIO()
    options = {"quality": quality} if fmt == "JPEG" else {}
    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)).save(buffer, fmt, **options)
    return buffer.getvalue()
