"""Relative paths in a config file mean the same from any working directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloud.settings import load_cloud_settings
from edge.settings import load_settings
from tests.conftest import ROOT


def test_paths_in_the_file_are_relative_to_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "conf"
    folder.mkdir()
    config = folder / "edge.toml"
    (folder / "tokens").write_text("a-token-of-twenty-chars infer\n")
    (tmp_path / "engines").mkdir()
    config.write_text(
        'data_dir = "state"\n'
        'repository = "../models"\n'
        '[mqtt_tls]\nca_file = "certs/ca.pem"\n'
        '[http.auth]\ntokens_file = "tokens"\n'  # must exist: read where the file says
        f'[runtime]\nengine_cache_dir = "{tmp_path / "engines"}"\n'
    )
    for cwd in (tmp_path, ROOT, folder):
        monkeypatch.chdir(cwd)
        settings = load_settings(config)
        assert settings.data_dir == folder / "state"
        assert settings.repository == folder / "../models"
        assert settings.mqtt_tls.ca_file == folder / "certs" / "ca.pem"
        assert settings.http.auth.tokens_file == folder / "tokens"
        assert settings.runtime.engine_cache_dir == tmp_path / "engines"  # absolute: as is
    # a variable still means the working directory, as it does for every program
    monkeypatch.setenv("TETHER_DATA_DIR", "from-env")
    assert load_settings(config).data_dir == Path("from-env")


def test_the_demo_configs_read_the_same_from_anywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    edge = load_settings(ROOT / "deploy" / "demo" / "edge.toml")
    cloud = load_cloud_settings(ROOT / "deploy" / "demo" / "cloud.toml")
    assert edge.data_dir.resolve() == (ROOT / ".tether" / "edge").resolve()
    assert cloud.repository.resolve() == (ROOT / "models" / "repository").resolve()
