"""A real ``tether edge`` serving the text models, driven by the official ``openai`` client.

The agent serves ``smollm2-135m`` and ``minilm-l6`` from a repository of links into
``models/text-repository`` (built by ``make install`` / ``tether models build``), with a
bearer token set, so every test also goes through the agent's authentication.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.agent_process import AgentProcess
from tests.conftest import ROOT

TEXT_REPOSITORY = ROOT / "models" / "text-repository"
TOKEN = "openai-test-token-0123456789"


def text_model_dir(name: str) -> Path:
    """A built text model's folder; fails with the command that builds it when missing."""
    folder = TEXT_REPOSITORY / name
    if not (folder / "config.json").is_file():
        pytest.fail(f"text model {name} is not built: run `make install` (tether models build)")
    return folder


def linked_repository(root: Path, names: list[str]) -> Path:
    """A repository folder holding links to the named text models."""
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        (root / name).symlink_to(text_model_dir(name), target_is_directory=True)
    return root


@pytest.fixture(scope="package")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    """``tether edge`` with smollm2-135m and minilm-l6, requiring a bearer token."""
    base = tmp_path_factory.mktemp("openai-edge")
    repository = linked_repository(base / "repository", ["smollm2-135m", "minilm-l6"])
    agent = AgentProcess(base / "data", repository=repository, env={"TETHER_API_TOKENS": TOKEN})
    # Loading and warming both models takes a few seconds; more on a loaded 2-core machine.
    agent.start(ready_timeout_s=120)
    try:
        yield agent
    finally:
        agent.stop()


@pytest.fixture(scope="package")
def client(edge: AgentProcess) -> object:
    """The official OpenAI client pointed at the agent."""
    import openai

    return openai.OpenAI(base_url=edge.url + "/v1", api_key=TOKEN, max_retries=0, timeout=60)


def http(url: str, body: object | None = None, token: str | None = TOKEN) -> tuple[int, Any, Any]:
    """A raw request (for what the client would hide: headers, base64 as sent): status,
    headers (case-insensitive: the server sends them in lower case) and the JSON body."""
    import json
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    request.add_header("Content-Type", "application/json")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, json.loads(exc.read())
