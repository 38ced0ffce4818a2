"""Default bindings from the device id, topic templates, settings validation, the command."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from edge.bridge_cli import bridge_command
from edge.sensors.bindings import binding_for, build_bindings
from edge.sensors.bridge import client_id_of
from edge.settings import load_settings
from shared import topics


def test_default_binding_is_the_devices_sensor_topics_to_digits(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TETHER_DEVICE_ID", "jetson-7")
    monkeypatch.setenv("TETHER_DATA_DIR", str(tmp_path))
    settings = load_settings()
    (binding,) = build_bindings(settings.sensors.bindings, settings.device_id)
    assert binding.topic_filter == topics.sensor_data_filter("jetson-7")
    assert binding.model == "digits"
    topic = topics.sensor_topic("jetson-7", "cam1", "data")
    assert binding_for([binding], topic) is binding and binding.sensor_of(topic) == "cam1"
    assert binding.results_topic("jetson-7", "cam1") == topics.sensor_topic(
        "jetson-7", "cam1", "inference"
    )
    assert binding.errors_topic("jetson-7", "cam1") == topics.sensor_topic(
        "jetson-7", "cam1", "errors"
    )
    assert binding_for([binding], "tether/other/sensors/cam1/data") is None
    # A fixed id per device, ending in the device's own secret (shared/client_ids.py).
    assert client_id_of(settings).startswith("tether-bridge-jetson-7-")
    assert client_id_of(settings) == client_id_of(settings)
    assert settings.sensors.broker_url is None and settings.sensors.qos == 1


def test_bindings_from_toml(tmp_path: Path) -> None:
    config = tmp_path / "edge.toml"
    config.write_text(
        'device_id = "d1"\n[sensors]\nbroker_url = "mqtt://gateway:1883"\n'
        "[sensors.batch]\nmax_messages = 16\nmax_delay_ms = 2\n"
        '[[sensors.bindings]]\ntopic = "plant/{device}/+/vibration"\nmodel = "digits-student"\n'
        'results = "plant/{device}/{sensor}/vibration/result"\nformat = "raw"\n'
    )
    settings = load_settings(config)
    (binding,) = build_bindings(settings.sensors.bindings, "d1")
    assert binding.topic_filter == "plant/d1/+/vibration" and binding.format == "raw"
    assert binding.results_topic("d1", "m3") == "plant/d1/m3/vibration/result"
    assert binding.sensor_of("plant/d1/m3/vibration") == "m3"
    assert settings.sensors.batch.max_messages == 16


def test_invalid_sensor_settings_are_refused() -> None:
    with pytest.raises(ValidationError, match="needs a '\\+' level"):
        load_settings(None, sensors={"bindings": [{"topic": "a/b/c"}]})
    with pytest.raises(ValidationError, match="must hold a whole batch"):
        load_settings(None, sensors={"queue_size": 4, "batch": {"max_messages": 8}})
    with pytest.raises(ValidationError):
        load_settings(None, sensors={"outbox": {"policy": "keep_everything"}})


def test_command_reports_a_missing_config_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(bridge_command, ["--config", str(tmp_path / "nope.toml")])
    assert result.exit_code != 0 and "does not exist" in result.output
