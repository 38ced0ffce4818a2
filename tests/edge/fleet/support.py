"""Test fixtures of the fleet agent: an artifact server, signed orders, an event listener."""

from __future__ import annotations

import hashlib
import io
import itertools
import tarfile
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import onnx
import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper

from shared import topics
from shared.fleet import RolloutEvent, RolloutOrder
from shared.manifest import Manifest, sign_manifest
from shared.mqtt import Message, MqttClient
from shared.order_signing import sign_order

DENSE_CONFIG = {
    "name": "dense",
    "max_batch_size": 8,
    "input": [{"name": "x", "datatype": "FP32", "dims": [4]}],
    "output": [{"name": "y", "datatype": "FP32", "dims": [3]}],
}


def nan_model() -> onnx.ModelProto:
    """``y = log(x @ W - 1)`` for a [N,4] -> [N,3] model: NaN or -inf on warm-up inputs."""
    import numpy as np
    from onnx import numpy_helper

    weight = np.zeros((4, 3), dtype=np.float32)
    one = np.ones((3,), dtype=np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"]),
        helper.make_node("Sub", ["h", "one"], ["neg"]),
        helper.make_node("Log", ["neg"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "nan",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=[numpy_helper.from_array(weight, "W"), numpy_helper.from_array(one, "one")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def pack(model: onnx.ModelProto, version: int, config: dict[str, Any] | None = None) -> bytes:
    """An artifact as the cloud packs it: ``config.json`` and ``<version>/model.onnx``."""
    members = []
    if config is not None:
        members.append(("config.json", orjson.dumps(config)))
    members.append((f"{version}/model.onnx", model.SerializeToString()))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


class ArtifactServer:
    """A real HTTP server for artifacts with Range support and injectable interruptions."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        #: name -> bytes to send before dropping the connection (once per entry).
        self.cut_after: dict[str, int] = {}
        #: Seconds to sleep per 64 KiB sent (slow links for crash tests).
        self.delay_s = 0.0
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                name = self.path.rsplit("/", 1)[-1]
                data = server.blobs.get(name)
                ranged = self.headers.get("Range")
                server.requests.append((name, ranged))
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                if ranged and ranged.startswith("bytes="):
                    start = int(ranged[6:].split("-", 1)[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                limit = server.cut_after.pop(name, None)
                if limit is not None:
                    self.wfile.write(body[:limit])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                for offset in range(0, len(body), 65536):
                    self.wfile.write(body[offset : offset + 65536])
                    if server.delay_s:
                        time.sleep(server.delay_s)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> ArtifactServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add(self, data: bytes) -> tuple[str, str]:
        """Serve ``data``; returns ``(url, sha256)``."""
        digest = hashlib.sha256(data).hexdigest()
        self.blobs[digest] = data
        return f"http://127.0.0.1:{self._server.server_address[1]}/artifacts/{digest}", digest


def signed_order(
    key: Ed25519PrivateKey,
    server: ArtifactServer,
    artifact: bytes,
    *,
    model: str = "dense",
    version: int,
    health_window_s: float = 0.3,
    expires_in_s: float = 3600.0,
    shadow_sample_rate: float = 0.0,
    tamper: bytes | None = None,
    rollout_id: str | None = None,
) -> RolloutOrder:
    """An install order for ``artifact``; ``tamper`` serves other bytes under its sha256."""
    url, digest = server.add(artifact)
    if tamper is not None:
        server.blobs[digest] = tamper
    now = time.time()
    manifest = Manifest(
        model=model,
        version=version,
        sha256=digest,
        size=len(artifact),
        url=url,
        created_at=now,
        expires_at=now + expires_in_s,
    )
    return RolloutOrder(
        rollout_id=rollout_id or f"r-{uuid.uuid4().hex[:8]}",
        action="install",
        model=model,
        signed_manifest=sign_manifest(manifest, key),
        health_window_s=health_window_s,
        shadow_sample_rate=shadow_sample_rate,
        issued_at=now,
    )


_SEQ = itertools.count(int(time.time() * 1_000_000))


def next_seq() -> int:
    """A sequence number larger than every one handed out before in this process."""
    return next(_SEQ)


def rollback_order(model: str, to: int | None, rollout_id: str) -> RolloutOrder:
    return RolloutOrder(
        rollout_id=rollout_id, action="rollback", model=model, rollback_to=to, issued_at=time.time()
    )


class Controller:
    """The cloud side, as far as tests need it: signs and publishes orders, collects events."""

    def __init__(self, broker_url: str, key: Ed25519PrivateKey, client_id: str | None = None):
        self.key = key
        self.client = MqttClient(broker_url, client_id or f"tether-ctl-{uuid.uuid4().hex[:6]}")
        self.sent: dict[str, bytes] = {}
        self.events: list[RolloutEvent] = []
        self.statuses: dict[str, dict[str, Any]] = {}
        self._changed = threading.Condition()
        self.client.subscribe("tether/+/rollout/events", self._on_event)
        self.client.subscribe("tether/+/status", self._on_status)
        self.client.start()

    def _on_event(self, message: Message) -> None:
        with self._changed:
            self.events.append(RolloutEvent.parse(message.payload))
            self._changed.notify_all()

    def _on_status(self, message: Message) -> None:
        if not message.payload:
            return
        with self._changed:
            self.statuses[message.topic.split("/")[1]] = orjson.loads(message.payload)
            self._changed.notify_all()

    def sign(self, device: str, order: RolloutOrder, expires_in_s: float = 3600.0) -> bytes:
        """``order`` signed for ``device`` with a fresh sequence number, as the controller
        sends it (cloud/rollout.py)."""
        bound = order.model_copy(
            update={"device": device, "seq": next_seq(), "expires_at": time.time() + expires_in_s}
        )
        return sign_order(bound, self.key)

    def send(self, device: str, order: RolloutOrder) -> bytes:
        """Sign ``order`` for ``device`` and publish it as its retained order."""
        payload = self.sign(device, order)
        self.send_raw(device, payload)
        return payload

    def send_raw(self, device: str, payload: bytes) -> None:
        """Publish ``payload`` as ``device``'s retained order, as it is (forged, replayed...)."""
        self.sent[device] = payload
        self.client.publish(topics.device_rollout(device), payload, retain=True).wait_for_publish(5)

    def clear(self, device: str) -> None:
        self.client.publish(topics.device_rollout(device), b"", retain=True).wait_for_publish(5)

    def steps(self, rollout_id: str, device: str | None = None) -> list[str]:
        with self._changed:
            return [
                e.step
                for e in self.events
                if e.rollout_id == rollout_id and (device is None or e.device == device)
            ]

    def wait(
        self, predicate: Callable[[], bool], timeout_s: float = 20.0, rollout_id: str | None = None
    ) -> None:
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        "timed out waiting for the fleet agent; its events: "
                        + self._trace(rollout_id)
                    )
                self._changed.wait(min(left, 0.2))

    def _trace(self, rollout_id: str | None) -> str:
        """The events seen so far (of ``rollout_id`` when given), with their reasons."""
        seen = [e for e in self.events if rollout_id is None or e.rollout_id == rollout_id]
        return "; ".join(f"{e.device} {e.step} {e.reason!r}" for e in seen) or "none"

    def wait_step(
        self, rollout_id: str, step: str, device: str | None = None, timeout_s: float = 20.0
    ) -> RolloutEvent:
        def found() -> bool:
            return any(
                e.rollout_id == rollout_id
                and e.step == step
                and (device is None or e.device == device)
                for e in self.events
            )

        self.wait(found, timeout_s, rollout_id)
        return next(
            e
            for e in self.events
            if e.rollout_id == rollout_id
            and e.step == step
            and (device is None or e.device == device)
        )

    def stop(self) -> None:
        self.client.stop()


def write_repository(root: Path, versions: dict[int, onnx.ModelProto]) -> Path:
    """A repository with ``dense`` at the given versions (operator-provisioned)."""
    for version, model in versions.items():
        folder = root / "dense" / str(version)
        folder.mkdir(parents=True, exist_ok=True)
        onnx.save(model, folder / "model.onnx")
    (root / "dense" / "config.json").write_text(orjson.dumps(DENSE_CONFIG).decode())
    return root
