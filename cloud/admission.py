"""Per-device admission to a cloud worker: one device cannot fill the shared queue.

A worker's queue and threads serve every device of the fleet. :class:`DeviceAdmission`
counts, per device (the one the request topic names, which the broker authorised), the
requests it has queued or running on this worker and the bytes of their payloads, which
the worker holds until it answers. A request past either bound is answered at once with
429 (:class:`~shared.errors.TooManyRequests`, the protocol's error reply), so the device
can back off or route elsewhere, while other devices' requests go on being taken.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from cloud.settings import AdmissionSettings
from shared.errors import TooManyRequests


@dataclass(frozen=True)
class Admitted:
    """One request counted against its device until :meth:`DeviceAdmission.release`."""

    device: str
    size: int


@dataclass
class _Usage:
    requests: int = 0
    size: int = 0


class DeviceAdmission:
    """Counts each device's requests in flight on this worker and refuses those past the
    configured bounds. Thread-safe: the MQTT thread admits, worker threads release."""

    def __init__(self, settings: AdmissionSettings) -> None:
        self.settings = settings
        self._usage: dict[str, _Usage] = {}
        self._lock = threading.Lock()

    def admit(self, device: str, size: int) -> Admitted:
        """Count a request of ``size`` payload bytes, or raise :class:`TooManyRequests`."""
        limits = self.settings
        with self._lock:
            usage = self._usage.get(device) or _Usage()
            if usage.requests + 1 > limits.max_requests_per_device:
                raise TooManyRequests(
                    f"device {device!r} has {usage.requests} requests in flight on this cloud "
                    f"worker, its limit; wait for answers before sending more"
                )
            if usage.requests and usage.size + size > limits.max_bytes_per_device:
                raise TooManyRequests(
                    f"device {device!r} has {usage.size} bytes of requests in flight on this "
                    f"cloud worker; {size} more would pass its limit of "
                    f"{limits.max_bytes_per_device}"
                )
            usage.requests += 1
            usage.size += size
            self._usage[device] = usage
        return Admitted(device, size)

    def release(self, admitted: Admitted) -> None:
        """The request was answered, expired or dropped: it no longer counts."""
        with self._lock:
            usage = self._usage.get(admitted.device)
            if usage is None:
                return
            usage.requests -= 1
            usage.size -= admitted.size
            if usage.requests <= 0:
                del self._usage[admitted.device]  # only devices with work in flight are kept

    def in_flight(self, device: str) -> tuple[int, int]:
        """Requests and payload bytes ``device`` has in flight here."""
        with self._lock:
            usage = self._usage.get(device) or _Usage()
            return usage.requests, usage.size
