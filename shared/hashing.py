"""File digests: the one sha256 of a file that artifacts, downloads and engine caches use."""

from __future__ import annotations

import hashlib
from pathlib import Path

#: Bytes read at a time (large model files are never read whole into memory).
CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
