"""The edge agent's settings: one typed object, from a TOML file and ``TETHER_*`` variables.

Precedence, highest first: values passed in code (command-line flags), environment
variables (``TETHER_HTTP__PORT=9000`` for nested fields), the TOML file, the defaults.
Nothing else in the agent reads the environment; this object is passed in.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ConfigDict, Field, SecretStr, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from edge.access.tokens import (
    DEFAULT_SCOPES,
    Scope,
    TokenEntry,
    TokenSyntaxError,
    parse_entries,
    read_tokens_file,
)
from edge.route_modes import ROUTE_MODES, RouteModeName, needs_cloud
from edge.sensor_settings import SensorSettings
from serving.runtime_options import RuntimeOptions, tensorrt_available
from serving.settings import RuntimeSettings, Section, load_toml_settings
from serving.settings_toml import ConfigFileSource

if TYPE_CHECKING:
    from shared.mqtt import TlsConfig


#: The environment variable with the local API's bearer tokens (comma-separated entries).
API_TOKENS_VARIABLE = "TETHER_API_TOKENS"


def is_loopback_host(host: str) -> bool:
    """True when binding ``host`` only reaches this machine (127.0.0.0/8, ::1, localhost)."""
    name = host.strip().strip("[]")
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # a host name or an interface: assume the network can reach it


class HttpAuthSettings(Section):
    """Bearer-token authentication of the local API, with a scope per token (docs/security.md).

    Every source holds token entries in one syntax, ``TOKEN [SCOPE ...]``
    (``edge/access/tokens.py``), and obeys the same rules.
    """

    #: A validation error must never echo a token back into a log.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    tokens: list[SecretStr] = Field(
        default_factory=list,
        description="Accepted bearer tokens, several for rotation: each 'TOKEN' or 'TOKEN "
        "SCOPE...' (scopes infer, admin). Env TETHER_API_TOKENS: entries separated by commas.",
    )
    tokens_file: Path | None = Field(
        None,
        description="A file of more token entries, one per line ('TOKEN [SCOPE...]'; '#' "
        "starts a comment at a line's start or after a space); re-read when it changes, so "
        "tokens rotate without a restart.",
    )
    default_scopes: list[Scope] = Field(
        default_factory=lambda: list(DEFAULT_SCOPES),
        min_length=1,
        description="Scopes of a token entry that names none: infer (inference, metadata, "
        "model health), admin (repository load/unload/index, /metrics).",
    )

    @property
    def configured(self) -> bool:
        """True when any token source is set (authentication is then enforced)."""
        return bool(self.tokens) or self.tokens_file is not None

    def entries(self) -> list[TokenEntry]:
        """The inline token entries (``tokens`` and ``TETHER_API_TOKENS``), parsed."""
        return parse_entries((t.get_secret_value() for t in self.tokens), "http.auth.tokens")

    @model_validator(mode="after")
    def _valid_tokens(self) -> HttpAuthSettings:
        try:
            self.entries()
        except TokenSyntaxError as exc:
            raise ValueError(str(exc)) from None
        if self.tokens_file is not None:
            if not self.tokens_file.is_file():
                raise ValueError(f"http.auth.tokens_file {self.tokens_file} does not exist")
            try:
                _entries, problems = read_tokens_file(self.tokens_file)
            except OSError as exc:
                raise ValueError(f"http.auth.tokens_file {self.tokens_file}: {exc}") from None
            if problems:
                raise ValueError(f"http.auth.tokens_file {self.tokens_file}: {'; '.join(problems)}")
        return self


class HttpTlsSettings(Section):
    """HTTPS for the local API: both files, or neither for plain HTTP."""

    cert_file: Path | None = Field(None, description="PEM certificate (chain) of the server.")
    key_file: Path | None = Field(None, description="PEM private key of the certificate.")

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None


class RateLimitRule(Section):
    """A token bucket: ``rate`` requests a second on average, ``burst`` at once."""

    rate: float = Field(gt=0, description="Requests per second a client may make on average.")
    burst: int = Field(ge=1, description="Requests a client may make at once (bucket size).")


class RateLimitSettings(Section):
    """Per-client rate limiting of the local API (429 with Retry-After past it)."""

    enabled: bool | None = Field(
        None, description="Limit request rates (default: on when bound beyond loopback)."
    )
    rate: float = Field(100.0, gt=0, description="Requests per second per client, on average.")
    burst: int = Field(200, ge=1, description="Requests a client may make at once.")
    routes: dict[str, RateLimitRule] = Field(
        default_factory=dict,
        description="Per endpoint (the operationId in /v2/openapi.json, e.g. 'infer'): a "
        "bucket of its own with its own rule.",
    )
    exempt: list[str] = Field(
        default_factory=lambda: ["server_live", "server_ready"],
        description="Endpoints never limited (health probes).",
    )
    max_clients: int = Field(
        10_000, ge=1, description="Clients tracked at once; the least recent are forgotten."
    )


class HttpSettings(Section):
    """The local Open Inference Protocol HTTP API."""

    #: Its validation errors must not echo the tokens inside it either.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8000, ge=0, le=65535, description="Port to bind (0 picks a free one).")
    server: Literal["granian", "gunicorn"] = Field(
        "granian",
        description="WSGI server: granian (a Rust HTTP stack; the faster, default) or gunicorn "
        "(gthread workers).",
    )
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="Server worker processes. One suits a GPU (one CUDA context, one copy of "
        "each engine) and a small device; on a CPU-only host with cores to spare, more "
        "workers serve more (each holds its own copy of the models).",
    )
    threads: int | None = Field(
        None,
        ge=1,
        le=256,
        description="Threads per worker that run requests. Unset: 1 when every route is "
        "local, no GPU runtime is installed and no language model is served (threads then "
        "only contend for the GIL), else 4 (requests waiting on the cloud, the GPU or a "
        "stream overlap).",
    )
    max_body_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="Largest request body accepted (413 past it)."
    )
    max_tensor_elements: int = Field(
        16 * 1024 * 1024, ge=1, description="Largest element count of one input tensor."
    )
    timeout_s: int = Field(
        60,
        ge=1,
        description="gunicorn: a worker silent this long is restarted (granian restarts "
        "workers that exit; systemd's watchdog covers a hung agent).",
    )
    fast_path: bool = Field(
        True,
        description="Answer inference requests in a plain-WSGI fast path in front of Flask "
        "(same semantics; off: Flask's view answers them).",
    )
    access_log: bool = Field(
        False, description="Log one line per HTTP request (method, path, status, ms, request id)."
    )
    auth: HttpAuthSettings = Field(default_factory=HttpAuthSettings)
    allow_unauthenticated: bool = Field(
        False,
        description="Serve without tokens on a non-loopback address (refused otherwise).",
    )
    tls: HttpTlsSettings = Field(default_factory=HttpTlsSettings)
    rate_limit: RateLimitSettings = Field(default_factory=RateLimitSettings)

    @model_validator(mode="after")
    def _secure_enough(self) -> HttpSettings:
        """Refuse settings that would expose the API unauthenticated or half-configured."""
        exposed = not is_loopback_host(self.host)
        if exposed and not self.auth.configured and not self.allow_unauthenticated:
            raise ValueError(
                f"http.host {self.host!r} is reachable from the network but no API "
                f"tokens are set: set {API_TOKENS_VARIABLE}, http.auth.tokens or "
                "http.auth.tokens_file, or http.allow_unauthenticated = true"
            )
        if (self.tls.cert_file is None) != (self.tls.key_file is None):
            raise ValueError("http.tls needs both cert_file and key_file, or neither")
        for path in (self.tls.cert_file, self.tls.key_file):
            if path is not None and not path.is_file():
                raise ValueError(f"http.tls: {path} does not exist")
        return self

    @property
    def rate_limited(self) -> bool:
        """Whether requests are rate limited (explicitly, or by binding beyond loopback)."""
        enabled = self.rate_limit.enabled
        return (not is_loopback_host(self.host)) if enabled is None else enabled


class GrpcSettings(Section):
    """The local Open Inference Protocol gRPC API (KServe V2), beside HTTP with its tokens.

    Every worker serves ``GRPCInferenceService`` with the same tokens, scopes and rate limits
    as HTTP (docs/api.md, "gRPC").
    """

    port: int = Field(
        8001, ge=0, le=65535, description="Port to bind (Triton's gRPC port; 0 turns gRPC off)."
    )
    host: str | None = Field(None, description="Address to bind (default: http.host).")
    max_concurrent_rpcs: int = Field(
        64, ge=1, description="Calls handled at once per worker; more are refused (UNAVAILABLE)."
    )

    @property
    def enabled(self) -> bool:
        return self.port != 0


ConfidenceMeasure = Literal["max_probability", "margin", "entropy"]


class RouteTensor(Section):
    """A tensor a route declares for a model the edge does not hold (its full shape)."""

    name: str
    datatype: str
    shape: list[int]


class RouteSettings(Section):
    """How one model name is served: on the device, in the cloud, or a mix (docs/routing.md)."""

    mode: RouteModeName = Field("local", description=", ".join(ROUTE_MODES) + ".")
    local_model: str | None = Field(
        None, description="The edge model that answers (default: the route's name)."
    )
    cloud_model: str | None = Field(
        None, description="The cloud model that answers (default: the route's name)."
    )
    cloud_version: str | None = Field(None, description="Cloud model version (default: latest).")
    confidence: ConfidenceMeasure = Field(
        "max_probability", description="Cascade: how the local answer's confidence is measured."
    )
    threshold: float = Field(
        0.9, ge=0.0, le=1.0, description="Cascade: escalate rows whose confidence is below this."
    )
    confidence_output: str | None = Field(
        None, description="Cascade: the probabilities output (default: the first output)."
    )
    max_queue: int = Field(
        8, ge=0, description="local-first: local requests in flight past which the cloud answers."
    )
    timeout_s: float | None = Field(
        None, gt=0, description="Deadline of the cloud part (default: uplink.timeout_s)."
    )
    inputs: list[RouteTensor] | None = Field(
        None, description="cloud: input metadata when the model is not in the local repository."
    )
    outputs: list[RouteTensor] | None = Field(
        None, description="cloud: output metadata when the model is not in the local repository."
    )
    task: Literal["chat", "embedding"] | None = Field(
        None,
        description="Text routes: what a cloud-only route serves on /v1 (chat or embedding); "
        "a route over a local text model has its model's task.",
    )
    max_local_prompt_tokens: int | None = Field(
        None,
        ge=1,
        description="Text routes (size rule): prompts longer than this many tokens go to the "
        "cloud.",
    )
    max_local_new_tokens: int | None = Field(
        None,
        ge=1,
        description="Text routes (size rule): requests for more new tokens than this go to the "
        "cloud.",
    )


class UplinkSettings(Section):
    """The MQTT request/response client to the cloud inference service."""

    enabled: bool | None = Field(
        None, description="Connect to the cloud (default: when a route needs the cloud)."
    )
    timeout_s: float = Field(5.0, gt=0, description="Default deadline of one cloud request.")
    attempt_timeout_s: float = Field(
        1.5, gt=0, description="How long to wait for one reply before sending the request again."
    )
    max_attempts: int = Field(2, ge=1, description="Sends of one request within its deadline.")
    breaker_failures: int = Field(
        5, ge=1, description="Consecutive cloud failures that open the circuit breaker."
    )
    breaker_cooldown_s: float = Field(
        2.0, ge=0, description="How long an open breaker refuses calls before a trial call."
    )
    connect_wait_s: float = Field(
        2.0, ge=0, description="How long start-up waits for the first broker connection."
    )
    max_pending: int = Field(1024, ge=1, description="Cloud requests in flight per process.")


class FleetSettings(Section):
    """The fleet agent: signed rollouts from the cloud, status reports (docs/fleet-agent.md)."""

    enabled: bool = Field(False, description="Run the fleet agent beside the HTTP server.")
    trusted_keys: list[str] = Field(
        default_factory=list,
        description="Base64 ed25519 public keys whose signed manifests and rollout orders "
        "this device accepts.",
    )
    trusted_keys_file: Path | None = Field(
        None, description="A file of more trusted public keys, one per line ('#' comments)."
    )
    labels: dict[str, str] = Field(
        default_factory=dict, description="Labels the cloud selects devices by (site, ring...)."
    )
    hardware: str = Field(
        "cpu", description="What manifests must target: 'cpu' or a GPU arch such as 'sm_87'."
    )
    health_window_s: float | None = Field(
        None, ge=0, description="Health window after a switch (default: the order's)."
    )
    status_interval_s: float = Field(
        30.0, gt=0, description="How often the retained status is refreshed."
    )
    crash_loop_limit: int = Field(
        3, ge=1, description="Restarts with an uncommitted version before it is rolled back."
    )
    min_free_disk_mb: int = Field(
        64, ge=0, description="Free disk to keep beyond an artifact and its unpacked copy."
    )
    max_error_rate: float = Field(
        0.05, ge=0, le=1, description="Health: the new version's highest error rate."
    )
    max_p99_ratio: float = Field(
        3.0, gt=0, description="Health: highest p99 latency relative to the previous version."
    )
    min_shadow_agreement: float = Field(
        0.0, ge=0, le=1, description="Health: lowest top-1 agreement with the cloud teacher."
    )
    min_requests: int = Field(
        1,
        ge=0,
        description="Health: requests the new version must have answered before it is judged "
        "(no evidence is never healthy).",
    )
    min_shadow_samples: int = Field(
        1,
        ge=0,
        description="Health: shadow samples compared with the cloud teacher before the new "
        "version is judged, when the order asks for shadow sampling and the device has an "
        "uplink.",
    )
    min_baseline_samples: int = Field(
        1,
        ge=0,
        description="Health: shadow samples of the version being replaced (the baseline the "
        "new version's agreement is compared with) measured before the switch, when the "
        "order asks for shadow sampling and the device has an uplink; the switch waits up to "
        "evidence_timeout_s for them.",
    )
    evidence_timeout_s: float = Field(
        60.0,
        ge=0,
        description="How long past the health window a version waits for min_requests and "
        "min_shadow_samples before it is rolled back, and an install for min_baseline_samples "
        "before its switch (keep under the rollout's device timeout).",
    )
    download_timeout_s: float = Field(30.0, gt=0, description="Socket timeout of downloads.")

    def public_keys(self) -> list[str]:
        """Every trusted key: the inline ones and those in ``trusted_keys_file``."""
        keys = list(self.trusted_keys)
        if self.trusted_keys_file is not None:
            for line in self.trusted_keys_file.read_text().splitlines():
                line = line.split("#", 1)[0].strip()
                if line:
                    keys.append(line)
        return keys


class AbSettings(Section):
    """An A/B test on the device: a traffic split between versions of one model."""

    split: dict[str, float] = Field(
        description='Version -> weight, e.g. {"1" = 0.9, "2" = 0.1}; applied at start.'
    )


class MqttTlsSettings(Section):
    """TLS to the broker (a ``mqtts://`` URL turns it on with the system's CAs)."""

    ca_file: Path | None = Field(None, description="CA bundle that signed the broker's cert.")
    cert_file: Path | None = Field(
        None, description="This device's client certificate (certificate logins)."
    )
    key_file: Path | None = Field(None, description="The client certificate's private key.")

    @property
    def configured(self) -> bool:
        return any((self.ca_file, self.cert_file, self.key_file))


class EdgeSettings(BaseSettings):
    """Everything the edge agent is configured with."""

    model_config = SettingsConfigDict(
        env_prefix="TETHER_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
        hide_input_in_errors=True,  # errors must not echo secrets (API tokens, MQTT passwords)
    )

    device_id: str = Field(
        default_factory=socket.gethostname, description="This device's id (default: host name)."
    )
    data_dir: Path = Field(Path(".tether"), description="Where the agent keeps its state.")
    mqtt_url: str = Field("mqtt://127.0.0.1:1883", description="The MQTT broker to talk to.")
    mqtt_tls: MqttTlsSettings = Field(default_factory=MqttTlsSettings)
    repository: Path = Field(Path("models/repository"), description="The model repository folder.")
    models: list[str] | None = Field(
        None, description="Models to load at start (default: every model in the repository)."
    )
    http: HttpSettings = Field(default_factory=HttpSettings)
    grpc: GrpcSettings = Field(default_factory=GrpcSettings)
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)
    routes: dict[str, RouteSettings] = Field(
        default_factory=dict, description="Per model name: how it is served (default: local)."
    )
    uplink: UplinkSettings = Field(default_factory=UplinkSettings)
    sensors: SensorSettings = Field(
        default_factory=SensorSettings, description="The MQTT sensor bridge (tether bridge)."
    )
    cloud_price_per_1000: float = Field(
        0.0, ge=0, description="Operator's price of 1,000 cloud requests, for the cost estimate."
    )
    fleet: FleetSettings = Field(default_factory=FleetSettings)
    ab: dict[str, AbSettings] = Field(
        default_factory=dict, description="Per model name: an A/B traffic split between versions."
    )

    @model_validator(mode="after")
    def _grpc_secure_enough(self) -> EdgeSettings:
        """gRPC on its own address follows HTTP's rule: never beyond loopback without tokens."""
        host = self.grpc_host()
        http = self.http
        if (
            self.grpc.enabled
            and not is_loopback_host(host)
            and not http.auth.configured
            and not http.allow_unauthenticated
        ):
            raise ValueError(
                f"grpc.host {host!r} is reachable from the network but no API tokens are "
                f"set: set {API_TOKENS_VARIABLE}, http.auth.tokens or http.auth.tokens_file, "
                "or http.allow_unauthenticated = true"
            )
        return self

    def grpc_host(self) -> str:
        """The address the gRPC API binds (``grpc.host``, else ``http.host``)."""
        return self.grpc.host if self.grpc.host is not None else self.http.host

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [
            init_settings,
            env_settings,
            ApiTokensVariable(settings_cls),
        ]
        toml_file = _TOML_FILE.get("path")
        if toml_file is not None:
            sources.append(ConfigFileSource(settings_cls, toml_file))
        return tuple(sources)

    def mqtt_tls_config(self) -> TlsConfig | None:
        """The TLS options every MQTT connection of the agent uses (``None``: URL decides)."""
        from shared.mqtt import TlsConfig  # paho stays out of processes that never connect

        tls = self.mqtt_tls
        if not tls.configured:
            return None
        return TlsConfig(
            ca_file=str(tls.ca_file) if tls.ca_file else None,
            cert_file=str(tls.cert_file) if tls.cert_file else None,
            key_file=str(tls.key_file) if tls.key_file else None,
        )

    def request_threads(self) -> int:
        """``http.threads``, or its default for this configuration (see the field)."""
        if self.http.threads is not None:
            return self.http.threads
        waits = needs_uplink(self.routes) or gpu_runtime_installed()
        return 4 if waits or self.serves_language_models() else 1

    def serves_language_models(self) -> bool:
        """Whether a start-up model is a language model (a stream holds its request thread
        for the whole generation, so other requests need threads of their own)."""
        from serving.model_config import load_model_config
        from shared.errors import TetherError

        for name in self.startup_models():
            try:
                if load_model_config(self.repository / name).platform == "llama_cpp_gguf":
                    return True
            except TetherError:
                continue
        return False

    def startup_models(self) -> list[str]:
        """The models to load at start: the configured list, or every model on disk except
        those routed to the cloud only (even when their files are here)."""
        from serving.model_config import list_models

        if self.models is not None:
            return list(self.models)
        remote = {name for name, route in self.routes.items() if route.mode == "cloud"}
        return [name for name in list_models(self.repository) if name not in remote]

    def runtime_options(self) -> RuntimeOptions:
        """The runtime layer's options, derived from these settings."""
        return self.runtime.options(self.data_dir)


