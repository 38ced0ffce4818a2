"""``tether models distill``: a student classification head trained on a teacher's soft labels.

The user brings unlabelled inputs (any format of :mod:`models.datasets`; labels, if any,
are only used to report accuracy). The teacher scores them, the student's own pipeline
turns them into the feature vectors its head takes (an embedding, or the raw tensor), and
a perceptron head is trained on Hinton's loss against the teacher's probabilities at
temperature T. The head is exported to ONNX with the student's input and output names and
written as the next version of the student in the repository, with a ``distill.json``
report beside it, ready for ``tether fleet publish``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

from models.training import MLP, TrainConfig, train_mlp

REPORT_FILE = "distill.json"


@dataclass(frozen=True)
class DistillReport:
    """What a distillation produced and how the new head compares with the teacher."""

    student: str
    teacher: str
    version: str
    rows: int
    layer_sizes: list[int]
    temperature: float
    epochs: int
    #: Share of rows where the new head's top-1 equals the teacher's, on the training data.
    agreement: float
    #: The new head's accuracy on the labelled rows, when there are any.
    accuracy: float | None
    path: str


def current_head(onnx_path: Path) -> tuple[list[int], float]:
    """The hidden widths and input scale of an exported perceptron head (``Gemm`` layers)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    weights = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    gemms = [node for node in model.graph.node if node.op_type == "Gemm"]
    widths = [int(weights[node.input[1]].shape[1]) for node in gemms if node.input[1] in weights]
    scale = weights.get("input_scale")
    return widths[:-1], float(scale.ravel()[0]) if scale is not None else 1.0


def distill(
    repository: Path,
    student_name: str,
    teacher_name: str,
    data_source: str,
    *,
    hidden: list[int] | None = None,
    config: TrainConfig | None = None,
) -> DistillReport:
    """Train a new head for ``student_name`` on ``teacher_name``'s soft labels; write it as
    the student's next version."""
    from models.datasets import load_dataset
    from models.offline import class_names, features, load_model, scores
    from models.onnx_export import to_onnx
    from serving.model_config import list_versions

    config = config or TrainConfig(epochs=100, seed=0, temperature=4.0, alpha=1.0)
    student = load_model(repository, student_name)
    teacher = load_model(repository, teacher_name)
    data = load_dataset(data_source, student.inputs[0].name, class_names(student))
    output = student.outputs[0].name
    teacher_probabilities = scores(teacher, data, output)
    feature_name, x = features(student, data)
    classes = teacher_probabilities.shape[1]
    model_dir = repository / student_name
    previous = model_dir / student.version / "model.onnx"
    widths, scale = current_head(previous) if previous.is_file() else ([], 1.0)
    layer_sizes = [x.shape[1], *(hidden if hidden is not None else widths or [64]), classes]
    head: MLP = train_mlp(
        x,
        teacher_probabilities.argmax(axis=1),
        layer_sizes,
        config,
        teacher_logits=np.log(np.clip(teacher_probabilities, 1e-12, 1.0)),
        input_scale=scale,
    )
    predicted = head.logits(x).argmax(axis=1)
    agreement = float(np.mean(predicted == teacher_probabilities.argmax(axis=1)))
    known = data.labels >= 0
    accuracy = float(np.mean(predicted[known] == data.labels[known])) if known.any() else None

    version = str(max(list_versions(model_dir)) + 1)
    target = model_dir / version / "model.onnx"
    target.parent.mkdir(parents=True)
    proto = to_onnx(
        head,
        graph_name=student_name.replace("-", "_"),
        doc=f"{student_name}: head distilled from {teacher_name}",
        input_name=feature_name,
        output_name=output,
    )
    target.write_bytes(proto.SerializeToString())
    report = DistillReport(
        student=student_name,
        teacher=teacher_name,
        version=version,
        rows=len(data),
        layer_sizes=layer_sizes,
        temperature=config.temperature,
        epochs=config.epochs,
        agreement=round(agreement, 4),
        accuracy=None if accuracy is None else round(accuracy, 4),
        path=str(target),
    )
    body: dict[str, Any] = {**asdict(report), "data": data_source}
    (target.parent / REPORT_FILE).write_text(json.dumps(body, indent=2) + "\n")
    return report


@click.command("distill")
@click.argument("student")
@click.option("--teacher", required=True, help="The model whose soft labels the head learns.")
@click.option(
    "--data",
    "data_source",
    required=True,
    help="Unlabelled (or labelled) inputs: a .jsonl of V2 requests, a folder of images, a "
    ".tsv of [label<TAB>]text lines, or builtin:digits.",
)
@click.option(
    "--repository",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=Path("models/repository"),
    show_default=True,
)
@click.option(
    "--hidden",
    help="Hidden widths, comma-separated (default: the current head's; '' for none).",
)
@click.option("--epochs", type=click.IntRange(1), default=100, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0.1), default=4.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def distill_command(
    student: str,
    teacher: str,
    data_source: str,
    repository: Path,
    hidden: str | None,
    epochs: int,
    temperature: float,
    seed: int,
) -> None:
    """Train STUDENT's classification head on TEACHER's soft labels; write its next version."""
    from models.datasets import DatasetError

    widths = None if hidden is None else [int(w) for w in hidden.split(",") if w.strip()]
    training = TrainConfig(epochs=epochs, seed=seed, temperature=temperature, alpha=1.0)
    try:
        report = distill(repository, student, teacher, data_source, hidden=widths, config=training)
    except (DatasetError, FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(
        f"{student} version {report.version}: head {'-'.join(map(str, report.layer_sizes))} "
        f"trained on {report.rows} rows of {teacher}'s soft labels (T={temperature:g})"
    )
    click.echo(f"agreement with {teacher} on the data: {report.agreement:.2%}")
    if report.accuracy is not None:
        click.echo(f"accuracy on the labelled rows: {report.accuracy:.2%}")
    click.echo(f"wrote {report.path}; publish it with:")
    click.echo(f"  tether fleet publish {Path(report.path).parent}")
