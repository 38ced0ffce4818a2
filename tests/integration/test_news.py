"""Texts end to end: a real ``tether edge`` process serving ``news-minilm``, a cloud worker
serving ``news-mpnet`` on a real Mosquitto, and the ``news`` cascade with the threshold the
build calibrated. A text the student is sure of is answered on the device; one it is unsure
of goes up the uplink as the text itself and the teacher answers."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloud.worker import CloudWorker
from harness.agent_process import AgentProcess
from harness.broker import Broker, free_port
from harness.cascade_stack import cloud_worker, edge_config, outputs, post, uplink_requests
from harness.news import REPOSITORY, STUDENT, TEACHER, news_built
from models.news import read_report
from models.newsgroups import load_split
from shared import topics
from shared.mqtt import Message

#: Test-split documents the student scores to find a sure one and an unsure one.
CANDIDATES = 24


@pytest.fixture(scope="module")
def threshold() -> float:
    if not news_built():
        pytest.fail("the news models are not built: run `make install` (tether models build)")
    return float(read_report(REPOSITORY)["threshold"])


@pytest.fixture(scope="module")
def repository(threshold: float, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("news-repository")
    for name in (STUDENT, TEACHER):
        shutil.copytree(REPOSITORY / name, root / name)
    return root


@pytest.fixture(scope="module")
def news_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    instance = Broker(tmp_path_factory.mktemp("news-mosquitto")).start()
    yield instance
    instance.stop()


@pytest.fixture(scope="module")
def worker(news_broker: Broker, repository: Path) -> Iterator[CloudWorker]:
    with cloud_worker(news_broker.url, repository, [TEACHER]) as instance:
        yield instance


@pytest.fixture(scope="module")
def agent(
    news_broker: Broker,
    worker: CloudWorker,
    repository: Path,
    threshold: float,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[AgentProcess]:
    data = tmp_path_factory.mktemp("news-edge")
    config = edge_config(
        data / "edge.toml",
        repository=repository,
        broker_url=news_broker.url,
        device_id="news-desk",
        models=[STUDENT],
        routes=f"[routes.{TEACHER}]\n"
        'mode = "cloud"\n'
        "[routes.news]\n"
        'mode = "cascade"\n'
        f'local_model = "{STUDENT}"\n'
        f'cloud_model = "{TEACHER}"\n'
        f"threshold = {threshold}\n",
    )
    process = AgentProcess(data, config=config, grpc_port=free_port())
    process.start(ready_timeout_s=60.0)
    yield process
    process.stop()


def post_texts(agent: AgentProcess, model: str, texts: list[str]) -> tuple[int, Any]:
    body = {
        "inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}],
        "outputs": [{"name": "labels"}, {"name": "probabilities"}],
    }
    return post(
        f"{agent.url}/v2/models/{model}/infer",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )


@pytest.fixture
def uplink_wire(news_broker: Broker) -> Iterator[list[Message]]:
    with uplink_requests(news_broker.url) as seen:
        yield seen


def test_the_news_cascade_answers_sure_texts_on_the_edge_and_escalates_unsure_ones(
    agent: AgentProcess, threshold: float, uplink_wire: list[Message]
) -> None:
    test = load_split("test")
    texts = test.texts[:CANDIDATES]
    status, scored = post_texts(agent, STUDENT, texts)  # the student alone, on the device
    assert status == 200, scored
    probabilities = outputs(scored)["probabilities"]
    confidence = [max(probabilities[i * 20 : (i + 1) * 20]) for i in range(len(texts))]
    sure = next(i for i, c in enumerate(confidence) if c >= threshold)
    unsure = next(i for i, c in enumerate(confidence) if c < threshold)

    status, body = post_texts(agent, "news", [texts[sure]])
    assert status == 200, body
    params = body["parameters"]
    assert (params["served_by"], params["route"]) == ("edge", "local")
    assert params["confidence"] >= threshold
    assert outputs(body)["labels"][0] == outputs(scored)["labels"][sure * 5]
    assert not uplink_wire

    status, teacher = post_texts(agent, TEACHER, [texts[unsure]])  # the cloud model alone
    assert status == 200, teacher
    status, body = post_texts(agent, "news", [texts[unsure]])
    assert status == 200, body
    params = body["parameters"]
    assert params["confidence"] < threshold
    assert (params["served_by"], params["route"]) == ("cloud", "escalated")
    assert params["model"] == TEACHER and body["model_name"] == "news"
    assert outputs(body)["labels"] == outputs(teacher)["labels"]
    assert outputs(body)["labels"][0] in test.classes
    # the uplink carried the text itself (UTF-8), not token ids
    cascade = [m for m in uplink_wire if m.topic == topics.cloud_request("news-desk", TEACHER)]
    assert len(cascade) == 2
    size = len(texts[unsure].encode())
    assert size < len(cascade[-1].payload) < size + 2048


def test_bad_text_through_the_cascade_is_a_400_and_nothing_escalates(
    agent: AgentProcess, uplink_wire: list[Message]
) -> None:
    status, body = post_texts(agent, "news", ["  "])
    assert status == 400 and "text 0: empty" in body["error"], body
    assert not uplink_wire
