"""Real images for the image-model tests: scikit-image's samples, and a decompression bomb."""

from __future__ import annotations

import struct
import zlib
from functools import cache
from pathlib import Path

import numpy as np

from serving.pipelines.image import encode_image

ROOT = Path(__file__).resolve().parent.parent
REPOSITORY = ROOT / "models" / "repository"
LITE0 = "efficientnet-lite0"
LITE2 = "efficientnet-lite2"


def images_built() -> bool:
    """Whether ``tether models build`` (run by ``make install``) built the image models."""
    return all((REPOSITORY / name / "1" / "model.onnx").is_file() for name in (LITE0, LITE2))


@cache
def sample(name: str, fmt: str = "JPEG") -> bytes:
    """scikit-image's sample ``name`` (``chelsea``, ``coffee``...) encoded as ``fmt``."""
    import skimage.data

    pixels = getattr(skimage.data, name)()
    if pixels.ndim == 2:
        pixels = np.stack([pixels] * 3, axis=-1)
    return encode_image(pixels, fmt)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@cache
def png_bomb(side: int = 20_000) -> bytes:
    """A valid ``side`` x ``side`` PNG (1-bit greyscale, all black) of a few tens of kB that
    would decode to ``side``\\ :sup:`2` pixels (1.2 GB as RGB for 20,000)."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    chunks = [packer.compress(row * 1000) for _ in range(side // 1000)]
    chunks.append(packer.compress(row * (side % 1000)))
    chunks.append(packer.flush())
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", b"".join(chunks))
        + _chunk(b"IEND", b"")
    )
