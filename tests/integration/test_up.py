"""``tether up`` end to end, as a new user runs it: from a folder outside the checkout, on
a stock Mosquitto, the README's requests, a sensor reading, then Ctrl-C.

The stack is six processes (cloud worker, fleet service, edge agent and its server
worker, sensor bridge, fleet agent) started by one ``tether up``; every port it opens is
set to a free one through its documented environment variables, so the test never meets a
developer's own stack on the default ports.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomllib

from harness.broker import Broker, free_port
from harness.images import sample
from models.digits import load_split
from serving.confidence import confidence
from shared.mqtt import Message, MqttClient
from tests.conftest import REPOSITORY

pytestmark = pytest.mark.skipif(
    not (REPOSITORY / "digits-teacher" / "1" / "model.onnx").is_file(),
    reason="the digits models are not built (tether models build)",
)

#: The README's request body: the first digit of scikit-learn's digits set, a zero.
README_PIXELS = [
    0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0, 0, 3, 15, 2, 0, 11, 8, 0, 0, 4, 12, 0,
    0, 8, 8, 0, 0, 5, 8, 0, 0, 9, 8, 0, 0, 4, 11, 0, 1, 12, 7, 0, 0, 2, 14, 5, 10, 12, 0, 0, 0,
    0, 6, 13, 10, 0, 0, 0,
]  # fmt: skip

#: The README's text request for the `news` route.
README_TEXT = "the goalie stopped forty shots in the playoff game"

#: Six Python processes starting on a loaded 2-core machine take tens of seconds; a stack
#: that is not up by then is broken, not slow.
START_S = 120.0
#: The demo's text route's deadline, as its config sets it.
DEMO_TEXT_TIMEOUT_S = float(
    tomllib.loads((REPOSITORY.parent.parent / "deploy" / "demo" / "edge.toml").read_text())[
        "routes"
    ]["assistant"]["timeout_s"]
)


def body(pixels: list[float]) -> bytes:
    inputs = [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": pixels}]
    return json.dumps({"inputs": inputs}).encode()


def post(url: str, data: bytes) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    until = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < until, f"{what} within {timeout_s:g}s"
        time.sleep(0.2)


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def process_tree(root: int) -> dict[int, str]:
    """Every live descendant of ``root``: pid -> its start time (guards against pid reuse)."""
    parents: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry.name)] = (int(fields[1]), fields[19])
    tree: dict[int, str] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, started) in parents.items():
            if ppid == parent and pid not in tree:
                tree[pid] = started
                frontier.append(pid)
    return tree


def alive(pid: int, started: str) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[19] == started and fields[0] not in ("Z", "X")


@pytest.fixture
def stock_broker_for_up(tmp_path: Path) -> Iterator[Broker]:
    broker = Broker(tmp_path / "broker", stock=True).start()
    yield broker
    broker.stop()


def test_tether_up_from_anywhere_on_a_stock_broker(
    stock_broker_for_up: Broker, tmp_path: Path
) -> None:
    broker = stock_broker_for_up
    elsewhere = tmp_path / "elsewhere"  # a folder outside the checkout
    elsewhere.mkdir()
    device = f"up-{uuid.uuid4().hex[:6]}"
    ports = {
        "edge": free_port(),
        "edge grpc": free_port(),
        "cloud metrics": free_port(),
        "fleet": free_port(),
        "bridge metrics": free_port(),
    }
    env = {
        **os.environ,
        "TETHER_MQTT_URL": broker.url,
        "TETHER_DEVICE_ID": device,
        "TETHER_DATA_DIR": str(tmp_path / "edge"),
        "TETHER_REPOSITORY": str(tmp_path / "edge" / "repository"),
        "TETHER_GRPC__PORT": str(ports["edge grpc"]),
        "TETHER_CLOUD_METRICS_PORT": str(ports["cloud metrics"]),
        "TETHER_FLEET_HTTP_PORT": str(ports["fleet"]),
        "TETHER_SENSORS__METRICS_PORT": str(ports["bridge metrics"]),
        "TETHER_LOG_FORMAT": "text",
    }
    log_path = tmp_path / "up.log"
    with open(log_path, "wb") as log:
        up = subprocess.Popen(
            [sys.executable, "-m", "tether", "up", "--port", str(ports["edge"])],
            cwd=elsewhere,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # SIGINT below reaches `tether up` alone, as Ctrl-C would
        )
    edge = f"http://127.0.0.1:{ports['edge']}"
    tree: dict[int, str] = {}
    try:

        def cloud_answers() -> bool:
            assert up.poll() is None, log_path.read_text()[-3000:]
            try:
                status, data = post(f"{edge}/v2/models/digits-teacher/infer", body(README_PIXELS))
            except OSError:
                return False
            return status == 200 and data["parameters"]["served_by"] == "cloud"

        wait_for(cloud_answers, START_S, "the stack answered from the cloud")

        # The README's three requests, as documented.
        status, data = post(f"{edge}/v2/models/digits-student/infer", body(README_PIXELS))
        assert status == 200, data
        assert data["parameters"]["served_by"] == "edge" and data["parameters"]["route"] == "local"
        assert int(np.argmax(data["outputs"][0]["data"])) == 0
        status, data = post(f"{edge}/v2/models/digits-teacher/infer", body(README_PIXELS))
        assert status == 200 and data["parameters"]["served_by"] == "cloud", data
        assert data["parameters"]["model"] == "digits-teacher"
        status, data = post(f"{edge}/v2/models/digits/infer", body(README_PIXELS))
        assert status == 200, data  # a confident zero: the student answers on the device
        assert (data["parameters"]["route"], data["parameters"]["served_by"]) == ("local", "edge")
        unsure = unsure_pixels()
        status, data = post(f"{edge}/v2/models/digits/infer", body(unsure))
        assert status == 200, data  # an unsure input: escalated to the teacher in the cloud
        assert (data["parameters"]["route"], data["parameters"]["served_by"]) == (
            "escalated",
            "cloud",
        )

        # The README's image request: a JPEG in, ImageNet labels out (docs/models.md).
        jpeg = base64.b64encode(sample("chelsea")).decode()
        image_body = json.dumps(
            {
                "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [jpeg]}],
                "outputs": [{"name": "labels"}],
            }
        ).encode()
        for route, served_by in (("imagenet", "edge"), ("efficientnet-lite2", "cloud")):
            status, data = post(f"{edge}/v2/models/{route}/infer", image_body)
            assert status == 200, data
            assert data["parameters"]["served_by"] == served_by, data
            assert data["outputs"][0]["data"][0] == "Egyptian cat"

        # The README's text request: a text in, a newsgroup out, on the device through the
        # `news` cascade and from the cloud's news-mpnet (docs/models.md).
        text_body = json.dumps(
            {
                "inputs": [
                    {"name": "text", "shape": [1], "datatype": "BYTES", "data": [README_TEXT]}
                ],
                "outputs": [{"name": "labels"}],
            }
        ).encode()
        for route, served_by in (("news", "edge"), ("news-mpnet", "cloud")):
            status, data = post(f"{edge}/v2/models/{route}/infer", text_body)
            assert status == 200, data
            assert data["parameters"]["served_by"] == served_by, data
            assert data["outputs"][0]["data"][0] == "rec.sport.hockey"

        # Text (docs/openai.md): a short chat on the device, a long one streamed from the
        # cloud (the size rule), and embeddings from the cloud's mpnet-base.
        import openai

        client = openai.OpenAI(base_url=f"{edge}/v1", api_key="none", max_retries=0, timeout=60)
        short = client.chat.completions.create(
            model="assistant", messages=[{"role": "user", "content": "Hi"}], max_tokens=2
        )
        assert (short.model_extra["served_by"], short.model_extra["route"]) == ("edge", "local")
        long = [{"role": "user", "content": "Summarise: " + "the fox jumps. " * 12}]
        chunks = list(
            client.chat.completions.create(
                model="assistant", messages=long, max_tokens=2, temperature=0, stream=True
            )
        )
        assert {(c.model_extra["served_by"], c.model_extra["route"]) for c in chunks} == {
            ("cloud", "size")
        }
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        vectors = client.embeddings.create(model="mpnet-base", input=["a lighthouse"])
        assert len(vectors.data[0].embedding) == 768

        # A sensor reading on the sensor topic gets its result (docs/sensors.md).
        result = sensor_result(broker, device)
        assert result["kind"] == "result" and result["sensor"] == "s1", result
        assert result["reading_id"].startswith("r-")
        assert int(np.argmax(result["outputs"][0]["data"])) == 0

        # The stock broker lacks TCP_NODELAY: the start-up log and `tether status` say so.
        wait_for(
            lambda: "set_tcp_nodelay true" in log_path.read_text(),
            30.0,
            "the start-up log named the missing broker setting",
        )
        status_text = subprocess.run(
            [sys.executable, "-m", "tether", "status", "--url", edge,
             "--bridge-url", f"http://127.0.0.1:{ports['bridge metrics']}/metrics"],
            cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60, check=True,
        ).stdout  # fmt: skip
        assert "WARNING" in status_text and "set_tcp_nodelay true" in status_text, status_text
        assert "Sensor bridge: not running" not in status_text

        # The broker dies in the middle of a long answer streamed from the cloud: the client
        # gets an error event within the route's deadline (timeout_s in the demo config),
        # never a hang; the offline assistant (cloud-first) then answers on the device.
        stream = client.chat.completions.create(
            model="assistant", messages=long, max_tokens=400, temperature=0, stream=True
        )
        pieces: list[str] = []
        killed = float("inf")
        with pytest.raises(openai.APIError) as broken:
            for chunk in stream:
                assert chunk.model_extra["served_by"] == "cloud"
                if chunk.choices and chunk.choices[0].delta.content:
                    pieces.append(chunk.choices[0].delta.content)
                    if len(pieces) == 2:
                        broker.kill()
                        killed = time.monotonic()
        assert len(pieces) >= 2  # the stream had started before the broker went
        assert time.monotonic() - killed < DEMO_TEXT_TIMEOUT_S
        assert broken.value.code == "stream_broken", broken.value
        offline = client.chat.completions.create(
            model="assistant-cloud-first", messages=[{"role": "user", "content": "Hi"}],
            max_tokens=2, temperature=0,
        )  # fmt: skip
        assert (offline.model_extra["served_by"], offline.model_extra["route"]) == (
            "edge",
            "degraded",
        )

        # Ctrl-C stops every child process, and nothing is left listening.
        tree = process_tree(up.pid)
        assert len(tree) >= 5, tree  # cloud, fleet service, edge (+ worker), bridge, agent
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=60) == 0, log_path.read_text()[-3000:]
        left = [pid for pid, started in tree.items() if alive(pid, started)]
        assert left == [], f"still running after Ctrl-C: {left}"
        assert [name for name, port in ports.items() if listening(port)] == []
    finally:  # after a failure too, leave nothing running
        if up.poll() is None:
            tree = {**tree, **process_tree(up.pid)}
            up.send_signal(signal.SIGINT)  # `tether up` stops its children itself
            try:
                up.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(up.pid, signal.SIGKILL)
                up.wait()
        for pid, started in tree.items():
            if alive(pid, started):
                os.kill(pid, signal.SIGKILL)


def unsure_pixels() -> list[float]:
    """A test digit the student is unsure of (the cascade escalates it)."""
    import onnxruntime as ort

    pixels, _labels = load_split("test")
    session = ort.InferenceSession(
        str(REPOSITORY / "digits-student" / "1" / "model.onnx"),
        providers=["CPUExecutionProvider"],
    )
    student = np.asarray(session.run(None, {"pixels": pixels})[0])
    index = int(np.flatnonzero(confidence(student) < 0.6)[0])
    return [float(v) for v in pixels[index]]


def sensor_result(broker: Broker, device: str) -> dict[str, Any]:
    """Publish readings of the README's zero on sensor ``s1`` until one's result comes back
    (the bridge may still be subscribing when the first goes out)."""
    results: list[Message] = []
    client = MqttClient(broker.url, f"sensor-{uuid.uuid4().hex[:6]}")
    results_topic = f"tether/{device}/sensors/s1/inference"
    client.subscribe(results_topic, results.append, qos=1)
    client.start()
    try:
        assert client.wait_subscribed(results_topic, 10.0)
        until = time.monotonic() + START_S
        sent = 0
        while not results:
            assert time.monotonic() < until, "no result for a sensor reading"
            payload = json.dumps({"id": f"r-{sent}", "data": README_PIXELS}).encode()
            client.publish(f"tether/{device}/sensors/s1/data", payload, qos=1)
            sent += 1
            wait_until = time.monotonic() + 2.0
            while not results and time.monotonic() < wait_until:
                time.sleep(0.05)
    finally:
        client.stop()
    result: dict[str, Any] = json.loads(results[0].payload)
    return result
