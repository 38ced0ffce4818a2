"""Artifact downloads that survive a dropped connection or a killed agent.

The artifact goes to a ``.part`` file next to where it is staged. A later attempt (after
a network error, or after the agent restarts) asks the server only for the bytes it is
missing with an HTTP ``Range`` header; a server that ignores ranges makes it start over.
Only a file whose size and sha256 match the signed manifest leaves this module.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from shared.errors import InvalidInput, TetherError, Unavailable
from shared.hashing import sha256_file
from shared.redaction import redact_url

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024


class DownloadError(Unavailable):
    """The artifact could not be fetched (network, server, cancelled)."""

    reason = "download"


class DigestMismatch(InvalidInput):
    """The downloaded bytes are not the ones the manifest signed."""

    reason = "sha256"


class DiskFull(Unavailable):
    """Not enough free disk for the artifact and its unpacked copy."""

    reason = "disk"


def check_free_disk(folder: Path, needed_bytes: int, reserve_mb: int) -> None:
    """Raise :class:`DiskFull` unless ``needed_bytes`` fit with ``reserve_mb`` to spare."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    wanted = needed_bytes + reserve_mb * 1024 * 1024
    if free < wanted:
        raise DiskFull(
            f"not enough disk: {free // (1024 * 1024)} MiB free, "
            f"{wanted // (1024 * 1024) + 1} MiB needed"
        )


class Downloader:
    """Fetches URLs into ``.part`` files with resume, retries and a digest check."""

    def __init__(
        self,
        *,
        timeout_s: float = 10.0,
        attempts: int = 5,
        retry_delay_s: float = 0.2,
        chunk_bytes: int = CHUNK,
    ) -> None:
        self.timeout_s = timeout_s
        self.attempts = attempts
        self.retry_delay_s = retry_delay_s
        self.chunk_bytes = chunk_bytes

    def fetch(
        self,
        url: str,
        part: Path,
        *,
        size: int,
        sha256: str,
        cancel: threading.Event | None = None,
        progress: Callable[[int, int], None] | None = None,
        verifying: Callable[[], None] | None = None,
    ) -> Path:
        """Download ``url`` into ``part`` (resuming what is there) and verify it.

        Returns ``part`` once it holds exactly ``size`` bytes with the given sha256.
        A mismatch after a resumed transfer gets one clean retry (the kept bytes may be
        what was damaged); a mismatch after a clean transfer raises :class:`DigestMismatch`.
        """
        part.parent.mkdir(parents=True, exist_ok=True)
        resumed = part.exists() and part.stat().st_size > 0
        self._transfer(url, part, size, cancel, progress)
        if verifying is not None:
            verifying()
        actual = sha256_file(part)
        if actual == sha256.lower():
            return part
        part.unlink(missing_ok=True)
        if resumed:
            log.warning("sha256 mismatch after resuming %s; downloading it again", redact_url(url))
            self._transfer(url, part, size, cancel, progress)
            actual = sha256_file(part)
            if actual == sha256.lower():
                return part
            part.unlink(missing_ok=True)
        raise DigestMismatch(f"sha256 mismatch: artifact is {actual}, manifest says {sha256}")

    def _transfer(
        self,
        url: str,
        part: Path,
        size: int,
        cancel: threading.Event | None,
        progress: Callable[[int, int], None] | None,
    ) -> None:
        last_error = "no attempt made"
        for attempt in range(self.attempts):
            if cancel is not None and cancel.is_set():
                raise DownloadError("download cancelled")
            have = part.stat().st_size if part.exists() else 0
            if have > size:
                part.unlink()
                have = 0
            if have == size:
                return
            try:
                self._once(url, part, have, size, cancel, progress)
            except TetherError:
                raise
            except (OSError, urllib.error.URLError) as exc:
                last_error = f"{type(exc).__name__}: {exc}"
                log.info(
                    "download of %s interrupted (%s); attempt %d",
                    redact_url(url),
                    last_error,
                    attempt,
                )
                time.sleep(self.retry_delay_s * (2**attempt))
                continue
            if part.stat().st_size == size:
                return
            last_error = f"connection closed at {part.stat().st_size} of {size} bytes"
        raise DownloadError(f"could not download {redact_url(url)}: {last_error}")

    def _once(
        self,
        url: str,
        part: Path,
        have: int,
        size: int,
        cancel: threading.Event | None,
        progress: Callable[[int, int], None] | None,
    ) -> None:
        request = urllib.request.Request(url)
        if have:
            request.add_header("Range", f"bytes={have}-")
        try:
            response = urllib.request.urlopen(request, timeout=self.timeout_s)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and have:  # nothing left to send: start over to be sure
                part.unlink(missing_ok=True)
                raise OSError("range not satisfiable; restarting") from None
            if 400 <= exc.code < 500:
                raise DownloadError(
                    f"artifact server answered {exc.code} for {redact_url(url)}"
                ) from None
            raise
        with response:
            mode = "ab"
            if have and response.status != 206:
                log.info("server ignored the range request for %s; starting over", redact_url(url))
                mode = "wb"
                have = 0
            with open(part, mode) as handle:
                received = have
                while chunk := response.read(self.chunk_bytes):
                    handle.write(chunk)
                    received += len(chunk)
                    if received > size:
                        raise DigestMismatch(
                            f"artifact is larger than the {size} bytes the manifest says"
                        )
                    if progress is not None:
                        progress(received, size)
                    if cancel is not None and cancel.is_set():
                        raise DownloadError("download cancelled")
                handle.flush()
