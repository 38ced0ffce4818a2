"""Publishing: deterministic artifacts, signed manifests, the artifact server's Range support,
and the ``tether fleet`` commands that drive them."""

from __future__ import annotations

import hashlib
import io
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from cloud.artifacts import ArtifactServer, ArtifactStore, pack_version
from cloud.fleet_db import FleetDB
from cloud.registry import Registry
from harness.fleet import make_version
from shared.errors import InvalidInput, SignatureError
from shared.fleet import DeviceStatus
from shared.manifest import (
    generate_key,
    key_id,
    load_public_key,
    public_key_text,
    save_private_key,
    verify_manifest,
)
from tether.cli import cli

#: The environment without a configured signing key (click's runner unsets None values).
NO_KEY: dict[str, str | None] = {"TETHER_FLEET_SIGNING_KEY": None}


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "artifacts")


@pytest.fixture
def server(store: ArtifactStore) -> Iterator[ArtifactServer]:
    server = ArtifactServer(store).start()
    yield server
    server.stop()


@pytest.fixture
def db(tmp_path: Path) -> Iterator[FleetDB]:
    db = FleetDB(f"sqlite:///{tmp_path}/fleet.db")
    yield db
    db.close()


def fetch(url: str, method: str = "GET", **headers: str) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_packing_is_deterministic_and_lists_every_file(tmp_path: Path) -> None:
    folder = make_version(tmp_path / "repo", "digits", 4)
    (folder / "extra").mkdir()
    (folder / "extra" / "labels.txt").write_text("0\n1\n")
    first, files = pack_version(folder)
    time.sleep(0.01)
    (folder / "model.onnx").touch()  # a newer mtime must not change the bytes
    second, _ = pack_version(folder)
    assert first == second
    assert sorted(files) == ["4/extra/labels.txt", "4/model.onnx", "config.json"]
    with tarfile.open(fileobj=io.BytesIO(first)) as tar:
        data = tar.extractfile("4/model.onnx")
        assert data is not None
        assert hashlib.sha256(data.read()).hexdigest() == files["4/model.onnx"]


def test_publish_stores_the_artifact_and_a_verifiable_manifest(
    tmp_path: Path, db: FleetDB, store: ArtifactStore, server: ArtifactServer
) -> None:
    key = generate_key()
    registry = Registry(db, store, server.url)
    signed = registry.publish(make_version(tmp_path / "repo", "digits", 1), key)
    m = signed.manifest
    assert (m.model, m.version, m.target_hardware) == ("digits", 1, "cpu")
    assert store.has(m.sha256) and store.path_of(m.sha256).stat().st_size == m.size
    assert m.url == f"{server.url}/artifacts/{m.sha256}"
    stored = db.get_manifest("digits", 1)
    assert stored is not None and stored.dump() == signed.dump()
    assert verify_manifest(signed, [key.public_key()], now=time.time(), last_trusted_version=None)
    status, _, body = fetch(m.url)
    assert status == 200 and hashlib.sha256(body).hexdigest() == m.sha256
    # The same folder again is the same publication.
    assert registry.publish(tmp_path / "repo" / "digits" / "1", key).manifest.sha256 == m.sha256


def test_versions_are_monotonic_and_immutable(
    tmp_path: Path, db: FleetDB, store: ArtifactStore
) -> None:
    key = generate_key()
    registry = Registry(db, store, "http://artifacts")
    repo = tmp_path / "repo"
    registry.publish(make_version(repo, "digits", 2), key)
    with pytest.raises(InvalidInput, match="older than the published version 2"):
        registry.publish(make_version(repo, "digits", 1), key)
    make_version(repo, "digits", 2)  # new random content under the same version
    with pytest.raises(InvalidInput, match="already published with another artifact"):
        registry.publish(repo / "digits" / "2", key)
    with pytest.raises(InvalidInput, match="version number"):
        registry.publish(repo / "digits", key)


