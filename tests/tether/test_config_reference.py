"""docs/configuration.md is generated from the settings objects and must not drift."""

from __future__ import annotations

from pathlib import Path

from tether.config_reference import render

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_configuration_reference_is_current() -> None:
    assert DOC.read_text() == render(), (
        "docs/configuration.md is stale: run `make docs` (python -m tether.config_reference)"
    )


def test_reference_names_every_edge_setting() -> None:
    text = render()
    for name in ("`device_id`", "`TETHER_DEVICE_ID`", "`TETHER_DATA_DIR`", "`TETHER_MQTT_URL`"):
        assert name in text
