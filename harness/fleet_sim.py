"""A simple simulated device for rollout tests and the rollout benchmark.

Not the fleet agent: just enough of one to exercise the cloud side honestly. It speaks the
real protocol over a real broker (retained status + last will, retained orders, events),
verifies manifests with :func:`shared.manifest.verify_manifest`, downloads the artifact
over HTTP in two Range requests (so resuming is exercised), checks the sha256, and
reports every step. Its health and failures are scripted by :class:`Behaviour`.
"""

from __future__ import annotations

import hashlib
import threading
import time
import urllib.request
from concurrent.futures import Executor
from dataclasses import dataclass, field

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shared.errors import SignatureError, TetherError
from shared.fleet import DeviceStatus, HealthReport, ModelState, RolloutEvent, RolloutOrder
from shared.manifest import verify_manifest
from shared.mqtt import Message, MqttClient, Will
from shared.order_signing import replay_reason, verify_order
from shared.topics import device_rollout, device_rollout_events, device_status


@dataclass
class Behaviour:
    """What the simulated new version does on this device."""

    self_test_fails: bool = False
    silent: bool = False
    requests: int = 200
    error_rate: float = 0.0
    baseline_error_rate: float = 0.0
    p99_ms: float = 10.0
    baseline_p99_ms: float = 10.0
    shadow_agreement: float = 0.98
    baseline_shadow_agreement: float | None = 0.98
    #: Shadow samples reported (default: the order's rate of the requests, at least 1).
    shadow_samples: int | None = None
    #: Shadow samples of the previous version behind ``baseline_shadow_agreement`` (since
    #: schema 1.2; ``None``: not reported).
    baseline_shadow_samples: int | None = 20
    #: Send events as a device of this fleet schema (``"1.1"``: reports without
    #: ``baseline_shadow_samples``, as devices before 1.2 sent them).
    schema: str | None = None


class OrderGate:
    """A device's check of signed orders (:mod:`shared.order_signing`), as the agent does:
    signed by a trusted key for this device, not expired, and newer than the last one it
    accepted (the very same order again is let through, it is handled idempotently)."""

    def __init__(self, device: str, trusted_keys: list[Ed25519PublicKey]) -> None:
        self.device = device
        self.trusted_keys = trusted_keys
        self.last_seq: int | None = None
        self.last_digest: str | None = None
        #: Why orders were refused, oldest first.
        self.refused: list[str] = []

    def accept(self, payload: bytes) -> RolloutOrder | None:
        """The order to act on, or ``None`` (refused, with the reason kept)."""
        try:
            verified = verify_order(
                payload,
                self.trusted_keys,
                device=self.device,
                now=time.time(),
                accepted_digest=self.last_digest,
            )
        except TetherError as exc:
            self.refused.append(exc.message)
            return None
        why = replay_reason(verified, self.last_seq, self.last_digest)
        if why is not None:
            self.refused.append(why)
            return None
        self.last_seq, self.last_digest = verified.order.seq, verified.digest
        return verified.order


