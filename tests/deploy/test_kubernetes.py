"""deploy/k8s: every manifest against the Kubernetes OpenAPI schemas, plus cross-references.

kubernetes-validate ships the schemas of each Kubernetes release, so this runs offline.
Custom resources have no schema there: ServiceMonitor (Prometheus Operator) is skipped
by name, and the Kustomization files are checked by hand (their resources exist, every
manifest is listed).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from cloud.metrics import CloudMetrics
from shared.topics import CLOUD_SHARE_GROUP, cloud_request_filter
from tests.deploy.env_names import ROOT, SETTINGS_BY_COMMAND, check_environment

K8S = ROOT / "deploy" / "k8s"
#: The oldest release we support (HPA autoscaling/v2, PodDisruptionBudget policy/v1 and
#: pod security labels are older) and the newest the validator knows.
VERSIONS = ["1.30.0", kubernetes_validate.latest_version() + ".0"]
#: Custom resources: no schema in kubernetes-validate; not applied by kustomization.yaml.
CRD_KINDS = {"ServiceMonitor"}
NOT_IN_KUSTOMIZATION = {"servicemonitor.yaml"}
#: Secrets the operator creates (docs/deploy-kubernetes.md says how); never committed.
EXTERNAL_SECRETS = {
    "tether-mqtt", "tether-broker-ca", "tether-postgres", "tether-fleet-signing-key",
    "emqx-tls", "emqx-users", "emqx-cookie", "emqx-dashboard",
}  # fmt: skip
#: Which settings object each container's process reads.
CONTAINER_SETTINGS = {"cloud-worker": "cloud", "controller": "fleet", "artifacts": "fleet"}
#: The Secret with the fleet's private signing key.
SIGNING_KEY_SECRET = "tether-fleet-signing-key"

Doc = dict[str, Any]


def documents() -> list[tuple[Path, Doc]]:
    found = []
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found.append((path, doc))
    return found


DOCS = documents()
RESOURCES = [(p, d) for p, d in DOCS if d["kind"] != "Kustomization"]


def ident(item: tuple[Path, Doc]) -> str:
    path, doc = item
    return f"{path.relative_to(K8S)}:{doc['kind']}/{doc['metadata']['name']}"


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("item", RESOURCES, ids=[ident(i) for i in RESOURCES])
def test_manifest_is_valid(item: tuple[Path, Doc], version: str) -> None:
    _, doc = item
    if doc["kind"] in CRD_KINDS:
        pytest.skip(f"{doc['kind']} is a custom resource: no schema to validate against")
    kubernetes_validate.validate(doc, version, strict=True)


def test_validator_catches_mistakes() -> None:
    doc = copy.deepcopy(next(d for _, d in RESOURCES if d["kind"] == "Deployment"))
    container = doc["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbe"]["httpGet"]["paht"] = "/oops"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, VERSIONS[0], strict=True)


def test_kustomizations_list_every_manifest() -> None:
    listed: set[Path] = set()
    for path, doc in DOCS:
        if doc["kind"] != "Kustomization":
            continue
        for entry in doc["resources"]:
            target = path.parent / entry
            assert target.exists(), f"{path}: {entry} does not exist"
            if target.is_dir():
                assert (target / "kustomization.yaml").is_file()
                listed.add(target / "kustomization.yaml")
            listed.add(target)
    manifests = {p for p, _ in DOCS if p.name != "kustomization.yaml"}
    missing = {p for p in manifests - listed if p.name not in NOT_IN_KUSTOMIZATION}
    assert not missing, f"not in any kustomization.yaml: {sorted(map(str, missing))}"
    for path in manifests:
        if path.name in NOT_IN_KUSTOMIZATION:
            assert {d["kind"] for p, d in DOCS if p == path} <= CRD_KINDS


def by_kind(kind: str) -> dict[str, Doc]:
    return {d["metadata"]["name"]: d for _, d in RESOURCES if d["kind"] == kind}


def pod_templates() -> dict[str, Doc]:
    return {
        name: doc["spec"]["template"]
        for kind in ("Deployment", "StatefulSet")
        for name, doc in by_kind(kind).items()
    }


def test_selectors_match_pods() -> None:
    templates = pod_templates()
    for kind in ("Deployment", "StatefulSet"):
        for name, doc in by_kind(kind).items():
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
    for name, service in by_kind("Service").items():
        selector = service["spec"]["selector"].items()
        assert any(selector <= t["metadata"]["labels"].items() for t in templates.values()), name
    for name, pdb in by_kind("PodDisruptionBudget").items():
        selector = pdb["spec"]["selector"]["matchLabels"].items()
        assert any(selector <= t["metadata"]["labels"].items() for t in templates.values()), name
    for name, doc in by_kind("StatefulSet").items():
        assert doc["spec"]["serviceName"] in by_kind("Service"), name


def test_volumes_and_secrets_resolve() -> None:
    claims = set(by_kind("PersistentVolumeClaim"))
    config_maps = by_kind("ConfigMap")
    docs = (ROOT / "docs" / "deploy-kubernetes.md").read_text()
    for name, template in pod_templates().items():
        spec = template["spec"]
        claim_templates = {
            t["metadata"]["name"]
            for d in by_kind("StatefulSet").values()
            if d["spec"]["template"] is template
            for t in d["spec"].get("volumeClaimTemplates", [])
        }
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in spec["containers"]:
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes or mount["name"] in claim_templates, (
                    f"{name}: mount {mount['name']} has no volume"
                )
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] in EXTERNAL_SECRETS, f"{name}: secret {ref['name']}"
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, name
            if "configMap" in volume:
                config_map = config_maps[volume["configMap"]["name"]]
                for item in volume["configMap"].get("items", []):
                    assert item["key"] in config_map["data"], name
            if "secret" in volume:
                assert volume["secret"]["secretName"] in EXTERNAL_SECRETS, name
    for secret in EXTERNAL_SECRETS:
        assert secret in docs, f"docs/deploy-kubernetes.md does not say how to create {secret}"


def containers(name: str) -> dict[str, Doc]:
    return {c["name"]: c for c in pod_templates()[name]["spec"]["containers"]}


def env_map(container: Doc) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def test_cloud_workers_have_gpus_probes_and_drain_time() -> None:
    worker = by_kind("Deployment")["tether-cloud-worker"]
    spec = worker["spec"]["template"]["spec"]
    container = containers("tether-cloud-worker")["cloud-worker"]
    resources = container["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = env_map(container)
    assert int(str(env["TETHER_CLOUD_METRICS_PORT"])) == ports["metrics"]
    assert env["TETHER_CLOUD_METRICS_HOST"] == "0.0.0.0"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] in ports, probe
    assert spec["terminationGracePeriodSeconds"] > float(str(env["TETHER_CLOUD_DRAIN_TIMEOUT_S"]))
    assert worker["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert spec["securityContext"]["runAsNonRoot"] is True


def test_hpa_scales_the_workers_on_a_real_metric() -> None:
    (hpa,) = by_kind("HorizontalPodAutoscaler").values()
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert target["kind"] == "Deployment" and target["name"] in by_kind("Deployment")
    exported = {family.name for family in CloudMetrics().registry.collect()}
    pods_metrics = [
        m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"
    ]
    assert pods_metrics and set(pods_metrics) <= exported


def test_fleet_service_is_a_single_controller() -> None:
    fleet = by_kind("Deployment")["tether-fleet"]
    assert fleet["spec"]["replicas"] == 1 and fleet["spec"]["strategy"]["type"] == "Recreate"
    controller = containers("tether-fleet")["controller"]
    assert controller["args"] == ["fleet", "controller"]
    assert "ports" not in controller, "the key-holding controller listens on no port"
    assert controller["livenessProbe"]["exec"]["command"][-1] == "--check-alive"
    artifacts = containers("tether-fleet")["artifacts"]
    assert artifacts["args"] == ["fleet", "artifacts"]  # granian, not `fleet serve`
    port = {p["name"]: p["containerPort"] for p in artifacts["ports"]}["artifacts"]
    assert int(str(env_map(artifacts)["TETHER_FLEET_HTTP_PORT"])) == port
    assert artifacts["readinessProbe"]["httpGet"]["path"] == "/healthz"
    (service,) = [
        s for s in by_kind("Service").values() if s["metadata"]["name"] == "tether-artifacts"
    ]
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["artifacts"]


def test_only_the_controller_gets_the_signing_key() -> None:
    """The container that serves devices over HTTP never sees the private key: no mount of
    its Secret, no variable naming it, the artifact store mounted read-only."""
    spec = pod_templates()["tether-fleet"]["spec"]
    key_volumes = {
        v["name"]
        for v in spec["volumes"]
        if v.get("secret", {}).get("secretName") == SIGNING_KEY_SECRET
    }
    assert key_volumes
    for name, container in containers("tether-fleet").items():
        mounts = {m["name"] for m in container.get("volumeMounts", [])}
        holds_key = bool(mounts & key_volumes) or "TETHER_FLEET_SIGNING_KEY" in env_map(container)
        assert holds_key == (name == "controller"), name
    artifacts = containers("tether-fleet")["artifacts"]
    assert all(m.get("readOnly") for m in artifacts["volumeMounts"] if m["mountPath"] != "/tmp")
    # no other workload anywhere mounts the key either
    for workload, template in pod_templates().items():
        if workload != "tether-fleet":
            secrets = {
                v.get("secret", {}).get("secretName") for v in template["spec"].get("volumes", [])
            }
            assert SIGNING_KEY_SECRET not in secrets, workload


def test_emqx_dashboard_is_not_exposed_and_has_no_default_password() -> None:
    for name, service in by_kind("Service").items():
        ports = [p.get("targetPort") for p in service["spec"]["ports"]] + [
            p["port"] for p in service["spec"]["ports"]
        ]
        assert "dashboard" not in ports and 18083 not in ports, name
    (emqx,) = [c for c in containers("emqx").values() if c["name"] == "emqx"]
    env = {e["name"]: e for e in emqx["env"]}
    password = env["EMQX_DASHBOARD__DEFAULT_PASSWORD"]
    assert "value" not in password
    assert password["valueFrom"]["secretKeyRef"]["name"] == "emqx-dashboard"
    assert "public" not in str(pod_templates()["emqx"])


@pytest.mark.parametrize(
    "workload,container",
    [
        ("tether-cloud-worker", "cloud-worker"),
        ("tether-fleet", "controller"),
        ("tether-fleet", "artifacts"),
    ],
)
def test_environment_is_known_to_the_settings(
    workload: str, container: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = containers(workload)[container]
    assert spec["args"][0] == CONTAINER_SETTINGS[container].split()[0]
    settings = SETTINGS_BY_COMMAND[CONTAINER_SETTINGS[container]]
    check_environment(settings, env_map(spec), monkeypatch, f"k8s {workload}/{container}")


def test_emqx_cluster_shares_the_cloud_subscription() -> None:
    config = by_kind("ConfigMap")["emqx-config"]["data"]
    assert "shared_subscription_strategy" in config["emqx.conf"]
    assert "discovery_strategy = dns" in config["emqx.conf"]
    assert "listeners.tcp.default { enable = false }" in config["emqx.conf"]
    assert cloud_request_filter() in config["acl.conf"]
    assert f"$share/{CLOUD_SHARE_GROUP}/" in config["acl.conf"]
    assert config["acl.conf"].rstrip().endswith("{deny, all}.")
    emqx = by_kind("StatefulSet")["emqx"]
    assert emqx["spec"]["replicas"] >= 3
    acl = (ROOT / "deploy" / "mosquitto" / "acl").read_text()
    for user in ("cloud-worker", "fleet-controller"):
        assert f"user {user}\n" in acl and f'{{username, "{user}"}}' in config["acl.conf"]
