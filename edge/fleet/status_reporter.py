"""The device's MQTT presence: a retained status, rollout events, and a last will.

The status (agent version, hardware, labels, each model's active and previous version and
rollout phase, health figures) is retained on ``tether/<device>/status``; the broker
publishes the last will, the same message with ``online: false``, when the device drops
off without saying goodbye. Events that cannot be published while the broker is away wait
in a small outbox and go out on reconnect.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

import orjson

from edge.fleet.state import FleetState
from shared import __version__, topics
from shared.fleet import DeviceStatus, ModelState, RolloutEvent
from shared.mqtt import MqttClient, MqttError, Will

log = logging.getLogger(__name__)

OUTBOX_LIMIT = 256


class StatusReporter:
    """Publishes this device's status and rollout events through one MQTT client."""

    def __init__(
        self,
        device: str,
        *,
        hardware: str,
        labels: dict[str, str],
    ) -> None:
        self.device = topics.check_segment(device, "device id")
        self.hardware = hardware
        self.labels = dict(labels)
        self.status_topic = topics.device_status(device)
        self.events_topic = topics.device_rollout_events(device)
        self._outbox: deque[bytes] = deque(maxlen=OUTBOX_LIMIT)
        self._lock = threading.Lock()
        self.client: MqttClient | None = None

    def will(self) -> Will:
        """The last will: this device's status with ``online: false``, retained."""
        return Will(self.status_topic, self._encode(self.status(None, online=False)), 1, True)

    def attach(self, client: MqttClient) -> None:
        self.client = client

    def status(
        self, state: FleetState | None, *, online: bool = True, health: dict[str, Any] | None = None
    ) -> DeviceStatus:
        models = {}
        if state is not None:
            models = {
                name: ModelState(
                    active=st.active,
                    previous=st.previous,
                    state=st.phase,
                    rollout_id=st.rollout_id,
                )
                for name, st in sorted(state.models.items())
            }
        return DeviceStatus(
            device=self.device,
            online=online,
            agent_version=__version__,
            hardware=self.hardware,
            labels=self.labels,
            models=models,
            health=health or {},
            at=time.time(),
        )

    def publish_status(self, status: DeviceStatus) -> bool:
        """Publish the retained status; ``False`` when the broker is not reachable now."""
        return self._send(self.status_topic, self._encode(status), retain=True)

    def publish_event(self, event: RolloutEvent) -> None:
        """Publish a rollout event, or keep it for when the broker is back."""
        payload = self._encode(event)
        with self._lock:
            if self._outbox or not self._send(self.events_topic, payload):
                self._outbox.append(payload)

    def flush(self) -> None:
        """Send the events kept while the broker was away, oldest first."""
        with self._lock:
            while self._outbox:
                if not self._send(self.events_topic, self._outbox[0]):
                    return
                self._outbox.popleft()

    def _send(self, topic: str, payload: bytes, *, retain: bool = False) -> bool:
        if self.client is None:
            return False
        try:
            self.client.publish(topic, payload, qos=1, retain=retain)
        except MqttError as exc:
            log.debug("%s: could not publish to %s: %s", self.device, topic, exc)
            return False
        return True

    @staticmethod
    def _encode(message: DeviceStatus | RolloutEvent) -> bytes:
        return orjson.dumps(message.dump())
