"""Bearer tokens, rate limits and limits of the edge HTTP API: in-process and as a real agent."""

from __future__ import annotations

import http.client
import os
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from email.message import Message
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from edge.agent import build_app
from edge.http.auth import TokenStore, bearer_token, install_security
from edge.http.ratelimit import RateLimiter, Rule
from edge.settings import EdgeSettings, is_loopback_host, load_settings
from shared.errors import TooManyRequests
from tests.agent_process import ROOT, AgentProcess
from tests.broker import free_port
from tests.onnx_models import dense_model, write_model
from tests.security.secure_broker import Pki

TOKEN = "t0ken-for-the-edge-api-0001"
OLD_TOKEN = "t0ken-being-rotated-out-0002"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BODY = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("auth-repository")
    write_model(root, "dense", dense_model(4, 3, seed=1))
    return root


def secured_app(repository: Path, data_dir: Path, **http: object) -> Flask:
    settings = load_settings(None, repository=repository, data_dir=data_dir, http=http)
    app = build_app(settings)
    install_security(app, settings.http)
    return app


@pytest.fixture
def client(repository: Path, tmp_path: Path) -> FlaskClient:
    app = secured_app(repository, tmp_path, auth={"tokens": [TOKEN, OLD_TOKEN]})
    return app.test_client()


# ---------------------------------------------------------------------- tokens


def test_no_token_is_401_with_a_bearer_challenge(client: FlaskClient) -> None:
    response = client.post("/v2/models/dense/infer", json=BODY)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="tether"'
    assert response.get_json() == {"error": "this endpoint needs Authorization: Bearer <token>"}


@pytest.mark.parametrize(
    "header",
    [
        f"Bearer {TOKEN}x",
        f"Bearer {TOKEN[:-1]}",
        f"Basic {TOKEN}",
        TOKEN,
        "Bearer ",
        "Bearer",
        f"Bearer\t{TOKEN}x",
    ],
)
def test_a_wrong_token_is_401(client: FlaskClient, header: str) -> None:
    response = client.post("/v2/models/dense/infer", json=BODY, headers={"Authorization": header})
    assert response.status_code == 401
    assert TOKEN not in response.get_data(as_text=True)


@pytest.mark.parametrize("token", [TOKEN, OLD_TOKEN])
def test_every_configured_token_is_accepted(client: FlaskClient, token: str) -> None:
    headers = {"Authorization": f"bearer  {token} "}
    response = client.post("/v2/models/dense/infer", json=BODY, headers=headers)
    assert response.status_code == 200, response.get_json()


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", "/v2"),
        ("get", "/v2/models/dense"),
        ("get", "/v2/models/dense/ready"),
        ("post", "/v2/models/dense/infer"),
        ("post", "/v2/repository/index"),
        ("post", "/v2/repository/models/dense/load"),
        ("post", "/v2/repository/models/dense/unload"),
        ("get", "/metrics"),
        ("get", "/no/such/route"),
    ],
)
def test_inference_repository_and_metrics_need_a_token(
    client: FlaskClient, method: str, path: str
) -> None:
    assert getattr(client, method)(path).status_code == 401


@pytest.mark.parametrize("path", ["/v2/health/live", "/v2/health/ready", "/v2/openapi.json"])
def test_health_and_the_api_description_stay_open(client: FlaskClient, path: str) -> None:
    assert client.get(path).status_code == 200


