"""Schema versions and the compatibility rule every reader applies.

A reader accepts any minor version of its own major (newer minors only add optional
fields, which it ignores), and rejects an unknown major with a clear error instead of
guessing what the message means.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from shared.errors import SchemaVersionError

_VERSION = re.compile(r"^(\d{1,4})\.(\d{1,4})$")


@dataclass(frozen=True, order=True)
class SchemaVersion:
    """A ``MAJOR.MINOR`` schema version."""

    major: int
    minor: int

    @classmethod
    def parse(cls, text: object) -> SchemaVersion:
        if not isinstance(text, str) or not (match := _VERSION.match(text)):
            raise SchemaVersionError(f"schema_version must be 'MAJOR.MINOR', got {text!r}")
        return cls(int(match.group(1)), int(match.group(2)))

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"

    def accepts(self, other: SchemaVersion) -> bool:
        """True when a reader at this version can read a message at ``other``."""
        return other.major == self.major


def check_readable(received: object, reader: SchemaVersion, what: str) -> SchemaVersion:
    """Parse a received ``schema_version`` and reject it unless ``reader`` can read it.

    A missing version (``None``) is read as the reader's own: plain Open Inference Protocol
    clients send none.
    """
    if received is None:
        return reader
    version = SchemaVersion.parse(received)
    if not reader.accepts(version):
        raise SchemaVersionError(
            f"unsupported schema_version {version} for {what}: this reader speaks "
            f"{reader.major}.x (up to {reader}); upgrade the reader or send {reader.major}.x"
        )
    return version
