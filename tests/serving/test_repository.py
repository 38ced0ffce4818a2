"""The model repository: version policies, load/unload, failures, atomic switches."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from harness.onnx_models import dense_model, write_model
from serving.control_file import ControlFile
from serving.model_config import VersionPolicy
from serving.repository import ModelRepository
from shared.errors import InvalidInput, ModelNotFound, ModelNotReady, Unavailable


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ({}, [3]),
        ({"latest": {"num_versions": 2}}, [2, 3]),
        ({"all": {}}, [1, 2, 3]),
        ({"specific": {"versions": [1, 3, 7]}}, [1, 3]),
    ],
)
def test_version_policies(policy: dict[str, object], expected: list[int]) -> None:
    assert VersionPolicy.model_validate(policy).select([3, 1, 2]) == expected


def test_serves_policy_versions_and_latest_by_default(tmp_path: Path) -> None:
    for version in (1, 2, 3):
        write_model(tmp_path, "m", dense_model(seed=version), version=version)
    (tmp_path / "m" / "config.json").write_text(
        json.dumps({"name": "m", "version_policy": {"specific": {"versions": [1, 2]}}})
    )
    repo = ModelRepository(tmp_path)
    assert repo.load("m") == ["1", "2"]
    assert repo.get("m").version == "2"
    assert repo.get("m", "1").version == "1"
    with pytest.raises(ModelNotFound):
        repo.get("m", "3")


def test_broken_model_is_reported_and_others_keep_serving(tmp_path: Path) -> None:
    write_model(tmp_path, "good", dense_model())
    broken = tmp_path / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "model.onnx").write_bytes(b"this is not onnx")
    repo = ModelRepository(tmp_path)
    repo.load("good")
    with pytest.raises(Unavailable, match="failed to load"):
        repo.load("broken")
    assert not repo.all_ready()
    with pytest.raises(ModelNotReady, match="failed to load"):
        repo.get("broken")
    entries = {e.name: e for e in repo.index()}
    assert entries["broken"].state == "UNAVAILABLE" and "failed to load" in entries["broken"].reason
    assert repo.get("good").ready


def test_reload_switches_atomically_under_traffic(tmp_path: Path) -> None:
    write_model(tmp_path, "m", dense_model(seed=1), version=1)
    repo = ModelRepository(tmp_path)
    repo.load("m")
    x = {"x": np.ones((1, 4), np.float32)}
    errors: list[BaseException] = []
    versions: set[str] = set()
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            try:
                versions.add(repo.get("m").infer(x).model_version)
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=traffic) for _ in range(3)]
    for t in threads:
        t.start()
    write_model(tmp_path, "m", dense_model(seed=2), version=2)
    repo.load("m")
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    assert repo.get("m").version == "2"
    assert versions <= {"1", "2"}


def test_worker_processes_agree_through_the_control_file(tmp_path: Path) -> None:
    write_model(tmp_path / "repo", "m", dense_model())
    control_path = tmp_path / "run" / "repository.json"
    ControlFile(control_path).reset(["m"])
    first = ModelRepository(tmp_path / "repo", control=ControlFile(control_path))
    second = ModelRepository(tmp_path / "repo", control=ControlFile(control_path))
    first.sync()
    second.sync()
    assert first.get("m").ready and second.get("m").ready
    first.unload("m")
    second.sync()
    with pytest.raises(ModelNotReady):
        second.get("m")
    second.load("m")
    first.sync()
    assert first.get("m").ready


def test_unknown_and_unsafe_names(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path)
    for name in ("ghost", ""):
        with pytest.raises((ModelNotFound, Exception)):
            repo.load(name)
    with pytest.raises(Exception, match="invalid model name"):
        repo.load("../etc")


def test_invalid_names_are_never_recorded(tmp_path: Path) -> None:
    """Through the real HTTP app: the repository load/unload routes refuse names that are
    not model names (400) and models that are not on disk (404) before anything reaches
    the control file every worker re-reads; a hand-written bad entry there is ignored."""
    from edge.settings import load_settings
    from edge.worker import build_app

    write_model(tmp_path / "repo", "m", dense_model())
    control = ControlFile(tmp_path / "run" / "repository.json")
    control.reset(["m"])
    settings = load_settings(
        None,
        repository=tmp_path / "repo",
        data_dir=tmp_path / "data",
        runtime={"backend": "onnxruntime", "providers": ["CPUExecutionProvider"]},
    )
    app = build_app(settings, control=control)
    client = app.test_client()
    before = control.path.read_bytes()
    for name, status in [
        (".staging-1", 400),
        ("-m", 400),
        ("a b", 400),
        ("m:1", 400),
        ("..%2F..%2Fetc", 404),  # a slash never reaches the route
        ("ghost", 404),
    ]:
        for action in ("load", "unload"):
            response = client.post(f"/v2/repository/models/{name}/{action}")
            assert response.status_code == status, (name, action, response.get_json())
            assert "error" in response.get_json()
    assert control.path.read_bytes() == before
    assert client.post("/v2/repository/models/m/load").status_code == 200
    assert set(control.read()) == {"m"}
    # Entries under invalid names (written by hand, or by an older version) are not read.
    data = json.loads(control.path.read_text())
    data["../x"] = {"action": "unload", "generation": 9}
    control.path.write_text(json.dumps(data))
    assert set(control.read()) == {"m"}
    with pytest.raises(InvalidInput):
        control.record("../x", "load")
    app.extensions["tether.agent"].close()


def test_pinned_versions_and_ab_split(tmp_path: Path) -> None:
    for version in (1, 2):
        write_model(tmp_path, "m", dense_model(seed=version), version=version)
    repo = ModelRepository(tmp_path)
    assert repo.load("m", versions=[1]) == ["1"]
    assert repo.get("m").version == "1"
    repo.load("m", versions=[1, 2], split={"1": 0.9, "2": 0.1})
    drawn = [repo.get("m").version for _ in range(2000)]
    share = drawn.count("2") / len(drawn)
    assert 0.05 < share < 0.15
    assert repo.get("m", "2").version == "2"  # an explicit version is always honoured
    with pytest.raises(ModelNotFound, match="no version 7"):
        repo.load("m", versions=[7])
    with pytest.raises(Exception, match="split"):
        repo.load("m", versions=[1], split={"2": 1.0})


def test_pins_and_splits_reach_every_worker(tmp_path: Path) -> None:
    for version in (1, 2):
        write_model(tmp_path / "repo", "m", dense_model(seed=version), version=version)
    control_path = tmp_path / "run" / "repository.json"
    ControlFile(control_path).reset(["m"])
    first = ModelRepository(tmp_path / "repo", control=ControlFile(control_path))
    second = ModelRepository(tmp_path / "repo", control=ControlFile(control_path))
    first.sync()
    second.sync()
    assert second.get("m").version == "2"
    first.load("m", versions=[1])
    second.sync()
    assert second.get("m").version == "1"
