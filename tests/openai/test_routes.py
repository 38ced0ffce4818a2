"""Text routes on a device whose cloud cannot be reached (the offline assistant).

The agent is built in-process from settings (the same app ``tether edge`` serves) with the
uplink pointed at a port where no broker listens: ``cloud-first`` and the size rule answer on
the device, marked ``degraded``; ``cloud`` is a 503 in OpenAI's shape; ``local-first``
answers locally.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from flask.testing import FlaskClient

from edge.settings import load_settings
from edge.worker import build_app
from harness.broker import free_port
from tests.openai.conftest import linked_repository

CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def app_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlaskClient]:
    base = tmp_path_factory.mktemp("text-routes")
    settings = load_settings(
        None,
        repository=linked_repository(base / "repository", ["smollm2-135m"]),
        data_dir=base / "data",
        mqtt_url=f"mqtt://127.0.0.1:{free_port()}",
        uplink={"connect_wait_s": 0, "timeout_s": 1.0},
        routes={
            "assistant": {"mode": "cloud-first", "local_model": "smollm2-135m"},
            "big": {"mode": "cloud", "task": "chat"},
            "busy": {"mode": "local-first", "local_model": "smollm2-135m"},
            "sized": {
                "mode": "local",
                "local_model": "smollm2-135m",
                "max_local_new_tokens": 1,
            },
        },
    )
    app = build_app(settings)
    try:
        yield app.test_client()
    finally:
        app.extensions["tether.agent"].close()


def chat(client: FlaskClient, model: str) -> Any:
    return client.post("/v1/chat/completions", json={"model": model, **CHAT})


def test_routes_are_listed_with_their_modes(app_client: FlaskClient) -> None:
    models = {m["id"]: m for m in app_client.get("/v1/models").json["data"]}
    assert models["assistant"]["route"] == "cloud-first"
    assert models["big"]["owned_by"] == "tether-cloud"
    assert models["smollm2-135m"]["task"] == "chat"


def test_cloud_first_answers_locally_marked_degraded(app_client: FlaskClient) -> None:
    answer = chat(app_client, "assistant")
    assert answer.status_code == 200
    assert answer.json["served_by"] == "edge"
    assert answer.json["route"] == "degraded"
    assert answer.json["cloud_error"]
    assert answer.headers["X-Tether-Route"] == "degraded"
    assert answer.json["choices"][0]["message"]["content"]


def test_size_rule_falls_back_to_the_device_when_the_cloud_is_away(
    app_client: FlaskClient,
) -> None:
    answer = chat(app_client, "sized")  # 2 new tokens > max_local_new_tokens = 1: cloud first
    assert answer.status_code == 200
    assert answer.json["route"] == "degraded"


def test_cloud_only_route_is_503_in_openai_shape(app_client: FlaskClient) -> None:
    answer = chat(app_client, "big")
    assert answer.status_code == 503
    assert answer.json["error"]["type"] == "server_error"


def test_local_first_answers_on_the_device(app_client: FlaskClient) -> None:
    answer = chat(app_client, "busy")
    assert answer.status_code == 200
    assert (answer.json["served_by"], answer.json["route"]) == ("edge", "local")
