"""Images end to end: a real ``tether edge`` process serving EfficientNet-Lite0, a cloud
worker serving EfficientNet-Lite2 on a real Mosquitto, and the ``imagenet`` cascade.

Clients send what they have (JPEG files: JSON base64, the binary extension, tritonclient)
and get ImageNet class names back; an escalation carries the encoded image up the uplink.
"""

from __future__ import annotations

import base64
import json
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient

from cloud.worker import CloudWorker
from edge.sensors.bridge import SensorBridge
from edge.settings import load_settings
from harness.agent_process import AgentProcess
from harness.broker import Broker, free_port
from harness.cascade_stack import cloud_worker, edge_config, outputs, uplink_requests
from harness.cascade_stack import post as post_url
from harness.images import LITE0, LITE2, REPOSITORY, images_built, png_bomb, sample
from serving.settings import RuntimeSettings
from shared import topics
from shared.codec import HEADER_LENGTH_HEADER, encode_request
from shared.mqtt import Message, MqttClient

CPU = ["CPUExecutionProvider"]
#: Between Lite0's confidence on coffee.png (about 0.95) and on chelsea.png (about 0.40), so
#: the first stays on the device and the second escalates.
THRESHOLD = 0.6
#: Lite0's network without the image pipeline: takes the FP32 tensor, answers no labels.
PLAIN = "lite0-tensor"


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not images_built():
        pytest.fail("the image models are not built: run `make install` (tether models build)")
    root = tmp_path_factory.mktemp("images-repository")
    for name in (LITE0, LITE2):
        shutil.copytree(REPOSITORY / name, root / name)
    # Lite0's network alone, without the pipeline: a cloud model that takes the tensor
    shutil.copytree(REPOSITORY / LITE0 / "1", root / PLAIN / "1")
    config = json.loads((REPOSITORY / LITE0 / "config.json").read_text())
    del config["pipeline"]
    (root / PLAIN / "config.json").write_text(json.dumps({**config, "name": PLAIN}))
    return root


@pytest.fixture(scope="module")
def images_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    instance = Broker(tmp_path_factory.mktemp("images-mosquitto")).start()
    yield instance
    instance.stop()


@pytest.fixture(scope="module")
def worker(images_broker: Broker, repository: Path) -> Iterator[CloudWorker]:
    with cloud_worker(images_broker.url, repository, [LITE2, PLAIN]) as instance:
        yield instance


@pytest.fixture(scope="module")
def agent(
    images_broker: Broker,
    worker: CloudWorker,
    repository: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[AgentProcess]:
    data = tmp_path_factory.mktemp("images-edge")
    config = edge_config(
        data / "edge.toml",
        repository=repository,
        broker_url=images_broker.url,
        device_id="camera-hub",
        models=[LITE0],
        routes=f"[routes.{LITE2}]\n"
        'mode = "cloud"\n'
        "[routes.imagenet]\n"
        'mode = "cascade"\n'
        f'local_model = "{LITE0}"\n'
        f'cloud_model = "{LITE2}"\n'
        f"threshold = {THRESHOLD}\n"
        f"[routes.{PLAIN}]\n"
        'mode = "cloud"\n'
        "[routes.imagenet-tensor]\n"
        'mode = "cascade"\n'
        f'local_model = "{LITE0}"\n'
        f'cloud_model = "{PLAIN}"\n'
        "threshold = 1.0\n",
    )
    process = AgentProcess(data, config=config, grpc_port=free_port())
    process.start(ready_timeout_s=60.0)
    yield process
    process.stop()


def post(agent: AgentProcess, model: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    return post_url(f"{agent.url}/v2/models/{model}/infer", body, headers)


def post_json_image(agent: AgentProcess, model: str, image: bytes) -> tuple[int, Any]:
    body = {
        "inputs": [
            {
                "name": "image",
                "shape": [1],
                "datatype": "BYTES",
                "data": [base64.b64encode(image).decode()],
            }
        ],
        "outputs": [{"name": "labels"}, {"name": "probabilities"}],
    }
    return post(agent, model, json.dumps(body).encode(), {"Content-Type": "application/json"})


@pytest.mark.parametrize(("image", "label"), [("chelsea", "Egyptian cat"), ("coffee", "espresso")])
def test_a_posted_jpeg_gets_its_label_from_the_edge(
    agent: AgentProcess, image: str, label: str
) -> None:
    status, body = post_json_image(agent, LITE0, sample(image))
    assert status == 200, body
    assert outputs(body)["labels"][0] == label
    assert body["parameters"]["served_by"] == "edge"
    assert body["parameters"]["model"] == LITE0


def test_tritonclient_binary_jpegs_get_labels(agent: AgentProcess) -> None:
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{agent.port}")
    images = np.array([sample("chelsea"), sample("coffee")], dtype=np.object_)
    image = httpclient.InferInput("image", [2], "BYTES")
    image.set_data_from_numpy(images, binary_data=True)
    result = client.infer(
        LITE0,
        [image],
        outputs=[httpclient.InferRequestedOutput("labels", binary_data=True)],
    )
    labels = result.as_numpy("labels")
    assert labels is not None and labels.shape == (2, 5)
    assert [row[0] for row in labels.tolist()] == [b"Egyptian cat", b"espresso"]
    assert result.get_response()["parameters"]["served_by"] == "edge"


@pytest.fixture
def uplink_wire(images_broker: Broker) -> Iterator[list[Message]]:
    with uplink_requests(images_broker.url) as seen:
        yield seen


def test_tritonclient_grpc_jpegs_get_labels(agent: AgentProcess) -> None:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url=f"127.0.0.1:{agent.grpc_port}")
    image = grpcclient.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([sample("coffee")], dtype=np.object_))
    result = client.infer(LITE0, [image], outputs=[grpcclient.InferRequestedOutput("labels")])
    labels = result.as_numpy("labels")
    assert labels is not None and labels[0][0] == b"espresso"


