"""Client ids for the device's MQTT sessions that must survive a restart.

The fleet agent and the sensor bridge keep the same client id from one start to the next,
so the broker can hand them back their session (the bridge's unacknowledged readings).
A fixed id such as ``tether-bridge-<device>`` would let anyone who can log in to the
broker take that session over (:mod:`shared.client_ids`), so each id ends with a tag only
this device knows: 64 random bits, made on first use and kept in ``<data_dir>/mqtt-session-tag``
(mode 0600).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from pathlib import Path

from shared.client_ids import client_id

TAG_FILE = "mqtt-session-tag"
_TAG = re.compile(r"^[0-9a-f]{16}$")


def session_client_id(data_dir: Path, *parts: str) -> str:
    """``tether-<parts>-<this device's tag>``: the same on every start of this device."""
    return client_id(*parts, session_tag(data_dir))


def session_tag(data_dir: Path) -> str:
    """The device's tag, made once (atomically: two processes starting together agree)."""
    path = data_dir / TAG_FILE
    try:
        tag = path.read_text().strip()
        if _TAG.match(tag):
            return tag
    except FileNotFoundError:
        pass
    data_dir.mkdir(parents=True, exist_ok=True)
    fresh = data_dir / f".{TAG_FILE}.{os.getpid()}-{secrets.token_hex(4)}"
    fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(8) + "\n")
    try:
        if path.exists():  # unreadable content: replace it
            os.replace(fresh, path)
        else:
            with contextlib.suppress(FileExistsError):  # another process made it first
                os.link(fresh, path)
    finally:
        fresh.unlink(missing_ok=True)
    return session_tag(data_dir)
