"""The cloud worker's settings: one typed object, from a TOML file and environment variables.

Precedence, highest first: values passed in code (command-line flags), environment
variables, the TOML file, the defaults. The broker URL is ``TETHER_MQTT_URL`` (the same
variable the edge reads; ``TETHER_CLOUD_MQTT_URL`` overrides it for the cloud alone);
everything else is ``TETHER_CLOUD_*``, with ``__`` for nested
fields (``TETHER_CLOUD_BATCHING__MAX_BATCH_SIZE=16``). Nothing else in the worker reads
the environment; this object is passed in.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from serving.runtime_options import RuntimeOptions
from serving.settings import RuntimeSettings, Section, load_toml_settings
from serving.settings_toml import ConfigFileSource
from shared.client_ids import client_id
from shared.errors import InvalidInput
from shared.topics import CLOUD_SHARE_GROUP, check_segment

DEFAULT_MODELS = ["digits-teacher", "digits-student"]
MQTT_URL_VARIABLE = "TETHER_MQTT_URL"


def default_worker_id() -> str:
    """``tether-<host>-<pid>``: unique per process, readable in logs and broker client lists
    (it is the MQTT client id, which starts with ``tether-``: shared/client_ids.py)."""
    return client_id(socket.gethostname(), str(os.getpid()))


class BatchPolicy(Section):
    """Triton's dynamic batcher for one model: off when ``max_batch_size`` is 0."""

    max_batch_size: int = Field(
        0, ge=0, le=4096, description="Most rows run together; 0 turns batching off."
    )
    max_queue_delay_ms: float = Field(
        0.0, ge=0, le=10_000, description="How long a request may wait for others to join it."
    )


class BatchingSettings(BatchPolicy):
    """The default batch policy, and per-model overrides under ``models.<name>``."""

    models: dict[str, BatchPolicy] = Field(
        default_factory=dict, description="Per-model policies that replace the default."
    )

    def for_model(self, name: str) -> BatchPolicy:
        """The policy that applies to ``name``."""
        return self.models.get(name) or BatchPolicy(
            max_batch_size=self.max_batch_size, max_queue_delay_ms=self.max_queue_delay_ms
        )


class AdmissionSettings(Section):
    """Per-device bounds on a worker's requests in flight, queued or running (429 past them).

    One device then cannot take the queue and threads that every device shares.
    """

    max_requests_per_device: int = Field(
        32, ge=1, description="Requests one device may have in flight on one worker."
    )
    max_bytes_per_device: int = Field(
        64 * 1024 * 1024,
        ge=1,
        description="Payload bytes one device may have in flight on one worker (a single "
        "request larger than this is still taken when the device has nothing in flight).",
    )


class CloudSettings(BaseSettings):
    """Everything a cloud inference worker is configured with."""

    model_config = SettingsConfigDict(
        env_prefix="TETHER_CLOUD_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    mqtt_url: str = Field(
        "mqtt://127.0.0.1:1883",
        description="The MQTT broker (env TETHER_MQTT_URL, shared with the edge).",
    )
    worker_id: str = Field(
        default_factory=default_worker_id,
        description="This worker's MQTT client id and name in replies (default "
        "tether-host-pid; on the shipped broker it must start with tether-).",
    )
    repository: Path = Field(Path("models/repository"), description="The model repository.")
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_MODELS),
        description="Models to load and serve (a JSON list or comma-separated in the env).",
    )
    text_repository: Path | None = Field(
        None,
        description="Where the text models are (default: the model repository); "
        "`tether models build` puts them in models/text-repository.",
    )
    text_models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Language and embedding models to load and serve to /v1 cloud routes "
        "(docs/openai.md; a JSON list or comma-separated in the env).",
    )
    text_threads: int = Field(
        4,
        ge=1,
        le=256,
        description="Text requests served at once (each generation also needs a llama.cpp "
        "context of its model: parameters.slots).",
    )
    text_queue_limit: int = Field(
        32, ge=1, description="Text requests waiting for a thread before answering 503."
    )
    share_group: str = Field(
        CLOUD_SHARE_GROUP, description="The shared-subscription group all workers join."
    )
    batching: BatchingSettings = Field(default_factory=BatchingSettings)
    worker_threads: int = Field(2, ge=1, le=256, description="Threads that run batches.")
    inline_max_compute_ms: float = Field(
        1.0,
        ge=0,
        description=(
            "A request for a model whose recent batch-1 compute is under this many ms runs at "
            "once on the MQTT network thread when the worker threads are idle, nothing is "
            "queued and the model is not batched (no hand-off between threads: the lowest "
            "latency at low load); 0 turns it off. Under load requests queue for the worker "
            "threads."
        ),
    )
    queue_limit: int = Field(
        256, ge=1, description="Requests waiting over all models before answering 503."
    )
    max_tensor_elements: int = Field(
        16 * 1024 * 1024, ge=1, description="Largest element count of one input tensor."
    )
    admission: AdmissionSettings = Field(default_factory=AdmissionSettings)
    metrics_host: str = Field("127.0.0.1", description="Address of the Prometheus endpoint.")
    metrics_port: int = Field(
        9100, ge=0, le=65535, description="Port of the Prometheus endpoint; 0 turns it off."
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, description="On SIGTERM, how long queued and running work may take."
    )
    dedupe_ttl_s: float = Field(
        120.0, ge=0, description="How long a request id is remembered after its answer."
    )
    dedupe_max_entries: int = Field(
        100_000, ge=1, description="Most request ids remembered for deduplication."
    )
    connect_timeout_s: float = Field(10.0, gt=0, description="How long start() waits for MQTT.")
    log_requests: bool = Field(
        True, description="Log one line per served request, with the edge's request id."
    )
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)
    data_dir: Path = Field(Path(".tether-cloud"), description="Engine caches and other state.")

    @field_validator("models", "text_models", mode="before")
    @classmethod
    def _split_models(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("worker_id", "share_group")
    @classmethod
    def _topic_safe(cls, value: str) -> str:
        try:
            return check_segment(value, "worker id or share group")
        except InvalidInput as exc:
            raise ValueError(exc.message) from None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources = [init_settings, env_settings, SharedBrokerUrl(settings_cls)]
        toml_file = _TOML_FILE.get("path")
        if toml_file is not None:
            sources.append(ConfigFileSource(settings_cls, toml_file))
        return tuple(sources)

    def runtime_options(self) -> RuntimeOptions:
        """The runtime layer's options (the same layer the edge uses)."""
        return self.runtime.options(self.data_dir)


class SharedBrokerUrl(PydanticBaseSettingsSource):
    """``TETHER_MQTT_URL``: the broker variable the edge and the cloud share.

    It ranks below ``TETHER_CLOUD_MQTT_URL`` (a cloud-only override) and above the file.
    """

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        value = os.environ.get(MQTT_URL_VARIABLE)
        return {"mqtt_url": value} if value else {}


# The TOML file for the settings being built; set only inside load_cloud_settings.
_TOML_FILE: dict[str, Path] = {}


def load_cloud_settings(config_file: Path | None = None, **overrides: Any) -> CloudSettings:
    """Build the settings from ``config_file`` (TOML), the environment and ``overrides``
    (``None`` values fall through to the environment and the file)."""
    return load_toml_settings(CloudSettings, _TOML_FILE, config_file, overrides)
