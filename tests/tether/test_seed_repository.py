"""``tether up`` seeds the demo device's repository, and adds models built later."""

from __future__ import annotations

from pathlib import Path

from pytest_mock import MockerFixture

from tether import up


def _model(root: Path, name: str, content: bytes) -> None:
    (root / name / "1").mkdir(parents=True)
    (root / name / "1" / "model.onnx").write_bytes(content)


def test_models_built_after_the_first_seed_are_added_and_the_rest_kept(
    tmp_path: Path, mocker: MockerFixture
) -> None:
    source = tmp_path / "source"
    _model(source, "digits-student", b"v1")
    mocker.patch.object(up, "ROOT", tmp_path / "root")
    (tmp_path / "root" / "models").mkdir(parents=True)
    (tmp_path / "root" / "models" / "repository").symlink_to(source)
    device = tmp_path / "device"
    up.seed_repository(device)
    assert (device / "digits-student" / "1" / "model.onnx").read_bytes() == b"v1"
    (device / "digits-student" / "1" / "model.onnx").write_bytes(b"rolled out")
    _model(source, "efficientnet-lite0", b"image model")
    up.seed_repository(device)
    assert (device / "efficientnet-lite0" / "1" / "model.onnx").read_bytes() == b"image model"
    assert (device / "digits-student" / "1" / "model.onnx").read_bytes() == b"rolled out"
