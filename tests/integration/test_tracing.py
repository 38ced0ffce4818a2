"""One request id, followed from the edge's log through the cloud worker's log and back.

Both run as real processes with JSON logs, as they run in production.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from harness.agent_process import ROOT, AgentProcess
from harness.broker import Broker
from tests.conftest import REPOSITORY

X = [0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0] * 4


def _json_lines(path: Path) -> list[dict[str, object]]:
    lines = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


def test_request_id_follows_the_request_edge_cloud_and_back(
    fresh_broker: Broker, tmp_path: Path
) -> None:
    cloud_log = tmp_path / "cloud.log"
    env = {**os.environ, "TETHER_MQTT_URL": fresh_broker.url, "TETHER_LOG_FORMAT": "json"}
    with open(cloud_log, "wb") as log:
        cloud = subprocess.Popen(
            [sys.executable, "-m", "tether", "cloud", "--repository", str(REPOSITORY),
             "--models", "digits-teacher", "--metrics-port", "0"],
            cwd=ROOT, env=env, stdout=log, stderr=log,
        )  # fmt: skip
    config = tmp_path / "edge.toml"
    config.write_text(
        f'mqtt_url = "{fresh_broker.url}"\n'
        "[http]\naccess_log = true\n"
        '[routes.digits-teacher]\nmode = "cloud"\n'
    )
    agent = AgentProcess(
        tmp_path / "agent", repository=REPOSITORY, config=config, env={"TETHER_LOG_FORMAT": "json"}
    )
    try:
        agent.start()
        body = json.dumps(
            {"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": X}]}
        ).encode()
        deadline = time.monotonic() + 30
        while True:  # the cloud worker may still be loading
            request = urllib.request.Request(
                agent.url + "/v2/models/digits-teacher/infer",
                data=body,
                headers={"X-Request-Id": "trace-abc-123", "Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    answer = json.loads(response.read())
                    returned_id = response.headers["X-Request-Id"]
                break
            except urllib.error.HTTPError as exc:
                if exc.code != 503 or time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        assert answer["parameters"]["served_by"] == "cloud"
        assert returned_id == "trace-abc-123"
    finally:
        agent.stop()
        cloud.terminate()
        cloud.wait(timeout=30)

    served = [
        line
        for line in _json_lines(cloud_log)
        if line.get("request_id") == "trace-abc-123"
        and "served digits-teacher" in str(line["message"])
    ]
    assert len(served) == 1, cloud_log.read_text()[-3000:]
    assert served[0]["logger"] == "cloud.worker" and served[0]["level"] == "INFO"
    edge_lines = [
        line
        for line in _json_lines(agent.log_path)
        if line.get("request_id") == "trace-abc-123" and line.get("logger") == "tether.access"
    ]
    assert any(
        "POST /v2/models/digits-teacher/infer 200" in str(line["message"]) for line in edge_lines
    ), agent.log()
