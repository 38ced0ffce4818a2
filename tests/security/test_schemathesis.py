"""Schemathesis against a running edge agent: every operation of its own OpenAPI document,
valid and invalid inputs, at least 1,000 requests in all, and never a 5xx.

The agent is a real ``tether edge`` process with bearer tokens on; every request carries a
token, so the fuzzing reaches the handlers rather than stopping at the 401. Half of the
cases that name a model name a real one (``dense``, version ``1``), so bodies reach the
tensor decoder and the runtime instead of stopping at the 404. Generation is derandomised
(a fixed seed), so a failure reproduces.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from edge.http.openapi import OPERATIONS
from harness.agent_process import AgentProcess
from harness.onnx_models import dense_model, write_model

TOKEN = "schemathesis-token-000000000001"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: Examples per operation and generation mode (13 operations x 2 modes; some run fewer).
EXAMPLES = 100
MINIMUM_CASES = 1_000
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
#: Operations whose ``model`` may be the real one (never load/unload: fuzzing must not
#: change what the agent serves, or later cases would test an emptied repository).
REAL_MODEL_OPERATIONS = ("infer", "model_metadata", "model_ready")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    root = tmp_path_factory.mktemp("schemathesis")
    write_model(root / "repository", "dense", dense_model(4, 3, seed=1))
    process = AgentProcess(
        root / "data",
        repository=root / "repository",
        args=["--workers", "2"],
        env={
            "TETHER_API_TOKENS": TOKEN,
            "TETHER_HTTP__MAX_BODY_BYTES": str(1024 * 1024),
            "TETHER_HTTP__MAX_TENSOR_ELEMENTS": "100000",
        },
    )
    process.start()
    yield process
    process.stop()


def fuzz(operation: Any, mode: GenerationMode, url: str, session: requests.Session) -> int:
    """Run one operation's generated cases against the agent; returns how many were sent."""
    real = str(operation.definition.raw.get("operationId", "")).removesuffix("_version")
    sent = 0

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode), use_real=st.booleans())
    def run(case: Any, use_real: bool) -> None:
        nonlocal sent
        if use_real and real in REAL_MODEL_OPERATIONS and case.path_parameters:
            case.path_parameters["model"] = "dense"
            if "version" in case.path_parameters:
                case.path_parameters["version"] = "1"
        try:
            response = case.call(base_url=url, session=session, headers=AUTH, timeout=30)
        except (requests.exceptions.InvalidHeader, ValueError, UnicodeError):
            return  # the HTTP client refused to send it (an illegal header value)
        sent += 1
        case.validate_response(response, checks=CHECKS, headers=AUTH)

    try:
        run()
    except Unsatisfiable:
        if mode is GenerationMode.POSITIVE:
            raise
    return sent


def test_no_generated_request_makes_the_agent_fail(agent: AgentProcess) -> None:
    schema = schemathesis.openapi.from_url(f"{agent.url}/v2/openapi.json", headers=AUTH)
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    # schemathesis leaves out the operation that serves the schema it loaded
    documented = {f"{op.method.upper()} {op.path}" for op in OPERATIONS}
    assert {op.label for op in operations} == documented - {"GET /v2/openapi.json"}
    session = requests.Session()
    sent: dict[str, int] = {}
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            sent[f"{operation.label} [{mode.value}]"] = fuzz(operation, mode, agent.url, session)

    total = sum(sent.values())
    print(f"schemathesis: {total} requests over {len(operations)} operations: {sent}")
    assert total >= MINIMUM_CASES, sent
    with urllib.request.urlopen(f"{agent.url}/v2/health/ready", timeout=5) as response:
        assert response.status == 200
    with urllib.request.urlopen(f"{agent.url}/v2/health/live", timeout=5) as response:
        assert response.status == 200
    assert agent.process is not None and agent.process.poll() is None
    assert "Traceback" not in agent.log()


def test_the_agent_answers_health_checks_after_fuzzing(agent: AgentProcess) -> None:
    request = urllib.request.Request(f"{agent.url}/v2/models/dense/ready", headers=AUTH)
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200


def test_repository_of_the_fuzzed_agent_is_intact(agent: AgentProcess) -> None:
    assert Path(agent.data_dir).is_dir()
