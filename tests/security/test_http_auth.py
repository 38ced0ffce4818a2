"""Bearer tokens, rate limits and limits of the edge HTTP API: in-process and as a real agent."""

from __future__ import annotations

import http.client
import json
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

from edge.access.guard import Guard, TokenStore, bearer_token
from edge.access.ratelimit import RateLimiter, Rule
from edge.access.tokens import TokenEntry, parse_entry, parse_tokens_text
from edge.fleet_health import first_token
from edge.http.auth import install_security
from edge.settings import EdgeSettings, is_loopback_host, load_settings
from edge.worker import build_app
from harness.agent_process import ROOT, AgentProcess
from harness.broker import free_port
from harness.onnx_models import dense_model, write_model
from shared.errors import TooManyRequests
from tests.security.secure_broker import Pki

TOKEN = "t0ken-for-the-edge-api-0001"
OLD_TOKEN = "t0ken-being-rotated-out-0002"
INFER_TOKEN = "tenant-a-infer-only-0003"
ADMIN_TOKEN = "deployer-admin-only-0004"
HASH_TOKEN = "hash#in-the-middle-0005"  # a '#' inside a token is part of it
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
    install_security(app, Guard.from_settings(settings.http))
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


ADMIN_ROUTES = [
    ("post", "/v2/repository/index"),
    ("post", "/v2/repository/models/dense/load"),
    ("post", "/v2/repository/models/dense/unload"),
    ("get", "/metrics"),
]


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
    store = TokenStore([TokenEntry(TOKEN)])
    identity = store.identify(TOKEN)
    assert identity is not None and identity.name.startswith("token:")
    assert TOKEN not in repr(identity)
    assert store.identify("") is None


def test_bearer_parsing() -> None:
    assert bearer_token(f"Bearer {TOKEN}") == TOKEN
    assert bearer_token(f"BEARER {TOKEN}") == TOKEN
    assert bearer_token("Basic abc") is None
    assert bearer_token(None) is None and bearer_token("") is None


