"""Settings of the fleet side (registry, artifact server, rollout controller): one typed object.

Precedence, highest first: command-line flags, ``TETHER_FLEET_*`` environment variables
(``TETHER_MQTT_URL`` for the broker, shared with the edge and the cloud workers), defaults.
Nothing else in the fleet code reads the environment.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

MQTT_URL_VARIABLE = "TETHER_MQTT_URL"


class DeviceGroup(BaseModel):
    """A named, dynamic group of devices: those whose labels and hardware match when a
    rollout to the group starts (not a list of devices fixed in advance)."""

    model_config = ConfigDict(extra="forbid")

    labels: dict[str, str] = Field(default_factory=dict, description="Labels all must have.")
    hardware: str | None = Field(None, description="The hardware the device reports.")


class FleetSettings(BaseSettings):
    """Where fleet state, artifacts and keys live, and how the fleet service listens."""

    model_config = SettingsConfigDict(env_prefix="TETHER_FLEET_", extra="forbid")

    mqtt_url: str = Field("mqtt://127.0.0.1:1883", description="The MQTT broker.")
    data_dir: Path = Field(Path(".tether-cloud"), description="Fleet database, artifacts, keys.")
    database_url: str | None = Field(
        None,
        description="sqlite:///path or postgresql://user@host/db (default: SQLite in data_dir).",
    )
    table_prefix: str = Field("fleet_", description="Prefix of the fleet tables.")
    artifact_dir: Path | None = Field(None, description="Artifact store (default data_dir).")
    signing_key: Path | None = Field(
        None,
        description="The fleet's ed25519 PEM key (`tether fleet keygen`): signs manifests "
        "(`fleet publish`, overridden by --key) and rollout orders (the controller). No "
        "default: only `tether up` points it at its development key.",
    )
    http_host: str = Field("127.0.0.1", description="Address of the artifact server.")
    http_port: int = Field(8090, ge=0, le=65535, description="Port of the artifact server.")
    http_workers: int = Field(
        2, ge=1, le=64, description="Worker processes of the artifact server (granian)."
    )
    http_threads: int = Field(
        16,
        ge=1,
        le=256,
        description="Threads per artifact server worker: each serves one download at a time.",
    )
    artifact_url: str | None = Field(
        None, description="Base URL devices download from (default http://host:port)."
    )
    tick_s: float = Field(0.5, gt=0, description="How often the rollout controller acts.")
    lease_ttl_s: float = Field(
        10.0,
        gt=0,
        description="Rollout lease lifetime: with several controllers on one database, how "
        "long a dead leader can hold rollouts up before another takes over.",
    )
    order_ttl_s: float = Field(
        7 * 86400.0,
        gt=0,
        description="How long a signed rollout order stays valid; a device refuses it after.",
    )
    groups: dict[str, DeviceGroup] = Field(
        default_factory=dict,
        description='Named device groups for `rollout start --group`, as JSON: {"eu-gpu": '
        '{"labels": {"region": "eu"}, "hardware": "cuda"}}.',
    )
    heartbeat_file: Path | None = Field(
        None,
        description="File the rollout controller touches every tick, for health checks "
        "(default data_dir/run/controller.heartbeat).",
    )

    @property
    def database(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'fleet.db'}"

    @property
    def artifacts(self) -> Path:
        return self.artifact_dir or self.data_dir / "artifacts"

    @property
    def dev_key_path(self) -> Path:
        """Where `tether up` keeps its development signing key (never trust it on a fleet)."""
        return self.data_dir / "keys" / "dev-signing.pem"

    @property
    def heartbeat(self) -> Path:
        return self.heartbeat_file or self.data_dir / "run" / "controller.heartbeat"

    @property
    def public_artifact_url(self) -> str:
        return self.artifact_url or f"http://{self.http_host}:{self.http_port}"


def load_fleet_settings(**overrides: Any) -> FleetSettings:
    """Settings from the environment and ``overrides`` (``None`` values fall through)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    if "mqtt_url" not in given and "TETHER_FLEET_MQTT_URL" not in os.environ:
        shared = os.environ.get(MQTT_URL_VARIABLE)
        if shared:
            given["mqtt_url"] = shared
    return FleetSettings(**given)
