"""Schema versions and the evolution rule every message type follows.

Every message carries ``schema_version`` (``MAJOR.MINOR``). The rule, which
``make lint`` checks on the committed JSON Schemas (:mod:`shared.schema_compat`) and the
mixed-version tests prove on the wire (``tests/shared/test_mixed_versions.py``):

* **A new minor only adds optional fields.** Nothing that a reader or writer of an
  earlier minor relies on changes: no field is removed, renamed, retyped or made required,
  no enum gains or loses a value, no constraint or default moves. Anything else is a new
  major.
* **Readers accept every minor of their major, older and newer**, ignore fields they do
  not know, and answer an unknown major with a clear error (:func:`check_readable`).
  A missing version is read as the reader's own (plain Open Inference Protocol clients
  send none).
* **Writers stamp their own version** and never downgrade a message for an older reader:
  the older reader ignores what it does not know.
* **Signatures cover what was sent, not what was understood.** A reader verifies a signed
  object over the bytes it received, unknown fields included
  (:func:`shared.manifest.verify_manifest`), so a device verifies a manifest that a newer
  registry of the same major signed.

So within a major, edge and cloud read each other's messages whichever is newer: messages
of a new minor simply carry extra fields that older readers skip. (Security rules are
another matter: a device that requires signed rollout orders refuses an older
controller's unsigned ones.)
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