def test_range_requests_resume_downloads(store: ArtifactStore, server: ArtifactServer) -> None:
    data = bytes(range(256)) * 400
    sha = store.put_bytes(data)
    url = f"{server.url}/artifacts/{sha}"

    status, headers, body = fetch(url, Range="bytes=0-999")
    assert status == 206 and body == data[:1000]
    assert headers["Content-Range"] == f"bytes 0-999/{len(data)}"
    assert headers["ETag"].strip('"') == sha
    status, headers, rest = fetch(url, Range="bytes=1000-")
    assert status == 206 and body + rest == data
    assert headers["Content-Range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"

    status, headers, _ = fetch(url, Range=f"bytes={len(data)}-")
    assert status == 416
    assert headers["Content-Range"] == f"bytes */{len(data)}"

    status, headers, body = fetch(url, method="HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) == len(data)
    assert headers["Accept-Ranges"] == "bytes"
    status, _, _ = fetch(url, **{"If-None-Match": f'"{sha}"'})
    assert status == 304


def test_unknown_or_malformed_artifacts_are_404(server: ArtifactServer) -> None:
    assert fetch(f"{server.url}/artifacts/{'0' * 64}")[0] == 404
    assert fetch(f"{server.url}/artifacts/../../etc/passwd")[0] == 404
    assert fetch(f"{server.url}/artifacts/xyz")[0] == 404


def test_cli_keygen_publish_and_rollout_commands(tmp_path: Path) -> None:
    runner = CliRunner()
    data = tmp_path / "data"
    base = ["fleet", "--data-dir", str(data)]
    result = runner.invoke(cli, [*base, "keygen", str(tmp_path / "k.pem")])
    assert result.exit_code == 0, result.output
    public = result.output.strip().splitlines()[-1]
    load_public_key(public)
    assert runner.invoke(cli, [*base, "keygen", str(tmp_path / "k.pem")]).exit_code != 0

    folder = make_version(tmp_path / "repo", "digits", 1)
    # No key configured: a loud refusal, and no development key made behind the user's back.
    result = runner.invoke(cli, [*base, "publish", str(folder)], env=NO_KEY)
    assert result.exit_code != 0 and "no fleet signing key" in result.output
    assert not (data / "keys").exists()

    # The setting is the source of truth...
    other = tmp_path / "other.pem"
    assert runner.invoke(cli, [*base, "keygen", str(other)]).exit_code == 0
    env = {"TETHER_FLEET_SIGNING_KEY": str(tmp_path / "k.pem")}
    result = runner.invoke(cli, [*base, "publish", str(folder), "--expires", "2h"], env=env)
    assert result.exit_code == 0, result.output
    assert "published digits version 1" in result.output
    db = FleetDB(f"sqlite:///{data}/fleet.db")
    signed = db.get_manifest("digits", 1)
    assert signed is not None and signed.key_id == key_id(load_public_key(public))

    # ... and --key overrides it.
    folder = make_version(tmp_path / "repo", "digits", 2)
    result = runner.invoke(cli, [*base, "publish", str(folder), "--key", str(other)], env=env)
    assert result.exit_code == 0, result.output
    signed = db.get_manifest("digits", 2)
    assert signed is not None
    other_public = runner.invoke(cli, [*base, "pubkey", str(other)]).output.strip()
    verify_manifest(
        signed, [load_public_key(other_public)], now=time.time(), last_trusted_version=1
    )
    with pytest.raises(SignatureError):
        verify_manifest(signed, [load_public_key(public)], now=time.time(), last_trusted_version=1)

    result = runner.invoke(cli, [*base, "rollout", "start", "digits", "2", "--select", "x=y"])
    assert result.exit_code != 0 and "no device matches" in result.output
    result = runner.invoke(cli, [*base, "rollout", "status"])
    assert result.exit_code == 0 and result.output == ""
    result = runner.invoke(cli, [*base, "rollout", "pause", "nope"])
    assert result.exit_code != 0 and "no rollout" in result.output


def test_the_development_key_is_refused_for_a_production_database(tmp_path: Path) -> None:
    """A PostgreSQL fleet configured with `tether up`'s development key is refused before
    anything is signed or any database is touched."""
    data = tmp_path / "data"
    dev_key = generate_key()
    save_private_key(dev_key, data / "keys" / "dev-signing.pem")
    folder = make_version(tmp_path / "repo", "digits", 1)
    result = CliRunner().invoke(
        cli,
        [
            "fleet",
            "--data-dir",
            str(data),
            "--database-url",
            "postgresql://tether:secret@127.0.0.1:1/fleet",
            "publish",
            str(folder),
        ],
        env={"TETHER_FLEET_SIGNING_KEY": str(data / "keys" / "dev-signing.pem")},
    )
    assert result.exit_code != 0
    assert "refusing the development key" in result.output
    assert "secret" not in result.output
    # The same key under SQLite (what `tether up` runs) is fine.
    result = CliRunner().invoke(
        cli,
        ["fleet", "--data-dir", str(data), "publish", str(folder)],
        env={"TETHER_FLEET_SIGNING_KEY": str(data / "keys" / "dev-signing.pem")},
    )
    assert result.exit_code == 0, result.output
    public = CliRunner().invoke(
        cli,
        ["fleet", "--data-dir", str(data), "pubkey"],
        env={"TETHER_FLEET_SIGNING_KEY": str(data / "keys" / "dev-signing.pem")},
    )
    assert public.output.strip() == public_key_text(dev_key)


def test_rollouts_to_a_named_group_or_hardware_select_devices_as_they_are_at_start(
    tmp_path: Path,
) -> None:
    runner = CliRunner()
    data = tmp_path / "data"
    base = ["fleet", "--data-dir", str(data)]
    groups = '{"eu-gpu": {"labels": {"region": "eu"}, "hardware": "cuda"}}'
    env = {"TETHER_FLEET_SIGNING_KEY": str(tmp_path / "k.pem"), "TETHER_FLEET_GROUPS": groups}
    assert runner.invoke(cli, [*base, "keygen", str(tmp_path / "k.pem")]).exit_code == 0
    folder = make_version(tmp_path / "repo", "digits", 1)
    assert runner.invoke(cli, [*base, "publish", str(folder)], env=env).exit_code == 0
    db = FleetDB(f"sqlite:///{data}/fleet.db")

    def report(device: str, hardware: str, **labels: str) -> None:
        db.upsert_device(
            device, DeviceStatus(online=True, hardware=hardware, labels=labels), time.time()
        )

    report("eu-1", "cuda", region="eu")
    report("eu-2", "cpu", region="eu")
    report("us-1", "cuda", region="us")
    # Groups are selectors, not lists: a device relabelled before the start is in.
    report("us-2", "cuda", region="us")
    report("us-2", "cuda", region="eu")
    result = runner.invoke(cli, [*base, "devices", "--group", "eu-gpu"], env=env)
    assert [line.split("\t")[0] for line in result.output.splitlines()] == ["eu-1", "us-2"]
    result = runner.invoke(cli, [*base, "devices", "--hardware", "cpu"], env=env)
    assert [line.split("\t")[0] for line in result.output.splitlines()] == ["eu-2"]

    result = runner.invoke(
        cli, [*base, "rollout", "start", "digits", "1", "--group", "nope"], env=env
    )
    assert result.exit_code != 0 and "no device group 'nope'" in result.output
    result = runner.invoke(
        cli,
        [*base, "rollout", "start", "digits", "1", "--group", "eu-gpu", "--hardware", "cpu"],
        env=env,
    )
    assert result.exit_code != 0 and "selects hardware 'cuda'" in result.output
    result = runner.invoke(
        cli, [*base, "rollout", "start", "digits", "1", "--group", "eu-gpu"], env=env
    )
    assert result.exit_code == 0, result.output
    (rollout,) = db.list_rollouts()
    assert sorted(d.device for d in db.rollout_devices(rollout.id)) == ["eu-1", "us-2"]
    result = runner.invoke(
        cli, [*base, "rollout", "start", "digits", "1", "--hardware", "cpu"], env=env
    )
    assert result.exit_code == 0, result.output
    (other,) = [r for r in db.list_rollouts() if r.id != rollout.id]
    assert [d.device for d in db.rollout_devices(other.id)] == ["eu-2"]
    db.close()
