"""Fixtures for the cloud worker: tiny ONNX repositories, counted runtimes, an MQTT asker."""

from __future__ import annotations

import itertools
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from cloud.settings import CloudSettings
from cloud.worker import CloudWorker
from harness.broker import Broker
from harness.onnx_models import dense_model, write_model
from serving.model_config import ModelConfig
from serving.repository import ModelRepository
from serving.runtimes import Runtime, RuntimeOptions, create_runtime
from serving.settings import RuntimeSettings
from shared import topics
from shared.codec import OutputRequest, build_request, decode_response_parts
from shared.envelopes import InferRequestEnvelope, decode_envelope, frame
from shared.mqtt import Message, MqttClient
from shared.protocol import InferenceRequest

CPU = ("CPUExecutionProvider",)
_ids = itertools.count()


@pytest.fixture(scope="session")
def repository_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with ``dense`` (4 -> 3, softmax) and ``wide`` (8 -> 5)."""
    root = tmp_path_factory.mktemp("cloud-repository")
    write_model(root, "dense", dense_model(4, 3, seed=1))
    write_model(root, "wide", dense_model(8, 5, seed=2, softmax=False))
    return root


def reference(repository_dir: Path, model: str, x: np.ndarray) -> np.ndarray:
    """The model's answer from ONNX Runtime directly."""
    session = ort.InferenceSession(
        str(repository_dir / model / "1" / "model.onnx"), providers=list(CPU)
    )
    return np.asarray(session.run(None, {"x": x})[0])


@dataclass
class Calls:
    """Every ``predict`` a runtime made after start-up: the rows of each call."""

    rows: list[int] = field(default_factory=list)
    delay_s: float = 0.0
    counting: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def factory(
        self, config: ModelConfig, version: str, version_dir: Path, options: RuntimeOptions, _b: str
    ) -> Runtime:
        runtime = create_runtime(config, version, version_dir, options, "onnxruntime")
        original = runtime.predict

        def predict(inputs: Mapping[str, np.ndarray], names: Any = None) -> dict[str, np.ndarray]:
            if self.counting:
                with self.lock:
                    self.rows.append(int(next(iter(inputs.values())).shape[0]))
                time.sleep(self.delay_s)
            return original(inputs, names)

        runtime.predict = predict  # type: ignore[method-assign]
        return runtime


WorkerFactory = Callable[..., tuple[CloudWorker, Calls]]


@pytest.fixture
def share_group() -> str:
    """A share group of this test's own, so workers of other tests never answer."""
    return f"test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def make_worker(broker: Broker, repository_dir: Path, share_group: str) -> Iterator[WorkerFactory]:
    """Start cloud workers on the session broker; stopped (without drain) at teardown."""
    workers: list[CloudWorker] = []

    def make(delay_s: float = 0.0, **overrides: Any) -> tuple[CloudWorker, Calls]:
        values: dict[str, Any] = {
            "mqtt_url": broker.url,
            "worker_id": f"w{next(_ids)}-{uuid.uuid4().hex[:6]}",
            "repository": repository_dir,
            "models": ["dense", "wide"],
            "share_group": share_group,
            "metrics_port": 0,
            "drain_timeout_s": 10.0,
            "runtime": RuntimeSettings(backend="onnxruntime", providers=list(CPU)),
        }
        values.update(overrides)
        settings = CloudSettings(**values)
        calls = Calls(delay_s=delay_s)
        repo = ModelRepository(
            settings.repository,
            RuntimeOptions(providers=CPU),
            backend="onnxruntime",
            runtime_factory=calls.factory,
        )
        worker = CloudWorker(settings, repository=repo)
        workers.append(worker)
        worker.start()
        calls.counting = True
        return worker, calls

    yield make
    for worker in workers:
        worker.stop(drain=False, timeout_s=2.0)