def test_a_short_or_invalid_line_in_a_reloaded_tokens_file_is_off_alone(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"{TOKEN}\n")
    store = TokenStore(file=path, recheck_s=0.0)
    path.write_text(f"{TOKEN}\nsesame-123\n{OLD_TOKEN} superuser\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    assert store.identify(TOKEN)
    assert not store.identify("sesame-123") and not store.identify(OLD_TOKEN)


# ---------------------------------------------------------------------- entries and scopes


def test_token_entry_syntax() -> None:
    assert parse_entry(TOKEN) == TokenEntry(TOKEN)
    assert parse_entry(f"  {INFER_TOKEN}   infer ").scopes == {"infer"}
    assert parse_entry(f"{TOKEN} infer admin").scopes == {"infer", "admin"}
    assert parse_entry(f"{TOKEN} Admin,infer").scopes == {"infer", "admin"}
    assert TOKEN not in repr(parse_entry(TOKEN))


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("sesame-123", "shorter than 16"),
        (f"{TOKEN} superuser", "unknown scope"),
        (f"#{TOKEN}", "starts with '#'"),
        (f"{TOKEN}\x7f", "visible ASCII"),
        ("t\u00f6ken-with-an-umlaut-0006", "visible ASCII"),
    ],
)
def test_invalid_entries_are_refused_without_echoing_them(entry: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as caught:
        parse_entry(entry)
    assert entry.split()[0] not in str(caught.value)


def test_tokens_file_comments_never_cut_a_token() -> None:
    entries, problems = parse_tokens_text(
        "# API tokens of this device\n"
        f"{TOKEN}\n"
        f"{HASH_TOKEN} infer  # tenant B\n"
        "   # an indented comment\n"
        "sesame-123\n"
        f"{OLD_TOKEN} superuser\n"
    )
    assert [(e.token, e.scopes) for e in entries] == [
        (TOKEN, None),
        (HASH_TOKEN, frozenset({"infer"})),
    ]
    assert [p.split(":")[0] for p in problems] == ["line 5", "line 6"]
    assert not any("sesame" in p or OLD_TOKEN in p for p in problems)


@pytest.mark.parametrize("source", ["settings", "environment", "file"])
def test_every_token_source_obeys_the_same_rules(
    source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    short = "sesame-123"
    http: dict[str, object] = {}
    if source == "settings":
        http = {"auth": {"tokens": [TOKEN, short]}}
    elif source == "environment":
        monkeypatch.setenv("TETHER_API_TOKENS", f"{TOKEN},{short}")
    else:
        path = tmp_path / "tokens"
        path.write_text(f"{TOKEN}\n{short}  # too short\n")
        http = {"auth": {"tokens_file": path}}
    with pytest.raises(ValueError, match="shorter than 16") as caught:
        load_settings(None, data_dir=tmp_path, http=http)
    assert short not in str(caught.value)


def test_scopes_from_settings_and_default_scopes(tmp_path: Path) -> None:
    settings = load_settings(
        None,
        data_dir=tmp_path,
        http={"auth": {"tokens": [f"{INFER_TOKEN} infer", TOKEN], "default_scopes": ["infer"]}},
    )
    store = TokenStore.from_settings(settings.http.auth)
    assert store.identify(TOKEN).scopes == {"infer"}  # type: ignore[union-attr]
    assert first_token(settings) is None  # no token may read /metrics
    with pytest.raises(ValueError, match="default_scopes"):
        load_settings(None, data_dir=tmp_path, http={"auth": {"default_scopes": ["root"]}})


def test_the_health_gate_scrapes_metrics_with_an_admin_token(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"{ADMIN_TOKEN} admin\n")
    settings = load_settings(
        None,
        data_dir=tmp_path,
        http={"auth": {"tokens": [f"{INFER_TOKEN} infer"], "tokens_file": path}},
    )
    assert first_token(settings) == ADMIN_TOKEN


@pytest.mark.parametrize("fast_path", [True, False])
def test_an_infer_token_gets_403_on_admin_routes(
    repository: Path, tmp_path: Path, fast_path: bool
) -> None:
    app = secured_app(
        repository,
        tmp_path,
        fast_path=fast_path,
        auth={"tokens": [f"{INFER_TOKEN} infer", f"{ADMIN_TOKEN} admin"]},
    )
    client = app.test_client()
    tenant = {"Authorization": f"Bearer {INFER_TOKEN}"}
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    assert client.post("/v2/models/dense/infer", json=BODY, headers=tenant).status_code == 200
    for path in ("/v2", "/v2/models/dense", "/v2/models/dense/ready"):
        assert client.get(path, headers=tenant).status_code == 200
    for method, path in ADMIN_ROUTES:
        response = getattr(client, method)(path, headers=tenant)
        assert response.status_code == 403, path
        assert response.get_json() == {
            "error": "this token lacks the 'admin' scope this endpoint needs"
        }
    assert client.get("/metrics", headers=admin).status_code == 200
    refused = client.post("/v2/models/dense/infer", json=BODY, headers=admin)
    assert refused.status_code == 403 and "'infer' scope" in refused.get_json()["error"]
    assert client.get("/no/such/route", headers=tenant).status_code == 404


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


def call_json(
    url: str, *, token: str | None = None, method: str = "GET", body: bytes | None = None
) -> tuple[int, object]:
    """Status and JSON body of a call."""
    request = urllib.request.Request(url, data=body, method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def agent(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    data_dir = tmp_path_factory.mktemp("secured-agent")
    tokens_file = data_dir / "api-tokens"
    tokens_file.write_text(
        f"# tokens of this device\n{ADMIN_TOKEN} admin\n{HASH_TOKEN} infer  # tenant B\n"
    )
    process = AgentProcess(
        data_dir,
        repository=repository,
        args=["--workers", "1"],
        env={
            "TETHER_API_TOKENS": f"{TOKEN},{OLD_TOKEN},{INFER_TOKEN} infer",
            "TETHER_HTTP__AUTH__TOKENS_FILE": str(tokens_file),
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


def test_a_real_agent_enforces_scopes(agent: AgentProcess) -> None:
    infer = f"{agent.url}/v2/models/dense/infer"
    body = json.dumps(BODY).encode()
    for tenant in (INFER_TOKEN, HASH_TOKEN):  # from the environment and from the file
        assert call(infer, method="POST", body=body, token=tenant)[0] == 200
        assert call(f"{agent.url}/v2/models/dense", token=tenant)[0] == 200
        for method, path in ADMIN_ROUTES:
            status, answer = call_json(
                agent.url + path,
                token=tenant,
                method=method.upper(),
                body=b"" if method == "post" else None,
            )
            assert status == 403, path
            assert answer == {"error": "this token lacks the 'admin' scope this endpoint needs"}
    # the file's '#' is part of the token: its prefix is no token at all
    assert (
        call(infer, method="POST", body=body, token=HASH_TOKEN.split("#")[0] + "x" * 16)[0] == 401
    )
    assert call(f"{agent.url}/metrics", token=ADMIN_TOKEN)[0] == 200
    status, answer = call_json(infer, method="POST", body=body, token=ADMIN_TOKEN)
    assert status == 403 and answer == {
        "error": "this token lacks the 'infer' scope this endpoint needs"
    }


def test_a_real_agent_refuses_a_tokens_file_with_a_short_token(
    repository: Path, tmp_path: Path
) -> None:
    tokens_file = tmp_path / "api-tokens"
    tokens_file.write_text(f"{TOKEN}\nsesame-123\n")
    result = edge_that_must_exit(
        tmp_path,
        "--repository",
        str(repository),
        env={"TETHER_HTTP__AUTH__TOKENS_FILE": str(tokens_file)},
    )
    assert result.returncode != 0
    assert "line 2: token shorter than 16 characters" in result.stderr
    assert "sesame-123" not in result.stderr


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


def edge_that_must_exit(
    data_dir: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``tether edge`` without API tokens in the environment, expecting it to exit."""
    environment = {k: v for k, v in os.environ.items() if k != "TETHER_API_TOKENS"}
    environment.update(TETHER_DATA_DIR=str(data_dir), **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "tether", "edge", "--port", str(free_port()), *args],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_non_loopback_bind_without_tokens_refuses_to_start(tmp_path: Path) -> None:
    result = edge_that_must_exit(tmp_path, "--host", "0.0.0.0")
    assert result.returncode != 0
    assert "no API tokens" in result.stderr
    assert "allow_unauthenticated" in result.stderr


def test_settings_object_of_a_secured_agent(tmp_path: Path) -> None:
    settings = EdgeSettings(
        data_dir=tmp_path, http={"host": "0.0.0.0", "auth": {"tokens": [TOKEN]}}
    )
    assert settings.http.auth.configured and settings.http.rate_limited