def test_the_imagenet_cascade_escalates_the_unsure_image_and_the_cloud_answers(
    agent: AgentProcess, uplink_wire: list[Message]
) -> None:
    status, sure = post_json_image(agent, "imagenet", sample("coffee"))
    assert status == 200, sure
    assert sure["parameters"]["served_by"] == "edge" and sure["parameters"]["route"] == "local"
    assert sure["parameters"]["confidence"] >= THRESHOLD
    assert outputs(sure)["labels"][0] == "espresso"

    status, unsure = post_json_image(agent, "imagenet", sample("chelsea"))
    assert status == 200, unsure
    params = unsure["parameters"]
    assert params["confidence"] < THRESHOLD
    assert params["served_by"] == "cloud" and params["route"] == "escalated"
    assert params["model"] == LITE2 and unsure["model_name"] == "imagenet"
    assert outputs(unsure)["labels"][0] == "Egyptian cat"
    assert params["cloud_ms"] > 0 and params["network_ms"] >= 0
    # the uplink carried the encoded image, not Lite0's 224x224x3 FP32 tensor (602 kB)
    assert [m.topic for m in uplink_wire] == [topics.cloud_request("camera-hub", LITE2)]
    jpeg = len(sample("chelsea"))
    assert jpeg < len(uplink_wire[0].payload) < jpeg + 2048


def test_a_20000_pixel_square_png_is_refused_from_its_header(agent: AgentProcess) -> None:
    images = np.empty(1, dtype=object)
    images[0] = png_bomb()
    body, length = encode_request({"image": images}, {"image": "BYTES"})
    status, error = post(agent, LITE0, body, {HEADER_LENGTH_HEADER: str(length)})
    assert status == 413
    assert "20000 x 20000" in error["error"] or "400000000" in error["error"]
    assert "refused from its header" in error["error"]
    status, body_after = post_json_image(agent, LITE0, sample("coffee"))  # the agent carries on
    assert status == 200 and outputs(body_after)["labels"][0] == "espresso"


def test_a_camera_publishing_jpeg_frames_gets_labels_back(
    images_broker: Broker, repository: Path, tmp_path: Path
) -> None:
    settings = load_settings(
        None,
        device_id="camera-hub",
        data_dir=tmp_path / "bridge",
        mqtt_url=images_broker.url,
        repository=repository,
        models=[LITE0],
        runtime=RuntimeSettings(backend="onnxruntime", providers=CPU),
        sensors={
            "bindings": [{"model": LITE0}],
            "metrics_port": 0,
            "client_id": f"bridge-{uuid.uuid4().hex[:6]}",
        },
    )
    bridge = SensorBridge(settings)
    bridge.start(connect_wait_s=10)
    results: list[Message] = []
    arrived = threading.Condition()

    def collect(message: Message) -> None:
        with arrived:
            results.append(message)
            arrived.notify_all()

    listener = MqttClient(images_broker.url, f"app-{uuid.uuid4().hex[:6]}")
    listener.start()
    listener.subscribe("tether/camera-hub/sensors/+/+", collect)
    camera = MqttClient(images_broker.url, f"camera-{uuid.uuid4().hex[:6]}")
    camera.start()
    try:
        frames = {"frame-1": sample("chelsea"), "frame-2": sample("coffee")}
        for frame_id, jpeg in frames.items():
            camera.publish(
                "tether/camera-hub/sensors/door-cam/data",
                jpeg,
                content_type="image/jpeg",
                correlation_data=frame_id.encode(),
            ).wait_for_publish(10)
        deadline = time.monotonic() + 120  # two images on a loaded 2-core machine
        with arrived:
            while sum(m.topic.endswith("/inference") for m in results) < 2:
                assert arrived.wait(max(0.0, deadline - time.monotonic())), [
                    (m.topic, m.payload[:200]) for m in results
                ]
        answers = {
            body["reading_id"]: body
            for body in (json.loads(m.payload) for m in results if m.topic.endswith("/inference"))
        }
        labels = {
            rid: next(o for o in body["outputs"] if o["name"] == "labels")["data"][0]
            for rid, body in answers.items()
        }
        assert labels == {"frame-1": "Egyptian cat", "frame-2": "espresso"}
        assert all(body["sensor"] == "door-cam" for body in answers.values())
        assert all(body["parameters"]["served_by"] == "edge" for body in answers.values())
    finally:
        camera.stop()
        listener.stop()
        bridge.stop()


def test_a_cloud_model_without_the_pipeline_gets_the_tensor_and_the_edge_adds_labels(
    agent: AgentProcess, uplink_wire: list[Message]
) -> None:
    status, body = post_json_image(agent, "imagenet-tensor", sample("chelsea"))
    assert status == 200, body
    assert body["parameters"]["served_by"] == "cloud" and body["parameters"]["model"] == PLAIN
    assert outputs(body)["labels"][0] == "Egyptian cat"  # labelled on the edge
    assert len(outputs(body)["probabilities"]) == 1000
    assert [m.topic for m in uplink_wire] == [topics.cloud_request("camera-hub", PLAIN)]
    tensor = 3 * 224 * 224 * 4
    assert tensor < len(uplink_wire[0].payload) < tensor + 2048
