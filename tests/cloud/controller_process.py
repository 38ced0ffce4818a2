"""One rollout controller with a lease, in a process of its own (tests SIGKILL it).

``python -m tests.cloud.controller_process BROKER_URL DATABASE_URL PREFIX HOLDER TTL_S KEY``
(``KEY``: the fleet signing key's PEM file)
runs the real :class:`~cloud.rollout.RolloutController` with a
:class:`~cloud.leadership.Leadership` until killed; prints ``ready`` once subscribed.
"""

from __future__ import annotations

import logging
import sys
import threading

from cloud.fleet_db import FleetDB
from cloud.leadership import Leadership
from cloud.rollout import RolloutController
from shared.manifest import load_private_key
from shared.mqtt import MqttClient


def main(
    broker_url: str, database_url: str, prefix: str, holder: str, ttl_s: str, key: str
) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    db = FleetDB(database_url, prefix=prefix)
    mqtt = MqttClient(broker_url, f"controller-{holder}")
    mqtt.start()
    leadership = Leadership(db, holder=holder, ttl_s=float(ttl_s))
    controller = RolloutController(
        db, mqtt, signing_key=load_private_key(key), tick_s=0.05, leadership=leadership
    )
    controller.start()
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main(*sys.argv[1:])
