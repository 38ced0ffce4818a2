"""The model build: data splits, trainer, ONNX export, repository files and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from pytest_mock import MockerFixture

from models.build import (
    STUDENT_NAME,
    TEACHER_NAME,
    VERSION,
    BuildReport,
    build,
    build_command,
)
from models.cli import models_group
from models.digits import SplitName, load_split
from models.training import MLP, TrainConfig, _gradients, softmax, train_mlp
from serving.model_config import load_model_config
from serving.runtimes.flops import count_flops

COMMITTED = Path(__file__).resolve().parents[2] / "models" / "repository"
NAMES = (TEACHER_NAME, STUDENT_NAME)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, BuildReport]:
    out = tmp_path_factory.mktemp("repository")
    return out, build(out, quiet=True)


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


# -- data -----------------------------------------------------------------------------------


def test_splits_are_fixed_stratified_and_disjoint() -> None:
    sizes = {}
    names: tuple[SplitName, ...] = ("train", "calibration", "test")
    for name in names:
        x, y = load_split(name)
        assert x.dtype == np.float32 and x.shape[1] == 64
        assert y.dtype == np.int64 and len(y) == len(x)
        assert x.min() >= 0.0 and x.max() <= 16.0
        assert set(np.unique(y)) == set(range(10))
        sizes[name] = len(x)
    assert sizes == {"train": 1078, "calibration": 359, "test": 360}
    assert sum(sizes.values()) == 1797  # the whole of load_digits, each row once
    test, _ = load_split("test")
    again, _ = load_split("test")
    np.testing.assert_array_equal(test, again)
    again[0, 0] = -1  # callers get copies
    assert load_split("test")[0][0, 0] != -1


def test_unknown_split_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown split"):
        load_split("validation")  # type: ignore[arg-type]


# -- trainer --------------------------------------------------------------------------------


def _loss(
    model: MLP, x: np.ndarray, onehot: np.ndarray, cfg: TrainConfig, soft: np.ndarray
) -> float:
    logits = model.logits(x)
    t = cfg.temperature
    q_t = softmax(logits, t)
    kl = np.sum(soft * (np.log(soft) - np.log(q_t)), axis=1)
    ce = -np.sum(onehot * np.log(softmax(logits)), axis=1)
    return float(np.mean(cfg.alpha * t * t * kl + (1 - cfg.alpha) * ce))


def test_distillation_gradients_match_finite_differences() -> None:
    rng = np.random.default_rng(3)
    model = MLP(
        weights=[rng.normal(size=(6, 5)), rng.normal(size=(5, 4))],
        biases=[rng.normal(size=5), rng.normal(size=4)],
    )
    x = rng.uniform(0, 16, size=(7, 6))
    onehot = np.eye(4)[rng.integers(0, 4, size=7)]
    cfg = TrainConfig(temperature=3.0, alpha=0.7)
    soft = softmax(rng.normal(size=(7, 4)) * 3, cfg.temperature)
    grads = _gradients(model, x, onehot, cfg, soft)
    params = [*model.weights, *model.biases]
    for param, grad in zip(params, grads, strict=True):
        numeric = np.zeros_like(param)
        for idx in np.ndindex(param.shape):
            old = param[idx]
            param[idx] = old + 1e-6
            up = _loss(model, x, onehot, cfg, soft)
            param[idx] = old - 1e-6
            down = _loss(model, x, onehot, cfg, soft)
            param[idx] = old
            numeric[idx] = (up - down) / 2e-6
        np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-7)


def test_training_is_deterministic() -> None:
    x, y = load_split("train")
    cfg = TrainConfig(epochs=2, seed=5)
    a = train_mlp(x[:200], y[:200], [64, 8, 10], cfg)
    b = train_mlp(x[:200], y[:200], [64, 8, 10], cfg)
    for wa, wb in zip(a.weights + a.biases, b.weights + b.biases, strict=True):
        assert wa.dtype == np.float32
        np.testing.assert_array_equal(wa, wb)


# -- the build ------------------------------------------------------------------------------


def test_models_reach_their_accuracy_and_cost_targets(built: tuple[Path, BuildReport]) -> None:
    _, report = built
    assert report.teacher.accuracy >= 0.97
    assert report.student.accuracy >= 0.95
    assert report.hard_label_accuracy >= 0.93
    assert report.flops_ratio >= 20
    assert report.student.params < report.teacher.params


def test_distilled_student_beats_the_hard_label_student(built: tuple[Path, BuildReport]) -> None:
    _, report = built
    assert report.student.accuracy > report.hard_label_accuracy
    assert report.student.layer_sizes == tuple(report.trained.hard_student.layer_sizes)


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_onnx_matches_the_numpy_forward(built: tuple[Path, BuildReport], role: str) -> None:
    out, report = built
    model = report.trained.teacher if role == "teacher" else report.trained.student
    name = TEACHER_NAME if role == "teacher" else STUDENT_NAME
    session = _session(out / name / VERSION / "model.onnx")
    x, y = load_split("test")
    (probs,) = session.run(["probabilities"], {"pixels": x})
    assert probs.dtype == np.float32 and probs.shape == (len(x), 10)
    np.testing.assert_allclose(probs, model.predict_proba(x), atol=1e-5)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    accuracy = getattr(report, role).accuracy
    assert float(np.mean(probs.argmax(axis=1) == y)) == pytest.approx(accuracy)


def test_onnx_graph_has_the_serving_contract(built: tuple[Path, BuildReport]) -> None:
    import onnx

    out, _ = built
    for name in NAMES:
        path = out / name / VERSION / "model.onnx"
        proto = onnx.load(str(path))
        assert path.stat().st_size < 1_000_000
        ops = [n.op_type for n in proto.graph.node]
        assert ops[0] == "Mul" and ops[-1] == "Softmax" and "Gemm" in ops
        (inp,) = proto.graph.input
        (outp,) = proto.graph.output
        assert inp.name == "pixels" and outp.name == "probabilities"
        dims = inp.type.tensor_type.shape.dim
        assert dims[0].dim_param == "batch" and dims[1].dim_value == 64
        batch = _session(path).run(None, {"pixels": np.zeros((3, 64), np.float32)})[0]
        assert batch.shape == (3, 10)


def test_configs_parse_and_record_the_build(built: tuple[Path, BuildReport]) -> None:
    out, report = built
    for name, model in ((TEACHER_NAME, report.teacher), (STUDENT_NAME, report.student)):
        config = load_model_config(out / name)
        assert config.name == name
        assert config.platform == "onnxruntime_onnx"
        assert config.max_batch_size == 256
        assert [(t.name, t.datatype, t.dims) for t in config.input] == [("pixels", "FP32", [64])]
        assert [(t.name, t.datatype, t.dims) for t in config.output] == [
            ("probabilities", "FP32", [10])
        ]
        params = config.parameters
        assert params["role"] == model.role
        assert params["accuracy"] == round(model.accuracy, 4)
        assert params["params"] == model.params
        assert params["flops"] == model.flops == count_flops(model.path)
        assert params["dataset"] == "sklearn load_digits, seed 0"
    student = load_model_config(out / STUDENT_NAME).parameters
    assert student["teacher"] == TEACHER_NAME
    assert student["hard_label_accuracy"] == round(report.hard_label_accuracy, 4)
    assert student["temperature"] == report.temperature


def test_committed_repository_equals_a_fresh_build(built: tuple[Path, BuildReport]) -> None:
    """The committed files are what the build makes (training is deterministic)."""
    out, _ = built
    for name in NAMES:
        for rel in (Path("config.json"), Path(VERSION) / "model.onnx"):
            fresh = (out / name / rel).read_bytes()
            committed = (COMMITTED / name / rel).read_bytes()
            assert fresh == committed, (
                f"{name}/{rel} differs from a fresh build: run `tether models build --force` "
                "and commit the result"
            )


@pytest.mark.parametrize("name", NAMES)
def test_committed_models_score_what_their_configs_say(name: str) -> None:
    config = load_model_config(COMMITTED / name)
    x, y = load_split("test")
    (probs,) = _session(COMMITTED / name / VERSION / "model.onnx").run(None, {"pixels": x})
    accuracy = float(np.mean(probs.argmax(axis=1) == y))
    assert round(accuracy, 4) == config.parameters["accuracy"]
    assert count_flops(COMMITTED / name / VERSION / "model.onnx") == config.parameters["flops"]


# -- the CLI --------------------------------------------------------------------------------


def test_build_command_skips_an_existing_repository(built: tuple[Path, BuildReport]) -> None:
    out, _ = built
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    result = CliRunner().invoke(build_command, ["--output", str(out), "--only", "digits"])
    assert result.exit_code == 0, result.output
    assert "skipping" in result.output
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_build_command_builds_with_force(tmp_path: Path, mocker: MockerFixture) -> None:
    fake = mocker.patch("models.build.build")
    (tmp_path / TEACHER_NAME / VERSION).mkdir(parents=True)
    (tmp_path / TEACHER_NAME / VERSION / "model.onnx").write_bytes(b"x")
    result = CliRunner().invoke(build_command, ["--output", str(tmp_path), "--only", "digits"])
    assert result.exit_code == 0, result.output
    fake.assert_called_once_with(tmp_path)  # the student is missing: build
    fake.reset_mock()
    (tmp_path / STUDENT_NAME / VERSION).mkdir(parents=True)
    (tmp_path / STUDENT_NAME / VERSION / "model.onnx").write_bytes(b"x")
    result = CliRunner().invoke(
        build_command, ["--output", str(tmp_path), "--force", "--only", "digits"]
    )
    assert result.exit_code == 0, result.output
    fake.assert_called_once_with(tmp_path)


def test_models_group_holds_build_and_build_engine() -> None:
    assert set(models_group.commands) == {"build", "build-engine", "distill"}


def test_build_engine_without_tensorrt_says_so(mocker: MockerFixture) -> None:
    import sys

    mocker.patch.dict(sys.modules, {"tensorrt": None})
    result = CliRunner().invoke(
        models_group, ["build-engine", STUDENT_NAME, "--repository", str(COMMITTED),
                       "--cache-dir", "/tmp/unused-engines"],
    )  # fmt: skip
    assert result.exit_code != 0
    assert "tensorrt" in result.output


def test_serving_imports_do_not_need_sklearn() -> None:
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['sklearn'] = None\n"
        "import models.build, models.cli, models.training, models.onnx_export, models.digits\n"
        "import serving.runtimes.flops, serving.runtimes.tensorrt, serving.runtimes.tensorrt_engine\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_config_json_is_plain_data(built: tuple[Path, BuildReport]) -> None:
    out, _ = built
    raw = json.loads((out / STUDENT_NAME / "config.json").read_text())
    assert list(raw) == [
        "name", "platform", "max_batch_size", "input", "output", "version_policy", "parameters"
    ]  # fmt: skip
    assert raw["version_policy"] == {"latest": {"num_versions": 1}}
