"""Settings: defaults, TOML file, ``TETHER_*`` variables and flags, in that precedence."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.settings import load_settings


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TETHER_DEVICE_ID", raising=False)
    settings = load_settings()
    assert settings.http.host == "127.0.0.1" and settings.http.port == 8000
    assert settings.repository == Path("models/repository")
    assert settings.mqtt_url == "mqtt://127.0.0.1:1883"
    assert settings.device_id


def test_precedence_file_then_env_then_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "edge.toml"
    config.write_text(
        'device_id = "from-file"\nmqtt_url = "mqtt://broker:1884"\n[http]\nport = 9001\nworkers = 3\n'
    )
    monkeypatch.setenv("TETHER_DEVICE_ID", "from-env")
    monkeypatch.setenv("TETHER_HTTP__PORT", "9002")
    monkeypatch.setenv("TETHER_DATA_DIR", str(tmp_path / "state"))
    settings = load_settings(config)
    assert settings.device_id == "from-env"
    assert settings.mqtt_url == "mqtt://broker:1884"
    assert settings.http.port == 9002 and settings.http.workers == 3
    assert settings.data_dir == tmp_path / "state"
    flagged = load_settings(config, http={"port": 9003})
    assert flagged.http.port == 9003 and flagged.http.workers == 3


def test_typos_and_bad_values_are_errors(tmp_path: Path) -> None:
    config = tmp_path / "edge.toml"
    config.write_text("[http]\nprot = 1\n")
    with pytest.raises(ValueError, match="prot"):
        load_settings(config)
    config.write_text("[http]\nport = 70000\n")
    with pytest.raises(ValueError, match="port"):
        load_settings(config)
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path / "missing.toml")
