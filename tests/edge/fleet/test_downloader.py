"""Resumable, verified downloads over real HTTP; staging that only shows complete folders."""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge.fleet.downloader import DigestMismatch, DiskFull, Downloader, check_free_disk
from edge.fleet.staging import MARKER, stage, verify_version
from shared.errors import InvalidInput
from tests.edge.fleet.support import ArtifactServer

DATA = bytes(range(256)) * 4096  # 1 MiB


@pytest.fixture
def server() -> Iterator[ArtifactServer]:
    instance = ArtifactServer().start()
    yield instance
    instance.stop()


def test_an_interrupted_transfer_resumes_with_a_range_request(
    server: ArtifactServer, tmp_path: Path
) -> None:
    url, digest = server.add(DATA)
    server.cut_after[digest] = 300_000
    part = tmp_path / "a.part"
    Downloader(retry_delay_s=0.01).fetch(url, part, size=len(DATA), sha256=digest)
    assert part.read_bytes() == DATA
    assert server.requests == [(digest, None), (digest, "bytes=300000-")]


def test_a_part_left_by_an_earlier_run_is_resumed(server: ArtifactServer, tmp_path: Path) -> None:
    url, digest = server.add(DATA)
    part = tmp_path / "a.part"
    part.write_bytes(DATA[:123_456])
    Downloader().fetch(url, part, size=len(DATA), sha256=digest)
    assert part.read_bytes() == DATA
    assert server.requests == [(digest, "bytes=123456-")]


def test_damaged_kept_bytes_get_one_clean_retry(server: ArtifactServer, tmp_path: Path) -> None:
    url, digest = server.add(DATA)
    part = tmp_path / "a.part"
    part.write_bytes(b"\xff" * 1000)  # not the artifact's first bytes
    Downloader().fetch(url, part, size=len(DATA), sha256=digest)
    assert part.read_bytes() == DATA
    assert server.requests == [(digest, "bytes=1000-"), (digest, None)]


def test_wrong_bytes_are_refused_and_deleted(server: ArtifactServer, tmp_path: Path) -> None:
    url, digest = server.add(DATA)
    server.blobs[digest] = DATA[::-1]
    part = tmp_path / "a.part"
    with pytest.raises(DigestMismatch, match="sha256 mismatch"):
        Downloader().fetch(url, part, size=len(DATA), sha256=digest)
    assert not part.exists()


def test_free_disk_is_checked(tmp_path: Path) -> None:
    check_free_disk(tmp_path, 1024, 0)
    with pytest.raises(DiskFull, match="not enough disk"):
        check_free_disk(tmp_path, 1 << 60, 0)


def _tar(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_stage_unpacks_the_cloud_layout_and_marks_it_verified(tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    artifact = tmp_path / "a.tar"
    artifact.write_bytes(_tar({"config.json": b'{"name": "m"}', "3/model.onnx": b"onnx"}))
    digest = hashlib.sha256(artifact.read_bytes()).hexdigest()
    files = {"3/model.onnx": hashlib.sha256(b"onnx").hexdigest()}
    version_dir = stage(
        artifact, model_dir, 3, sha256=digest, model_filename="model.onnx", expected_files=files
    )
    assert sorted(p.name for p in version_dir.iterdir()) == [MARKER, "config.json", "model.onnx"]
    assert (model_dir / "config.json").read_bytes() == b'{"name": "m"}'  # the model had none
    assert verify_version(version_dir, digest) is None
    (version_dir / "model.onnx").write_bytes(b"torn")
    assert verify_version(version_dir) == "file model.onnx does not match its sha256"
    assert sorted(p.name for p in model_dir.iterdir()) == ["3", "config.json"]


@pytest.mark.parametrize("name", ["../evil", "/etc/evil"])
def test_stage_refuses_members_outside_the_folder(tmp_path: Path, name: str) -> None:
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    artifact = tmp_path / "a.tar"
    artifact.write_bytes(_tar({name: b"x", "model.onnx": b"y"}))
    with pytest.raises(InvalidInput, match="escapes"):
        stage(artifact, model_dir, 1, sha256="0" * 64, model_filename="model.onnx")
    assert not (model_dir / "1").exists()