def test_tokens_file_rotates_without_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"# edge API tokens\n{OLD_TOKEN}\n\n")
    store = TokenStore(file=path, recheck_s=0.0)
    assert store.identify(OLD_TOKEN) and not store.identify(TOKEN)
    path.write_text(f"{TOKEN}  # the new one\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    assert store.identify(TOKEN) and not store.identify(OLD_TOKEN)
    path.unlink()  # unreadable: fail closed
    assert not store.identify(TOKEN)
    assert store.enabled


def test_token_identity_is_a_fingerprint_not_the_token() -> None:
    store = TokenStore([TOKEN])
    identity = store.identify(TOKEN)
    assert identity is not None and identity.startswith("token:") and TOKEN not in identity
    assert store.identify("") is None


def test_bearer_parsing() -> None:
    assert bearer_token(f"Bearer {TOKEN}") == TOKEN
    assert bearer_token(f"BEARER {TOKEN}") == TOKEN
    assert bearer_token("Basic abc") is None
    assert bearer_token(None) is None and bearer_token("") is None


# ---------------------------------------------------------------------- rate limits


def test_token_bucket_refills_at_its_rate() -> None:
    now = [0.0]
    limiter = RateLimiter(Rule(rate=2.0, burst=3), clock=lambda: now[0])
    for _ in range(3):
        limiter.check("c1", "infer")
    with pytest.raises(TooManyRequests) as caught:
        limiter.check("c1", "infer")
    assert caught.value.retry_after == pytest.approx(0.5)
    limiter.check("c2", "infer")  # another client has its own bucket
    now[0] = 0.5
    limiter.check("c1", "infer")
    with pytest.raises(TooManyRequests):
        limiter.check("c1", "infer")


def test_routes_have_buckets_of_their_own_and_health_is_exempt() -> None:
    limiter = RateLimiter(
        Rule(rate=1.0, burst=1),
        {"infer": Rule(rate=1.0, burst=2)},
        exempt=["server_live"],
        clock=lambda: 0.0,
    )
    limiter.check("c", "infer")
    limiter.check("c", "infer")
    limiter.check("c", "model_metadata")  # the default bucket is still full
    for _ in range(10):
        limiter.check("c", "server_live")
    with pytest.raises(TooManyRequests):
        limiter.check("c", "infer")
    with pytest.raises(TooManyRequests):
        limiter.check("c", "metrics")


def test_the_limiter_forgets_the_least_recent_clients() -> None:
    limiter = RateLimiter(Rule(rate=1.0, burst=1), max_clients=2, clock=lambda: 0.0)
    for name in ("a", "b", "c"):
        limiter.check(name, "x")
    assert len(limiter._buckets) == 2


def test_rate_limit_answers_429_with_retry_after(repository: Path, tmp_path: Path) -> None:
    app = secured_app(
        repository,
        tmp_path,
        auth={"tokens": [TOKEN]},
        rate_limit={
            "enabled": True,
            "rate": 0.2,
            "burst": 100,
            "routes": {"infer": {"rate": 0.5, "burst": 2}},
        },
    )
    client = app.test_client()
    statuses = [
        client.post("/v2/models/dense/infer", json=BODY, headers=AUTH).status_code for _ in range(3)
    ]
    assert statuses == [200, 200, 429]
    response = client.post("/v2/models/dense/infer", json=BODY, headers=AUTH)
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "2"
    assert "rate limit" in response.get_json()["error"]
    assert client.get("/v2/models/dense", headers=AUTH).status_code == 200  # default bucket
    assert client.get("/v2/health/ready").status_code == 200


def test_guessing_tokens_is_rate_limited(repository: Path, tmp_path: Path) -> None:
    app = secured_app(
        repository,
        tmp_path,
        auth={"tokens": [TOKEN]},
        rate_limit={"enabled": True, "rate": 0.1, "burst": 3},
    )
    client = app.test_client()
    wrong = {"Authorization": "Bearer guess-guess-guess-guess"}
    statuses = [client.get("/v2", headers=wrong).status_code for _ in range(5)]
    assert statuses == [401, 401, 401, 429, 429]


# ---------------------------------------------------------------------- limits


def test_body_and_tensor_limits(repository: Path, tmp_path: Path) -> None:
    app = secured_app(
        repository, tmp_path, auth={"tokens": [TOKEN]}, max_body_bytes=4096, max_tensor_elements=64
    )
    client = app.test_client()
    big = client.post("/v2/models/dense/infer", data=b"{" + b" " * 5000 + b"}", headers=AUTH)
    assert big.status_code == 413
    huge = {"inputs": [{"name": "x", "shape": [1000, 4], "datatype": "FP32", "data": [0] * 4}]}
    assert client.post("/v2/models/dense/infer", json=huge, headers=AUTH).status_code == 413
    bad = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3]}]}
    assert client.post("/v2/models/dense/infer", json=bad, headers=AUTH).status_code == 400
    # an anonymous caller is refused before its body is read
    assert client.post("/v2/models/dense/infer", data=b"x" * 5000).status_code == 401


# ---------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.53", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.20", False),
        ("edge.local", False),
    ],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


def test_non_loopback_without_tokens_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no API tokens"):
        load_settings(None, data_dir=tmp_path, http={"host": "0.0.0.0"})
    allowed = load_settings(
        None, data_dir=tmp_path, http={"host": "0.0.0.0", "allow_unauthenticated": True}
    )
    assert allowed.http.rate_limited  # beyond loopback, rate limits are on by default
    assert not load_settings(None, data_dir=tmp_path).http.rate_limited


