"""``tether fleet provision``: credentials, password-file lines, certificates, refusals."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.x509.oid import NameOID

from cloud.provision import (
    FleetCA,
    check_identity,
    password_hash,
    provision_command,
    update_password_file,
    verify_password,
)
from shared import topics
from shared.errors import InvalidInput


def test_provision_writes_credentials_and_prints_what_to_install(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    passwd.write_text("other:$7$101$abc$def\n")
    result = CliRunner().invoke(
        provision_command,
        [
            "cam-17",
            "--out",
            str(tmp_path / "out"),
            "--broker",
            "mqtts://broker.example.com:8883",
            "--ca-dir",
            str(tmp_path / "ca"),
            "--password-file",
            str(passwd),
        ],
    )
    assert result.exit_code == 0, result.output
    env = (tmp_path / "out" / "edge.env").read_text()
    assert "TETHER_DEVICE_ID=cam-17\n" in env
    password = env.split("mqtts://cam-17:", 1)[1].split("@", 1)[0]
    assert password not in result.output  # the secret stays in the 0600 file
    assert stat.S_IMODE((tmp_path / "out" / "edge.env").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "out" / "cam-17.key").stat().st_mode) == 0o600
    lines = passwd.read_text().splitlines()
    assert lines[0].startswith("other:") and lines[1].startswith("cam-17:$7$101$")
    assert verify_password(password, lines[1].split(":", 1)[1])
    cert = x509.load_pem_x509_certificate((tmp_path / "out" / "cam-17.crt").read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "cam-17"
    ca = FleetCA.load(tmp_path / "ca")
    cert.verify_directly_issued_by(ca.cert)
    assert "reload Mosquitto" in result.output


def test_reprovisioning_replaces_the_line(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    update_password_file(passwd, "cam-1:" + password_hash("a"))
    update_password_file(passwd, "cam-1:" + password_hash("b"))
    (line,) = passwd.read_text().splitlines()
    assert verify_password("b", line.split(":", 1)[1])
    assert not verify_password("a", line.split(":", 1)[1])


@pytest.mark.parametrize(
    "name",
    [
        "cloud", "Fleet", "cloud-worker", "fleet-controller", "a/b", "+", "#", "", "-x", "é",
        # the namespace of the client ids clients choose (shared/client_ids.py)
        "tether-bridge-cam-17", "Tether-x",
    ],
)  # fmt: skip
def test_device_names_that_would_alias_other_topics_are_refused(name: str) -> None:
    with pytest.raises(InvalidInput):
        check_identity(name)
    result = CliRunner().invoke(provision_command, [name or "''", "--out", "/nonexistent/x"])
    assert result.exit_code != 0


def test_services_are_provisioned_only_by_their_names(tmp_path: Path) -> None:
    assert check_identity("cloud-worker", service=True) == "cloud-worker"
    with pytest.raises(InvalidInput):
        check_identity("cam-17", service=True)
    result = CliRunner().invoke(
        provision_command, ["fleet-controller", "--service", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cloud.env").read_text().startswith("TETHER_MQTT_URL=mqtts://fleet-")


def test_plain_mqtt_urls_are_refused(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        provision_command, ["cam-1", "--out", str(tmp_path), "--broker", "mqtt://b:1883"]
    )
    assert result.exit_code != 0 and "mqtts://" in result.output


def test_topics_refuse_reserved_device_ids() -> None:
    for reserved in ("cloud", "fleet"):
        with pytest.raises(InvalidInput):
            topics.device_status(reserved)
        with pytest.raises(InvalidInput):
            topics.parse_cloud_request(f"tether/cloud/infer/{reserved}/m")
    assert topics.parse_cloud_replies("tether/d1/cloud/replies/c1") == ("d1", "c1")
    with pytest.raises(InvalidInput):
        topics.parse_cloud_replies("tether/d1/rollout")