def needs_uplink(routes: Mapping[str, RouteSettings]) -> bool:
    """True when some route may send a request to the cloud."""
    return any(needs_cloud(route.mode) for route in routes.values())


def gpu_runtime_installed() -> bool:
    """Whether the native TensorRT runtime or ONNX Runtime's GPU build is installed (checked
    without importing either, so the server's main process stays light)."""
    import importlib.metadata

    if tensorrt_available():
        return True
    try:
        importlib.metadata.distribution("onnxruntime-gpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


class ApiTokensVariable(PydanticBaseSettingsSource):
    """``TETHER_API_TOKENS``: bearer token entries for the local API, separated by commas
    (each ``TOKEN`` or ``TOKEN SCOPE...``, as in ``http.auth.tokens``).

    It ranks below ``TETHER_HTTP__AUTH__TOKENS`` (a JSON list) and above the file.
    """

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        value = os.environ.get(API_TOKENS_VARIABLE, "")
        tokens = [part.strip() for part in value.split(",") if part.strip()]
        return {"http": {"auth": {"tokens": tokens}}} if tokens else {}


# The TOML file for the settings being built; set only inside load_toml_settings.
_TOML_FILE: dict[str, Path] = {}


def load_settings(config_file: Path | None = None, **overrides: Any) -> EdgeSettings:
    """Build the settings from ``config_file`` (TOML), ``TETHER_*`` variables and overrides."""
    return load_toml_settings(EdgeSettings, _TOML_FILE, config_file, overrides)