def test_tokens_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_API_TOKENS", f" {TOKEN} ,{OLD_TOKEN},")
    settings = load_settings(None, data_dir=tmp_path, http={"host": "0.0.0.0"})
    assert [t.get_secret_value() for t in settings.http.auth.tokens] == [TOKEN, OLD_TOKEN]
    assert TOKEN not in repr(settings)


def test_short_tokens_are_refused_without_echoing_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TETHER_API_TOKENS", "sesame-123")
    with pytest.raises(ValueError, match="shorter than 16") as caught:
        load_settings(None, data_dir=tmp_path)
    assert "sesame-123" not in str(caught.value)


def test_tls_needs_both_files(tmp_path: Path, pki: Pki) -> None:
    with pytest.raises(ValueError, match="both cert_file and key_file"):
        load_settings(None, data_dir=tmp_path, http={"tls": {"cert_file": pki.ca_file}})


# ---------------------------------------------------------------------- a real agent


class HttpsAgent(AgentProcess):
    """The agent serving HTTPS (its readiness probe verifies against SSL_CERT_FILE)."""

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"


def call(
    url: str, *, token: str | None = None, method: str = "GET", body: bytes | None = None
) -> tuple[int, Message]:
    """Status and headers (looked up case-insensitively, as HTTP names are)."""
    request = urllib.request.Request(url, data=body, method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    if body is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers


@pytest.fixture(scope="module")
def agent(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    process = AgentProcess(
        tmp_path_factory.mktemp("secured-agent"),
        repository=repository,
        args=["--workers", "1"],
        env={
            "TETHER_API_TOKENS": f"{TOKEN},{OLD_TOKEN}",
            "TETHER_HTTP__RATE_LIMIT__ENABLED": "true",
            "TETHER_HTTP__RATE_LIMIT__ROUTES": '{"repository_index": {"rate": 0.2, "burst": 3}}',
        },
    )
    process.start()
    yield process
    process.stop()


def test_a_real_agent_enforces_tokens(agent: AgentProcess) -> None:
    infer = f"{agent.url}/v2/models/dense/infer"
    body = b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}'
    assert call(infer, method="POST", body=body)[0] == 401
    assert call(infer, method="POST", body=body, token="not-the-token-at-all")[0] == 401
    assert call(infer, method="POST", body=body, token=TOKEN)[0] == 200
    assert call(f"{agent.url}/metrics", token=OLD_TOKEN)[0] == 200
    assert call(f"{agent.url}/v2/health/ready")[0] == 200


def test_a_real_agent_rate_limits(agent: AgentProcess) -> None:
    index = f"{agent.url}/v2/repository/index"
    statuses = [call(index, method="POST", token=TOKEN, body=b"")[0] for _ in range(3)]
    assert statuses == [200, 200, 200]
    status, headers = call(index, method="POST", token=TOKEN, body=b"")
    assert status == 429
    assert int(headers["Retry-After"]) >= 1


def test_a_real_agent_serves_https(
    repository: Path, tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_file))  # the test's trust store
    process = HttpsAgent(
        tmp_path / "agent",
        repository=repository,
        args=["--workers", "1"],
        env={
            "TETHER_API_TOKENS": TOKEN,
            "TETHER_HTTP__TLS__CERT_FILE": str(pki.directory / "server.crt"),
            "TETHER_HTTP__TLS__KEY_FILE": str(pki.directory / "server.key"),
        },
    )
    process.start()
    try:
        assert call(f"{process.url}/v2", token=TOKEN)[0] == 200
        assert call(f"{process.url}/v2")[0] == 401
        # no plain HTTP: the connection is dropped or answered with a TLS alert, not HTTP
        with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
            urllib.request.urlopen(f"http://127.0.0.1:{process.port}/v2/health/live", timeout=5)
        untrusted = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # trusts no CA: must refuse
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            urllib.request.urlopen(f"{process.url}/v2/health/live", timeout=5, context=untrusted)
    finally:
        process.stop()


def test_a_non_loopback_bind_without_tokens_refuses_to_start(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "TETHER_API_TOKENS"}
    env["TETHER_DATA_DIR"] = str(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "tether", "edge", "--host", "0.0.0.0", "--port", str(port)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "no API tokens" in result.stderr
    assert "allow_unauthenticated" in result.stderr


def test_settings_object_of_a_secured_agent(tmp_path: Path) -> None:
    settings = EdgeSettings(
        data_dir=tmp_path, http={"host": "0.0.0.0", "auth": {"tokens": [TOKEN]}}
    )
    assert settings.http.auth.configured and settings.http.rate_limited
