"""Roles the mixed-version tests run on an *older release* of Tether, in a process of their own.

``python tests/shared/legacy_roles.py ROLE ARGS...`` with ``PYTHONPATH`` pointing at a
checkout of the old release (``tests/shared/test_mixed_versions.py`` extracts it from git),
so ``shared``, ``edge``, ``cloud`` and ``tests`` below are that release's code. Only APIs
the old release had may be used here. Each role prints JSON lines on stdout (``ready``
first for long-running roles) and ends when stdin closes.

* ``worker URL REPOSITORY WORKER_ID``: a cloud worker serving ``digits-teacher``.
* ``uplink URL DEVICE``: one cloud request for ``digits-teacher``; prints the answer.
* ``devices URL PUBLIC_KEY RUN COUNT``: simulated devices (label ``run=RUN``, ``digits``
  v1) that follow rollout orders; prints each device's models when stdin closes.
* ``controller URL DB_URL VERSION_DIR RUN COUNT``: registry, artifact server and rollout
  controller; prints its public key, waits for ``go`` on stdin, publishes ``VERSION_DIR``,
  rolls it out to the ``COUNT`` devices labelled ``run=RUN`` and prints the final state.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def say(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def worker(url: str, repository: str, worker_id: str) -> None:
    from cloud.settings import CloudSettings
    from cloud.worker import CloudWorker
    from edge.settings import RuntimeSettings

    settings = CloudSettings(
        mqtt_url=url,
        worker_id=worker_id,
        repository=Path(repository),
        models=["digits-teacher"],
        metrics_port=0,
        drain_timeout_s=1.0,
        runtime=RuntimeSettings(backend="onnxruntime", providers=["CPUExecutionProvider"]),
    )
    instance = CloudWorker(settings)
    instance.start()
    say(event="ready", schema=_schema())
    sys.stdin.read()
    instance.stop(drain=False)


def uplink(url: str, device: str) -> None:
    from edge.uplink import Uplink

    client = Uplink(url, device)
    client.start()
    row = (np.arange(64) % 16).astype(np.float32).reshape(1, 64)
    reply = client.request("digits-teacher", {"pixels": row}, timeout_s=60)
    probabilities = reply.outputs["probabilities"]
    say(
        event="reply",
        schema=_schema(),
        model=reply.model_name,
        version=reply.model_version,
        worker=reply.worker,
        top1=int(np.argmax(probabilities)),
        sum=float(np.sum(probabilities)),
    )
    client.close()


def devices(url: str, public_key: str, run: str, count: str) -> None:
    from shared.manifest import load_public_key
    from tests.fleet_sim import SimDevice

    executor = ThreadPoolExecutor(max_workers=8)
    fleet = [
        SimDevice(
            name=f"legacy-{run}-{i}",
            broker_url=url,
            trusted_keys=[load_public_key(public_key)],
            executor=executor,
            labels={"run": run},
            models={"digits": 1},
        )
        for i in range(int(count))
    ]
    for device in fleet:
        device.start()
        device.announce()
    say(event="ready", schema=_schema(), devices=[d.name for d in fleet])
    sys.stdin.read()
    say(
        event="final",
        models={d.name: d.models for d in fleet},
        steps={d.name: d.steps for d in fleet},
    )
    for device in fleet:
        device.stop()
    executor.shutdown(wait=False)


def controller(url: str, db_url: str, version_dir: str, run: str, count: str) -> None:
    from cloud.artifacts import ArtifactServer, ArtifactStore
    from cloud.fleet_db import FleetDB, RolloutPolicy
    from cloud.registry import Registry
    from cloud.rollout import RolloutController, start_rollout
    from shared.manifest import generate_key, public_key_text
    from shared.mqtt import MqttClient

    key = generate_key()
    db = FleetDB(db_url)
    store = ArtifactStore(Path(tempfile.mkdtemp()) / "artifacts")
    server = ArtifactServer(store).start()
    mqtt = MqttClient(url, f"legacy-controller-{run}")
    mqtt.start()
    control = RolloutController(db, mqtt, tick_s=0.05)
    control.start()
    say(event="ready", schema=_schema(), public_key=public_key_text(key))
    if sys.stdin.readline().strip() != "go":
        return
    selector = {"run": run}
    deadline = time.monotonic() + 60
    while len(db.list_devices(selector)) < int(count) and time.monotonic() < deadline:
        time.sleep(0.05)
    signed = Registry(db, store, server.url).publish(Path(version_dir), key)
    policy = RolloutPolicy(waves=["1", "100%"], window_s=0.2, device_timeout_s=5)
    rollout, _ = start_rollout(db, signed.manifest.model, signed.manifest.version, selector, policy)
    while db.rollout(rollout.id).state not in ("completed", "rolled_back"):
        if time.monotonic() > deadline + 60:
            break
        time.sleep(0.05)
    say(event="final", state=db.rollout(rollout.id).state, reason=db.rollout(rollout.id).reason)
    sys.stdin.read()
    control.stop()
    mqtt.stop()
    server.stop()


def _schema() -> dict[str, str]:
    from shared.envelopes import ENVELOPE_SCHEMA
    from shared.fleet import FLEET_SCHEMA
    from shared.manifest import MANIFEST_SCHEMA

    return {
        "envelope": str(ENVELOPE_SCHEMA),
        "fleet": str(FLEET_SCHEMA),
        "manifest": str(MANIFEST_SCHEMA),
    }


ROLES = {"worker": worker, "uplink": uplink, "devices": devices, "controller": controller}

if __name__ == "__main__":
    ROLES[sys.argv[1]](*sys.argv[2:])
