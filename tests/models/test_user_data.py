"""The user's own data: the dataset formats, ``tether calibrate ROUTE --data`` and
``tether models distill`` on real repository models."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edge.settings import load_settings
from harness.images import LITE0, LITE2, images_built, sample
from models.datasets import UNLABELLED, DatasetError, load_dataset
from models.digits import load_split
from models.distill import REPORT_FILE, distill_command
from models.offline import load_model, scores
from tests.conftest import REPOSITORY
from tether.calibrate_cli import calibrate_command


def _digits_jsonl(path: Path, split: str, labelled: bool = True) -> Path:
    pixels, labels = load_split(split)  # type: ignore[arg-type]
    with path.open("w") as out:
        for row, label in zip(pixels, labels, strict=True):
            request: dict[str, object] = {
                "inputs": [
                    {"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": row.tolist()}
                ]
            }
            if labelled:
                request["parameters"] = {"label": int(label)}
            out.write(json.dumps(request) + "\n")
    return path


# ---------------------------------------------------------------------- formats


def test_jsonl_requests_with_and_without_labels(tmp_path: Path) -> None:
    labelled = load_dataset(str(_digits_jsonl(tmp_path / "a.jsonl", "test")), "pixels")
    pixels, labels = load_split("test")
    assert labelled.labelled and len(labelled) == len(labels)
    np.testing.assert_array_equal(labelled.inputs["pixels"], pixels)
    np.testing.assert_array_equal(labelled.labels, labels)
    bare = load_dataset(str(_digits_jsonl(tmp_path / "b.jsonl", "test", False)), "pixels")
    assert not bare.labelled and set(bare.labels) == {UNLABELLED}


def test_a_folder_of_images_per_class_and_labelled_text(tmp_path: Path) -> None:
    for name, image in (("Egyptian cat", "chelsea"), ("espresso", "coffee")):
        (tmp_path / "images" / name).mkdir(parents=True)
        (tmp_path / "images" / name / f"{image}.jpg").write_bytes(sample(image))
    (tmp_path / "images" / "loose.png").write_bytes(sample("rocket", "PNG"))
    classes = ["tench", "Egyptian cat", "espresso"]
    images = load_dataset(str(tmp_path / "images"), "image", classes)
    assert images.labels.tolist() == [1, 2, UNLABELLED]
    assert images.datatypes == {"image": "BYTES"} and images.inputs["image"][0] == sample("chelsea")

    text = tmp_path / "news.tsv"
    text.write_text("sci.space\tThe shuttle launched.\n2\tA second post\nno label here\n")
    texts = load_dataset(str(text), "text", ["alt.atheism", "sci.space", "misc"])
    assert texts.labels.tolist() == [1, 2, UNLABELLED]
    assert texts.inputs["text"][0] == b"The shuttle launched."


def test_bad_datasets_name_the_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tsv"
    bad.write_text("fine\tok\nunknown-class\ttext\n")
    with pytest.raises(DatasetError, match=r"bad.tsv:2: label 'unknown-class'"):
        load_dataset(str(bad), "text", ["fine"])
    lines = tmp_path / "bad.jsonl"
    lines.write_text('{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32"}]}\n')
    with pytest.raises(DatasetError, match=r"bad.jsonl:1: .*neither data nor binary"):
        load_dataset(str(lines), "x")
    spreadsheet = tmp_path / "data.csv"
    spreadsheet.write_text("a,b\n")
    with pytest.raises(DatasetError, match="unknown format"):
        load_dataset(str(spreadsheet), "x")


# ---------------------------------------------------------------------- calibrate


def test_calibrate_a_route_on_the_users_jsonl(tmp_path: Path) -> None:
    data = _digits_jsonl(tmp_path / "calibration.jsonl", "calibration")
    test = _digits_jsonl(tmp_path / "test.jsonl", "test")
    plot = tmp_path / "curve.png"
    config = tmp_path / "edge.toml"
    result = CliRunner().invoke(
        calibrate_command,
        [
            "digits", "--student", "digits-student", "--teacher", "digits-teacher",
            "--repository", str(REPOSITORY), "--data", str(data), "--test", str(test),
            "--plot", str(plot), "--write", str(config),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "359 rows to choose on, 360 to report on" in result.output
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(plot.with_suffix(".csv").open()))
    chosen = [r for r in rows if r["chosen"] == "1"]
    assert len(chosen) == 1 and len(rows) > 10
    threshold = load_settings(config).routes["digits"].threshold
    assert threshold == pytest.approx(float(chosen[0]["threshold"]), rel=1e-5)
    offloads = [float(r["offload_calibration"]) for r in rows]
    assert offloads == sorted(offloads)  # a higher threshold escalates more


def test_calibrate_the_imagenet_cascade_on_a_folder_of_images(tmp_path: Path) -> None:
    if not images_built():
        pytest.fail("the image models are not built: run `make install` (tether models build)")
    from bench.sample_images import variants

    rng = np.random.default_rng(0)
    import skimage.data

    for label, photo in (("Egyptian cat", "chelsea"), ("espresso", "coffee")):
        folder = tmp_path / "photos" / label
        folder.mkdir(parents=True)
        for i, image in enumerate(variants(getattr(skimage.data, photo)(), 6, rng)):
            image.save(folder / f"{i}.jpg", quality=90)
    result = CliRunner().invoke(
        calibrate_command,
        [
            "imagenet", "--config", "deploy/demo/edge.toml", "--repository", str(REPOSITORY),
            "--data", str(tmp_path / "photos"), "--plot", str(tmp_path / "curve.png"),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"cascade imagenet: {LITE0} (edge) over {LITE2} (cloud)" in result.output
    assert "6 rows to choose on, 6 to report on" in result.output
    assert (tmp_path / "curve.csv").is_file()


# ---------------------------------------------------------------------- distill


def test_distill_a_new_student_version_from_unlabelled_inputs(tmp_path: Path) -> None:
    repository = tmp_path / "repository"
    for name in ("digits-student", "digits-teacher"):
        shutil.copytree(REPOSITORY / name, repository / name)
    data = _digits_jsonl(tmp_path / "unlabelled.jsonl", "calibration", labelled=False)
    result = CliRunner().invoke(
        distill_command,
        [
            "digits-student", "--teacher", "digits-teacher", "--data", str(data),
            "--repository", str(repository), "--epochs", "150",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "tether fleet publish" in result.output
    report = json.loads((repository / "digits-student" / "2" / REPORT_FILE).read_text())
    assert report["layer_sizes"] == [64, 16, 10] and report["accuracy"] is None
    assert report["agreement"] > 0.9

    served = load_model(repository, "digits-student")  # the version policy serves the new one
    assert served.version == "2"
    test = load_dataset("builtin:digits-test", "pixels")
    accuracy = float(np.mean(scores(served, test).argmax(axis=1) == test.labels))
    assert accuracy > 0.9  # never saw a label, still classifies held-out digits
