"""The EfficientNet-Lite build: pinned weights, the export cache, the repository entries."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from pytest_mock import MockerFixture

from harness.images import REPOSITORY, images_built
from models.efficientnet import (
    LITE0,
    SPECS,
    BuildDependencyMissing,
    build_efficientnet,
    cache_key,
    weights_path,
)
from serving.model_config import load_model_config
from shared.hashing import sha256_file


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    if not images_built():
        pytest.fail("the image models are not built: run `make install` (tether models build)")


@pytest.mark.parametrize("name", sorted(SPECS))
def test_the_built_models_declare_their_image_pipeline(name: str) -> None:
    spec = SPECS[name]
    config = load_model_config(REPOSITORY / name)
    assert config.pipeline is not None and config.pipeline.input is not None
    assert config.pipeline.input.crop == spec.image_size
    assert config.input[0].dims == [3, spec.image_size, spec.image_size]
    assert [t.name for t in config.client_inputs()] == ["image"]
    assert [t.name for t in config.client_outputs()] == ["probabilities", "labels"]
    labels = (REPOSITORY / name / "labels.txt").read_text().splitlines()
    assert len(labels) == 1000 and labels[285] == "Egyptian cat" and labels[967] == "espresso"
    assert config.parameters["weights_sha256"] == spec.weights_sha256
    assert config.parameters["flops"] > 500_000_000  # convolutions counted (static shapes)


def test_the_installed_weights_match_the_pinned_hashes() -> None:
    for spec in SPECS.values():
        assert sha256_file(weights_path(spec)) == spec.weights_sha256


def test_weights_with_another_hash_are_refused(tmp_path: Path) -> None:
    tampered = dataclasses.replace(LITE0, weights_sha256="0" * 64)
    with pytest.raises(BuildDependencyMissing, match="expected 0000"):
        build_efficientnet(tampered, tmp_path / "repository", tmp_path / "cache")
    assert not (tmp_path / "repository").exists()


def test_a_cached_export_is_copied_without_torch(tmp_path: Path, mocker: MockerFixture) -> None:
    export = mocker.patch("models.efficientnet.export_onnx", side_effect=AssertionError)
    source = REPOSITORY / LITE0.name
    entry = tmp_path / "cache" / cache_key(LITE0, LITE0.weights_sha256)
    entry.mkdir(parents=True)
    (entry / "model.onnx").write_bytes((source / "1" / "model.onnx").read_bytes())
    parameters = load_model_config(source).parameters
    (entry / "parameters.json").write_text(json.dumps(parameters))

    result = build_efficientnet(LITE0, tmp_path / "repository", tmp_path / "cache")

    assert result.cached and export.call_count == 0
    built = tmp_path / "repository" / LITE0.name
    assert (built / "1" / "model.onnx").read_bytes() == (source / "1" / "model.onnx").read_bytes()
    assert json.loads((built / "config.json").read_text()) == json.loads(
        (source / "config.json").read_text()
    )
    assert (built / "labels.txt").read_text() == (source / "labels.txt").read_text()
