"""deploy/compose.yaml against the Compose specification, plus what a schema cannot see.

No Docker engine runs here or in CI, so `docker compose config` is not available: the
file is validated against the Compose specification's JSON Schema (the copy that
check-jsonschema ships), and the references are followed by hand.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.deploy.env_names import ROOT, SETTINGS_BY_COMMAND, check_environment
from tests.deploy.test_dockerfiles import IMAGES, PINNED

DEPLOY = ROOT / "deploy"
FILES = ["compose.yaml", "compose.gpu.yaml"]
#: Files the operator creates before the first start (never committed): compose.yaml's
#: header and docs/operations.md say how.
OPERATOR_FILES = ("secrets/",)


def load(name: str) -> dict[str, Any]:
    data = yaml.safe_load((DEPLOY / name).read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load("compose.yaml")


@pytest.mark.parametrize("name", FILES)
def test_matches_the_compose_specification(name: str) -> None:
    schema_file = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    errors = sorted(validator_cls(schema).iter_errors(load(name)), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_schema_catches_mistakes(compose: dict[str, Any]) -> None:
    """The validator is live: a misspelt key fails."""
    schema_file = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    broken = json.loads(json.dumps(compose))
    broken["services"]["cloud"]["healthchek"] = broken["services"]["cloud"].pop("healthcheck")
    assert list(jsonschema.validators.validator_for(schema)(schema).iter_errors(broken))


def test_the_stack_has_its_services(compose: dict[str, Any]) -> None:
    assert {"mosquitto", "postgres", "cloud", "edge", "fleet", "artifacts"} <= set(
        compose["services"]
    )


def test_only_the_controller_gets_the_signing_key(compose: dict[str, Any]) -> None:
    """The artifact server devices download from runs on granian (`fleet artifacts`, never
    `fleet serve`), gets no signing key and no broker credentials, and only reads the
    artifact store; the controller, which signs orders, has the key and no port."""
    services = compose["services"]
    holders = {
        name
        for name, service in services.items()
        if "fleet-signing-key" in service.get("secrets", [])
        or "TETHER_FLEET_SIGNING_KEY" in service.get("environment", {})
    }
    assert holders == {"fleet"}
    fleet, artifacts = services["fleet"], services["artifacts"]
    assert fleet["command"] == ["fleet", "controller"] and "ports" not in fleet
    assert "--check-alive" in fleet["healthcheck"]["test"]
    assert artifacts["command"] == ["fleet", "artifacts"]
    assert "TETHER_MQTT_URL" not in artifacts["environment"]
    assert all(v.get("read_only") for v in artifacts["volumes"] if isinstance(v, dict))
    assert not any(
        s.get("command", [None, None])[:2] == ["fleet", "serve"] for s in services.values()
    )
    port = artifacts["environment"]["TETHER_FLEET_HTTP_PORT"]
    assert artifacts["ports"] == [f"{port}:{port}"]
    assert fleet["environment"]["TETHER_FLEET_ARTIFACT_URL"] == f"http://artifacts:{port}"


def test_images_are_pinned_and_builds_exist(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        assert "image" in service or "build" in service, name
        if "image" in service:
            match = PINNED.match(service["image"])
            assert match and match.group("tag") not in (None, "latest"), (name, service["image"])
        if "build" in service:
            build = service["build"]
            context = (DEPLOY / build["context"]).resolve()
            assert context == ROOT, f"{name}: build from the repository root"
            assert Path(build["dockerfile"]).name in IMAGES
            assert (context / build["dockerfile"]).is_file()


def test_every_service_has_a_healthcheck(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    assert "/v2/health/ready" in " ".join(compose["services"]["edge"]["healthcheck"]["test"])


def test_cloud_workers_scale(compose: dict[str, Any]) -> None:
    """`--scale cloud=N`: no fixed name, no host port, a grace period longer than the drain."""
    cloud = compose["services"]["cloud"]
    assert "container_name" not in cloud and "ports" not in cloud
    drain = float(cloud["environment"]["TETHER_CLOUD_DRAIN_TIMEOUT_S"])
    assert float(cloud["stop_grace_period"].rstrip("s")) > drain


def test_references_resolve(compose: dict[str, Any]) -> None:
    services = compose["services"]
    named_volumes = set(compose.get("volumes", {}))
    secrets = set(compose.get("secrets", {}))
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        for secret in service.get("secrets", []):
            assert secret in secrets, f"{name}: unknown secret {secret}"
        for volume in service.get("volumes", []):
            if isinstance(volume, str):
                source = volume.split(":")[0]
                assert source in named_volumes, f"{name}: unknown volume {source}"
                continue
            if volume["type"] != "bind":
                continue
            source = volume["source"]
            relative = (DEPLOY / source).resolve().relative_to(DEPLOY.resolve().parent)
            if str(relative).startswith(tuple(f"deploy/{p}" for p in OPERATOR_FILES)):
                continue
            assert (DEPLOY / source).exists(), f"{name}: bind source {source} is missing"
    for secret in compose["secrets"].values():
        assert secret["file"].startswith(tuple(f"./{p}" for p in OPERATOR_FILES))


def test_broker_runs_the_security_config(compose: dict[str, Any]) -> None:
    """The broker runs deploy/mosquitto/secure.conf as committed; clients use its TLS port."""
    mosquitto = compose["services"]["mosquitto"]
    config = mosquitto["command"][-1]
    mounted = {v["target"]: v["source"] for v in mosquitto["volumes"] if isinstance(v, dict)}
    assert mounted[config] == "./mosquitto/secure.conf"
    text = (DEPLOY / "mosquitto" / "secure.conf").read_text()
    for target, source in mounted.items():
        if source.startswith("./mosquitto/"):
            assert target.rsplit("/", 1)[0] in text or target == config
    for name in ("cloud", "edge", "fleet"):
        url = compose["services"][name]["environment"]["TETHER_MQTT_URL"]
        assert url.startswith("mqtts://") and url.endswith("@mosquitto:8883"), name
    acl = (DEPLOY / "mosquitto" / "acl").read_text()
    for name, user in (("cloud", "cloud-worker"), ("fleet", "fleet-controller")):
        assert f"user {user}\n" in acl
        assert f"mqtts://{user}:" in compose["services"][name]["environment"]["TETHER_MQTT_URL"]


@pytest.mark.parametrize("service", ["cloud", "edge", "fleet", "artifacts"])
def test_environment_is_known_to_the_settings(
    compose: dict[str, Any], service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = compose["services"][service]
    command = spec["command"][0]
    check_environment(
        SETTINGS_BY_COMMAND[command], spec["environment"], monkeypatch, f"compose {service}"
    )
