"""A cascade on real parts for tests: a cloud worker in this process, an edge agent's config
routing a cascade to it, the wire the uplink uses, and the V2 JSON requests clients post."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cloud.settings import CloudSettings
from cloud.worker import CloudWorker
from serving.settings import RuntimeSettings
from shared import topics
from shared.mqtt import Message, MqttClient

CPU = ["CPUExecutionProvider"]


@contextmanager
def cloud_worker(broker_url: str, repository: Path, models: list[str]) -> Iterator[CloudWorker]:
    """A started cloud worker serving ``models`` on ONNX Runtime's CPU provider."""
    settings = CloudSettings(
        mqtt_url=broker_url,
        worker_id=f"cw-{uuid.uuid4().hex[:6]}",
        repository=repository,
        models=models,
        metrics_port=0,
        drain_timeout_s=2.0,
        runtime=RuntimeSettings(backend="onnxruntime", providers=CPU),
    )
    instance = CloudWorker(settings)
    instance.start()
    try:
        yield instance
    finally:
        instance.stop(drain=False, timeout_s=2.0)


def edge_config(
    path: Path,
    *,
    repository: Path,
    broker_url: str,
    device_id: str,
    models: list[str],
    routes: str,
) -> Path:
    """An edge agent's TOML: the repository, the broker, the models it loads, CPU ONNX
    Runtime, an uplink patient enough for a loaded machine, and ``routes`` (TOML text)."""
    path.write_text(
        f'repository = "{repository}"\n'
        f'mqtt_url = "{broker_url}"\n'
        f'device_id = "{device_id}"\n'
        f"models = {json.dumps(models)}\n"
        "[runtime]\n"
        'backend = "onnxruntime"\n'
        'providers = ["CPUExecutionProvider"]\n'
        "[uplink]\n"
        "timeout_s = 20.0\n"
        "attempt_timeout_s = 10.0\n" + routes
    )
    return path


@contextmanager
def uplink_requests(broker_url: str) -> Iterator[list[Message]]:
    """Every cloud inference request the broker carries (a plain, unshared subscription)."""
    seen: list[Message] = []
    client = MqttClient(broker_url, f"wire-{uuid.uuid4().hex[:6]}")
    client.start()
    client.subscribe(f"{topics.ROOT}/cloud/infer/+/+", seen.append)
    try:
        yield seen
    finally:
        client.stop()


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    """POST ``body`` to ``url``; the status and the JSON answer (errors included)."""
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def outputs(body: dict[str, Any]) -> dict[str, Any]:
    """A V2 JSON answer's outputs by name (their flat data)."""
    return {o["name"]: o["data"] for o in body["outputs"]}