@dataclass
class SimDevice:
    """One simulated device; ``start()`` connects and publishes its status."""

    name: str
    broker_url: str
    trusted_keys: list[Ed25519PublicKey]
    executor: Executor
    labels: dict[str, str] = field(default_factory=dict)
    models: dict[str, int] = field(default_factory=dict)
    behaviour: Behaviour = field(default_factory=Behaviour)
    hardware: str = "cpu"

    def __post_init__(self) -> None:
        self.previous: dict[str, int | None] = {}
        self.trusted_version: dict[str, int] = dict(self.models)
        self.steps: list[tuple[str, str]] = []
        self.orders: list[RolloutOrder] = []
        self.download_statuses: list[int] = []
        self._generation = 0
        self._lock = threading.Lock()
        self.gate = OrderGate(self.name, self.trusted_keys)
        will = orjson.dumps({"kind": "device_status", "device": self.name, "online": False})
        self.mqtt = MqttClient(
            self.broker_url,
            f"sim-{self.name}",
            will=Will(device_status(self.name), will),
            keepalive=30,
        )

    # ------------------------------------------------------------------ lifecycle

    def start(self, wait_s: float | None = 10.0) -> None:
        self.mqtt.start(wait_s=wait_s)

    def announce(self) -> None:
        """Publish the retained status and listen for orders (after connecting)."""
        self.publish_status()
        self.mqtt.subscribe(device_rollout(self.name), self._on_order, qos=1)

    def stop(self, *, forget: bool = True) -> None:
        """Disconnect; with ``forget`` clear the retained status and order first, so later
        tests on the same broker do not see this device."""
        if forget and self.mqtt.connected:
            for topic in (device_status(self.name), device_rollout(self.name)):
                self.mqtt.publish(topic, b"", qos=1, retain=True).wait_for_publish(2)
        self.mqtt.stop()

    def publish_status(self) -> None:
        status = DeviceStatus(
            device=self.name,
            online=True,
            agent_version="0.1.0",
            hardware=self.hardware,
            labels=self.labels,
            models={
                m: ModelState(active=v, previous=self.previous.get(m), state="ready")
                for m, v in self.models.items()
            },
            at=time.time(),
        )
        self.mqtt.publish(device_status(self.name), orjson.dumps(status.dump()), qos=1, retain=True)

    # ------------------------------------------------------------------ orders

    def _on_order(self, message: Message) -> None:
        if self.behaviour.silent or not message.payload:
            return
        with self._lock:
            order = self.gate.accept(message.payload)
            if order is None:
                return
            self._generation += 1
            generation = self._generation
            self.orders.append(order)
        self.executor.submit(self._handle, order, generation)

    def _handle(self, order: RolloutOrder, generation: int) -> None:
        try:
            if order.action == "install":
                self._install(order, generation)
            else:
                self._rollback(order)
        except Exception as exc:  # a simulated agent reports, never dies
            self._report(order, order.model, 0, "failed", f"{type(exc).__name__}: {exc}")

    def _report(
        self,
        order: RolloutOrder,
        model: str,
        version: int,
        step: str,
        reason: str = "",
        health: HealthReport | None = None,
    ) -> None:
        self.steps.append((step, reason))
        event = RolloutEvent(
            rollout_id=order.rollout_id,
            device=self.name,
            model=model,
            version=version,
            step=step,
            reason=reason,
            health=health,
            at=time.time(),
        )
        body = event.dump()
        if self.behaviour.schema is not None:  # as an older device wrote it
            body["schema_version"] = self.behaviour.schema
            if "health" in body:
                body["health"]["schema_version"] = self.behaviour.schema
        self.mqtt.publish(device_rollout_events(self.name), orjson.dumps(body), qos=1)

    def _install(self, order: RolloutOrder, generation: int) -> None:
        assert order.signed_manifest is not None
        model = order.model
        version = order.signed_manifest.manifest.version
        self._report(order, model, version, "received")
        try:
            manifest = verify_manifest(
                order.signed_manifest,
                self.trusted_keys,
                now=time.time(),
                last_trusted_version=self.trusted_version.get(model),
            )
        except SignatureError as exc:
            self._report(order, model, version, "refused", exc.message)
            return
        self._report(order, model, version, "downloading")
        data = self._download(manifest.url, manifest.size)
        self._report(order, model, version, "verifying")
        if hashlib.sha256(data).hexdigest() != manifest.sha256:
            self._report(order, model, version, "failed", "artifact sha256 mismatch")
            return
        self.trusted_version[model] = version
        self._report(order, model, version, "staged")
        if self.behaviour.self_test_fails:
            self._report(order, model, version, "failed", "self-test failed: outputs are NaN")
            return
        with self._lock:
            if generation != self._generation:
                return  # a newer order arrived
            self.previous[model] = self.models.get(model)
            self.models[model] = version
        self.publish_status()
        self._report(order, model, version, "active")
        timer = threading.Timer(order.health_window_s, self._commit, (order, version, generation))
        timer.daemon = True
        timer.start()

    def _commit(self, order: RolloutOrder, version: int, generation: int) -> None:
        with self._lock:
            if generation != self._generation or not self.mqtt.connected:
                return  # superseded, or the device was stopped during its window
        b = self.behaviour
        health = HealthReport(
            requests=b.requests,
            errors=round(b.requests * b.error_rate),
            p99_ms=b.p99_ms,
            shadow_samples=(
                max(1, round(b.requests * order.shadow_sample_rate))
                if b.shadow_samples is None
                else b.shadow_samples
            ),
            shadow_agreement=b.shadow_agreement,
            baseline_p99_ms=b.baseline_p99_ms,
            baseline_error_rate=b.baseline_error_rate,
            baseline_shadow_agreement=b.baseline_shadow_agreement,
            baseline_shadow_samples=b.baseline_shadow_samples if b.schema is None else None,
        )
        self._report(order, order.model, version, "committed", health=health)

    def _rollback(self, order: RolloutOrder) -> None:
        model = order.model
        with self._lock:
            if order.rollback_to is None:
                self.models.pop(model, None)
            else:
                self.models[model] = order.rollback_to
            self.previous[model] = None
        self.publish_status()
        self._report(
            order,
            model,
            order.rollback_to or 0,
            "rolled_back",
            "aborted" if order.action == "abort" else "",
        )

    def _download(self, url: str, size: int) -> bytes:
        """Fetch the artifact in two Range requests, as a resumed download would."""
        half = size // 2
        parts = []
        for header in (f"bytes=0-{half - 1}", f"bytes={half}-") if half else ("",):
            request = urllib.request.Request(url, headers={"Range": header} if header else {})
            with urllib.request.urlopen(request, timeout=30) as response:
                self.download_statuses.append(response.status)
                parts.append(response.read())
        return b"".join(parts)
