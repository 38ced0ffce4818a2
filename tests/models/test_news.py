"""The news pair as ``tether models build`` made it: the report's figures against the issue's
targets, the shipped route's threshold, and the real models on real test-split documents."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from harness.news import REPOSITORY, STUDENT, TEACHER, TEXT_REPOSITORY, news_built, texts_array
from models.news import CURVE_FILE, MAX_TOKENS, TARGET_OFFLOAD, TARGET_SHARE, read_report
from models.newsgroups import load_split
from models.offline import class_names, load_model

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def report() -> dict:
    if not news_built():
        pytest.fail("the news models are not built: run `make install` (tether models build)")
    return read_report(REPOSITORY)


def test_the_report_covers_the_splits_of_the_issue(report: dict) -> None:
    assert report["test_documents"] == 7528
    assert report["validation_documents"] == 1697
    # the heads learn from a seeded, stratified 2,000 of the train split's 9,596 (per class,
    # rounded: 1,999)
    assert report["train_documents"] == 1999
    assert report["max_tokens"] == MAX_TOKENS


def test_the_cascade_meets_the_issues_targets_on_the_test_split(report: dict) -> None:
    # >= 99 % of the teacher's accuracy while escalating <= 30 %, threshold chosen on the
    # validation split, figures from the untouched test split
    assert report["cascade_accuracy"] >= TARGET_SHARE * report["teacher_accuracy"], report
    assert report["cascade_offload"] <= TARGET_OFFLOAD, report
    assert report["meets_targets"] is True
    assert report["student_accuracy"] < report["cascade_accuracy"]


def test_the_curve_beside_the_report_holds_the_chosen_threshold(report: dict) -> None:
    with (REPOSITORY / f"{CURVE_FILE}.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    chosen = [row for row in rows if row["chosen"] == "1"]
    assert len(chosen) == 1
    assert float(chosen[0]["threshold"]) == pytest.approx(report["threshold"], rel=1e-5)
    assert float(chosen[0]["offload_test"]) == pytest.approx(report["cascade_offload"], abs=1e-6)
    assert (REPOSITORY / f"{CURVE_FILE}.png").stat().st_size > 10_000


def test_the_shipped_news_route_uses_the_calibrated_threshold(report: dict) -> None:
    edge = tomllib.loads((ROOT / "deploy" / "demo" / "edge.toml").read_text())
    route = edge["routes"]["news"]
    assert (route["mode"], route["local_model"], route["cloud_model"]) == (
        "cascade",
        STUDENT,
        TEACHER,
    )
    assert edge["routes"][TEACHER]["mode"] == "cloud"
    # the build is seeded and cached; another machine's float rounding may move it a hair
    assert route["threshold"] == pytest.approx(report["threshold"], abs=5e-3)
    cloud = tomllib.loads((ROOT / "deploy" / "demo" / "cloud.toml").read_text())
    assert TEACHER in cloud["models"]


@pytest.mark.parametrize("name", [STUDENT, TEACHER])
def test_the_built_models_label_test_documents(name: str, report: dict) -> None:
    test = load_split("test")
    # the first test document of each newsgroup (the file is sorted by group)
    rows = [int(np.flatnonzero(test.labels == label)[0]) for label in range(len(test.classes))]
    model = load_model(REPOSITORY, name)
    assert class_names(model) == test.classes
    texts = texts_array([test.texts[i] for i in rows])
    outputs = model.predict({"text": texts}, ["probabilities", "labels"])
    predicted = outputs["probabilities"].argmax(axis=1)
    assert [row[0].decode() for row in outputs["labels"]] == [test.classes[i] for i in predicted]
    truth = test.labels[rows]
    accuracy = float(np.mean(predicted == truth))
    # the report's accuracy is over all 7,528 documents; these 20 are a small sample of it
    assert accuracy >= 0.6, (name, accuracy, predicted, truth)


def test_tether_calibrate_takes_the_news_route_and_labelled_text(
    report: dict, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from tether.calibrate_cli import calibrate_command

    files = {}
    for split in ("validation", "test"):  # 20 documents of each, spread over the groups
        data = load_split(split)
        rows = range(0, len(data.texts), len(data.texts) // 20)
        lines = [f"{data.classes[data.labels[i]]}\t{data.texts[i]}" for i in rows]
        files[split] = tmp_path / f"{split}.tsv"
        files[split].write_text("\n".join(lines[:20]) + "\n", encoding="utf-8")
    result = CliRunner().invoke(
        calibrate_command,
        [
            "news", "--config", str(ROOT / "deploy" / "demo" / "edge.toml"),
            "--repository", str(REPOSITORY), "--data", str(files["validation"]),
            "--test", str(files["test"]), "--plot", str(tmp_path / "curve.png"),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"cascade news: {STUDENT} (edge) over {TEACHER} (cloud)" in result.output
    assert "data: 20 rows to choose on, 20 to report on" in result.output
    assert (tmp_path / "curve.csv").is_file()


def test_make_install_composes_the_committed_heads_and_notices_retrained_ones(
    report: dict, tmp_path: Path
) -> None:
    """Installing embeds nothing: the committed heads are appended to the encoders, giving
    the very graphs the repository serves; heads trained again since (a new report) make
    the repository stale, so the next build composes again."""
    from models.build import default_cache_dir
    from models.news import HEADS_DIR, REPORT_FILE, build_news, is_built

    heads = tmp_path / "heads"
    shutil.copytree(HEADS_DIR, heads)
    output = tmp_path / "repository"
    build_news(
        output, TEXT_REPOSITORY, default_cache_dir() / "embeddings", heads_dir=heads, echo=str
    )
    assert is_built(output, heads)
    for name in (STUDENT, TEACHER):
        built = (output / name / "1" / "model.onnx").read_bytes()
        assert built == (REPOSITORY / name / "1" / "model.onnx").read_bytes(), name
    assert read_report(output) == report
    retrained = json.loads((heads / REPORT_FILE).read_text())
    retrained["build_seconds"] += 1.0
    (heads / REPORT_FILE).write_text(json.dumps(retrained))
    assert not is_built(output, heads)
