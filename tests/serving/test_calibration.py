"""Cascade calibration on the held-out digits splits (the issue's done-when figures)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tomllib
from click.testing import CliRunner

from edge.settings import load_settings
from models.digits import load_split
from serving.calibration import (
    SplitScores,
    calibrate,
    choose_threshold,
    evaluate,
    format_table,
    run_onnx,
    write_threshold,
)
from tests.conftest import REPOSITORY
from tether.calibrate_cli import calibrate_command

MODELS = ("digits-student", "digits-teacher")


@pytest.fixture(scope="session")
def digits_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The committed digits models, or a fresh deterministic build of them (seconds)."""
    if all((REPOSITORY / name / "1" / "model.onnx").is_file() for name in MODELS):
        return REPOSITORY
    from models.build import build

    root = tmp_path_factory.mktemp("digits") / "repository"
    build(root, quiet=True)
    return root


def scores(repository: Path, split: str) -> SplitScores:
    pixels, labels = load_split(split)  # type: ignore[arg-type]
    student, teacher = (repository / name / "1" / "model.onnx" for name in MODELS)
    return SplitScores(run_onnx(student, pixels), run_onnx(teacher, pixels), labels)


def test_calibrated_cascade_reaches_the_teacher_at_a_quarter_offload(
    digits_repository: Path,
) -> None:
    result = calibrate(
        scores(digits_repository, "calibration"),
        scores(digits_repository, "test"),
        measure="max_probability",
        target=0.995,
    )
    test = result.test_scores
    assert result.test.accuracy >= 0.995 * test.teacher_accuracy
    assert result.test.offload <= 0.25
    assert result.test.accuracy > test.student_accuracy  # escalation is worth something
    assert 0.0 < result.chosen.threshold < 1.0


@pytest.mark.parametrize("measure", ["margin", "entropy"])
def test_other_measures_also_meet_the_target(digits_repository: Path, measure: str) -> None:
    result = calibrate(
        scores(digits_repository, "calibration"),
        scores(digits_repository, "test"),
        measure=measure,
    )
    assert result.test.accuracy >= 0.995 * result.test_scores.teacher_accuracy
    assert result.test.offload <= 0.25


def test_choice_is_the_least_offload_that_meets_the_target() -> None:
    # four rows; the student is wrong only on its least confident, the teacher always right
    student = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7]])
    teacher = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    labels = np.array([0, 0, 0, 1])
    split = SplitScores(student, teacher, labels)
    point = choose_threshold(split, "max_probability", "accuracy", 1.0)
    assert point.offload == 0.25 and point.accuracy == 1.0  # only the 0.6 row escalates
    assert evaluate(split, "max_probability", 0.0).offload == 0.0
    loose = choose_threshold(split, "max_probability", "accuracy", 0.75)
    assert loose.offload == 0.0
    assert "**chosen**" in format_table(calibrate(split, split, target=1.0))


def test_write_threshold_edits_or_appends_the_route(tmp_path: Path) -> None:
    config = tmp_path / "edge.toml"
    config.write_text(
        '# demo\n[routes.digits]\nmode = "cascade"\nthreshold = 0.9  # old\n'
        'local_model = "digits-student"\n\n[uplink]\ntimeout_s = 2.0\n'
    )
    write_threshold(config, "digits", 0.6999, measure="margin", local_model="s", cloud_model="t")
    data = tomllib.loads(config.read_text())
    assert data["routes"]["digits"]["threshold"] == 0.6999
    assert data["routes"]["digits"]["confidence"] == "margin"
    assert data["routes"]["digits"]["local_model"] == "digits-student"
    assert data["uplink"] == {"timeout_s": 2.0}
    assert config.read_text().startswith("# demo\n")
    write_threshold(config, "other", 0.5, measure="entropy", local_model="s", cloud_model="t")
    settings = load_settings(config)
    assert settings.routes["other"].mode == "cascade"
    assert settings.routes["other"].threshold == 0.5


def test_calibrate_command(digits_repository: Path, tmp_path: Path) -> None:
    config = tmp_path / "edge.toml"
    config.write_text(
        '[routes.digits]\nmode = "cascade"\nlocal_model = "digits-student"\n'
        'cloud_model = "digits-teacher"\nthreshold = 0.5\n'
    )
    plot = tmp_path / "curve.png"
    result = CliRunner().invoke(
        calibrate_command,
        [
            "digits",
            "--config", str(config),
            "--repository", str(digits_repository),
            "--plot", str(plot),
            "--write", str(config),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "| threshold | offload (cal)" in result.output
    assert "chosen threshold" in result.output
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    threshold = load_settings(config).routes["digits"].threshold
    assert threshold != 0.5 and 0.0 < threshold < 1.0
