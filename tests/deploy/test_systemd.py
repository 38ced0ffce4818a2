"""deploy/systemd/tether-edge.service: `systemd-analyze verify`, hardening, its environment."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from edge.settings import EdgeSettings
from tests.deploy.env_names import ROOT, check_environment

UNIT = ROOT / "deploy" / "systemd" / "tether-edge.service"
ENV_FILE = ROOT / "deploy" / "systemd" / "tether-edge.env"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
EXEC = "/opt/tether/bin/tether"

needs_systemd_analyze = pytest.mark.skipif(
    not Path(SYSTEMD_ANALYZE).exists(), reason="systemd-analyze is not installed"
)


def directives() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def verify(unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def installable_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at an executable that exists on this machine."""
    stub = tmp_path / "tether"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace(EXEC, str(stub)))
    return unit


@needs_systemd_analyze
def test_verify_is_clean(installable_unit: Path) -> None:
    """Any warning (unknown key, unparsable value...) fails: verify exits 0 on those."""
    result = verify(installable_unit)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
        result.stdout + result.stderr
    )


@needs_systemd_analyze
def test_verify_finds_nothing_but_the_missing_install() -> None:
    """The committed unit as is: the only complaint is that Tether is not installed here."""
    result = verify(UNIT)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    expected = f"{UNIT.name}: Command {EXEC} is not executable: No such file or directory"
    assert all(line.endswith(expected) for line in lines), lines


@needs_systemd_analyze
def test_verify_catches_mistakes(installable_unit: Path) -> None:
    installable_unit.write_text(
        installable_unit.read_text().replace("ProtectSystem=strict", "ProtectSystem=stricter")
    )
    assert "Failed to parse" in verify(installable_unit).stderr


@needs_systemd_analyze
def test_exposure_is_low(installable_unit: Path) -> None:
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=yes", "--no-pager", str(installable_unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if "--offline" in result.stderr and result.returncode != 0:
        pytest.skip("this systemd-analyze has no offline security check")
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 3.0, result.stdout


def test_restart_watchdog_and_hardening() -> None:
    d = directives()
    assert d["Type"] == ["notify"] and d["NotifyAccess"] == ["main"]
    assert d["Restart"] in (["always"], ["on-failure"])
    assert d["WatchdogSec"] and d["ExecStart"][0].startswith(EXEC + " edge")
    for key, value in {
        "DynamicUser": "yes",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "RestrictSUIDSGID": "yes",
        "CapabilityBoundingSet": "",
    }.items():
        assert d.get(key) == [value], key
    assert "PrivateDevices" not in d, "the GPU's device nodes must stay visible"


def test_environment_is_known_to_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    env: dict[str, str | None] = {}
    for line in ENV_FILE.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    for assignment in directives()["Environment"]:
        for word in assignment.split():
            key, _, value = word.partition("=")
            env[key] = value
    check_environment(EdgeSettings, env, monkeypatch, "systemd unit + env file")