@dataclass
class Reply:
    """One reply the asker received: its envelope header and outputs as arrays."""

    message: Message
    header: dict[str, Any]
    outputs: dict[str, np.ndarray]

    @property
    def kind(self) -> str:
        return str(self.header["kind"])


class Asker:
    """A minimal edge: publishes request envelopes with a response topic, collects replies."""

    def __init__(self, broker: Broker, device: str = "dev1") -> None:
        self.device = device
        self.client = MqttClient(broker.url, f"asker-{uuid.uuid4().hex[:8]}")
        self.reply_topic = topics.cloud_replies(device, self.client.client_id)
        self.replies: queue.Queue[Reply] = queue.Queue()
        self._subscribed = threading.Event()
        self.client.start()
        self.client.subscribe(self.reply_topic, self._on_reply, qos=1)
        while not self._subscribed.wait(0.2):  # the broker applies SUBSCRIBE in order
            self.client.publish(self.reply_topic, b"probe")

    def _on_reply(self, message: Message) -> None:
        if message.payload == b"probe":
            self._subscribed.set()
            return
        envelope, tail = decode_envelope(message.payload)
        header = envelope.dump()
        outputs: dict[str, np.ndarray] = {}
        if header["kind"] == "infer_response":
            decoded = decode_response_parts(dict(header["response"]), bytes(tail))
            outputs = {o["name"]: np.asarray(o["data"]) for o in decoded["outputs"]}
        self.replies.put(Reply(message, header, outputs))

    def envelope(
        self,
        model: str,
        x: np.ndarray,
        *,
        request_id: str | None = None,
        deadline_s: float | None = 30.0,
        binary: bool = True,
        outputs: list[str] | None = None,
    ) -> bytes:
        request_id = request_id or uuid.uuid4().hex
        header, blobs = build_request(
            {"x": x},
            request_id=request_id,
            binary=binary,
            parameters={"binary_data_output": binary},
            outputs=[OutputRequest(n, binary) for n in outputs or ()],
        )
        envelope = InferRequestEnvelope(
            request_id=request_id,
            model=model,
            deadline=None if deadline_s is None else time.time() + deadline_s,
            request=InferenceRequest.model_validate(header),
        )
        return frame(envelope.dump(), blobs)

    def publish(
        self,
        model: str,
        payload: bytes,
        *,
        correlation: bytes | None = None,
        expiry_s: float | None = None,
        device: str | None = None,
        qos: int = 1,
    ) -> None:
        self.client.publish(
            topics.cloud_request(device or self.device, model),
            payload,
            qos=qos,
            response_topic=self.reply_topic,
            correlation_data=correlation or uuid.uuid4().bytes,
            expiry_s=expiry_s,
        ).wait_for_publish(5)

    def ask(self, model: str, x: np.ndarray, **kwargs: Any) -> str:
        """Publish a request for ``x``; returns its request id."""
        request_id = kwargs.pop("request_id", None) or uuid.uuid4().hex
        self.publish(model, self.envelope(model, x, request_id=request_id, **kwargs))
        return request_id

    def collect(self, count: int, timeout_s: float = 5.0) -> list[Reply]:
        """Exactly ``count`` replies (fails the test if fewer come in time)."""
        until = time.monotonic() + timeout_s
        got: list[Reply] = []
        while len(got) < count:
            remaining = until - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"got {len(got)} of {count} replies in {timeout_s}s")
            try:
                got.append(self.replies.get(timeout=remaining))
            except queue.Empty:
                continue
        return got

    def quiet(self, for_s: float = 0.3) -> list[Reply]:
        """Replies that arrive within ``for_s`` (expected to be none)."""
        time.sleep(for_s)
        extra = []
        while not self.replies.empty():
            extra.append(self.replies.get_nowait())
        return extra

    def close(self) -> None:
        self.client.stop()


@pytest.fixture
def asker(broker: Broker) -> Iterator[Asker]:
    instance = Asker(broker)
    yield instance
    instance.close()
