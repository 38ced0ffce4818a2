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


def test_request_threads_follow_what_requests_wait_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TETHER_HTTP__THREADS", raising=False)
    monkeypatch.setattr("edge.settings.gpu_runtime_installed", lambda: False)
    local = tmp_path / "local.toml"
    local.write_text('[routes.digits]\nmode = "local"\nlocal_model = "digits-student"\n')
    hybrid = tmp_path / "hybrid.toml"
    hybrid.write_text(
        '[routes.digits]\nmode = "cascade"\nlocal_model = "digits-student"\n'
        'cloud_model = "digits-teacher"\n'
    )
    # Nothing waits: one thread per worker (more would only contend for the GIL).
    assert load_settings(None).request_threads() == 1
    assert load_settings(local).request_threads() == 1
    # Requests may wait on the cloud, or on a GPU: threads overlap the waits.
    assert load_settings(hybrid).request_threads() == 4
    monkeypatch.setattr("edge.settings.gpu_runtime_installed", lambda: True)
    assert load_settings(None).request_threads() == 4
    # The operator's figure wins.
    monkeypatch.setenv("TETHER_HTTP__THREADS", "3")
    assert load_settings(hybrid).request_threads() == 3
