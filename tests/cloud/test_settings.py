"""Cloud settings: TOML, ``TETHER_MQTT_URL`` / ``TETHER_CLOUD_*`` variables, overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloud.settings import DEFAULT_MODELS, load_cloud_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("TETHER_"):
            monkeypatch.delenv(name)


def test_defaults() -> None:
    settings = load_cloud_settings()
    assert settings.mqtt_url == "mqtt://127.0.0.1:1883"
    assert settings.models == DEFAULT_MODELS
    assert settings.repository == Path("models/repository")
    assert settings.batching.for_model("digits-teacher").max_batch_size == 0
    assert (settings.metrics_host, settings.metrics_port) == ("127.0.0.1", 9100)
    assert settings.share_group == "tether-cloud"


def test_file_then_env_then_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "cloud.toml"
    config.write_text(
        'mqtt_url = "mqtt://file:1883"\n'
        'models = ["a"]\n'
        "worker_threads = 3\n"
        "[batching]\nmax_batch_size = 8\nmax_queue_delay_ms = 5\n"
        "[batching.models.big]\nmax_batch_size = 32\n"
    )
    settings = load_cloud_settings(config)
    assert settings.mqtt_url == "mqtt://file:1883"
    assert settings.batching.for_model("a").max_batch_size == 8
    assert settings.batching.for_model("big").max_batch_size == 32
    assert settings.batching.for_model("big").max_queue_delay_ms == 0

    monkeypatch.setenv("TETHER_MQTT_URL", "mqtt://env:1883")
    monkeypatch.setenv("TETHER_CLOUD_MODELS", "x, y")
    monkeypatch.setenv("TETHER_CLOUD_BATCHING__MAX_BATCH_SIZE", "4")
    settings = load_cloud_settings(config, worker_threads=7, metrics_port=None)
    assert settings.mqtt_url == "mqtt://env:1883"
    assert settings.models == ["x", "y"]
    assert settings.batching.max_batch_size == 4
    assert settings.worker_threads == 7
    assert settings.metrics_port == 9100


def test_broker_url_from_the_shared_variable_or_a_cloud_override(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MQTT_URL", "mqtt://wrong:2")
    assert load_cloud_settings().mqtt_url == "mqtt://127.0.0.1:1883"
    monkeypatch.setenv("TETHER_MQTT_URL", "mqtt://shared:1")
    assert load_cloud_settings().mqtt_url == "mqtt://shared:1"
    monkeypatch.setenv("TETHER_CLOUD_MQTT_URL", "mqtt://cloud-only:1")
    assert load_cloud_settings().mqtt_url == "mqtt://cloud-only:1"
    assert load_cloud_settings(mqtt_url="mqtt://flag:1").mqtt_url == "mqtt://flag:1"


def test_bad_values_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        load_cloud_settings(worker_id="a/b")
    with pytest.raises(ValueError):
        load_cloud_settings(batching={"max_batch_size": -1})
    config = tmp_path / "typo.toml"
    config.write_text("wokrer_threads = 2\n")
    with pytest.raises(ValueError):
        load_cloud_settings(config)
    with pytest.raises(FileNotFoundError):
        load_cloud_settings(tmp_path / "missing.toml")
