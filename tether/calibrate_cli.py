"""``tether calibrate ROUTE``: choose a cascade's confidence threshold from the user's data.

The route's student and teacher are loaded from the repository the way the server loads
them (their pipelines included) and scored on a labelled dataset in one of the formats of
:mod:`models.datasets`. The threshold is chosen on one part of the data and reported on
another (``--test FILE``, or a held-out share of ``--data``), and the curve is written as a
PNG and a CSV. Without ``--data`` the route is calibrated on the digits splits.

Unlabelled data calibrates for agreement with the teacher: the teacher's answers stand in
for the labels, so "accuracy" reads as agreement.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, cast

import click
import numpy as np

from serving.confidence import MEASURES


@click.command("calibrate")
@click.argument("route")
@click.option(
    "--data",
    help="Labelled data: a .jsonl of V2 requests (label in parameters.label), a folder of "
    "images per class, or a .tsv of label<TAB>text lines (default: builtin:digits).",
)
@click.option(
    "--test",
    "test_data",
    help="Data to report the chosen threshold on (default: a held-out share of --data).",
)
@click.option(
    "--holdout",
    type=click.FloatRange(0.05, 0.95),
    default=0.5,
    show_default=True,
    help="Share of --data held out for the report when --test is not given.",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Edge TOML settings; ROUTE's cascade route there names the student and teacher.",
)
@click.option(
    "--repository",
    type=click.Path(path_type=Path, file_okay=False),
    help="Model repository folder (default: the config's, else models/repository).",
)
@click.option("--student", help="Edge model (default: the route's, else ROUTE-student).")
@click.option("--teacher", help="Cloud model (default: the route's, else ROUTE-teacher).")
@click.option(
    "--measure",
    type=click.Choice(MEASURES),
    help="Confidence measure (default: the route's, else max_probability).",
)
@click.option(
    "--objective",
    type=click.Choice(["accuracy", "agreement"]),
    default=None,
    help="Reach a share of the teacher's accuracy, or agreement with the teacher "
    "[default: accuracy; agreement for unlabelled data].",
)
@click.option(
    "--target",
    type=click.FloatRange(0.0, 1.0),
    default=0.995,
    show_default=True,
    help="Share of the teacher's accuracy (or agreement) to reach.",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=Path("docs/routing-curve.png"),
    show_default=True,
    help="Where to write the accuracy-versus-offload plot (PNG).",
)
@click.option(
    "--csv",
    "csv_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Where to write the curve as CSV (default: the plot's path with .csv).",
)
@click.option(
    "--write",
    "write_config",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write the chosen threshold into this TOML config's [routes.ROUTE].",
)
def calibrate_command(
    route: str,
    data: str | None,
    test_data: str | None,
    holdout: float,
    config_file: Path | None,
    repository: Path | None,
    student: str | None,
    teacher: str | None,
    measure: str | None,
    objective: str | None,
    target: float,
    plot_path: Path,
    csv_path: Path | None,
    write_config: Path | None,
) -> None:
    """Choose ROUTE's cascade threshold on held-out data; report it on other data."""
    from edge.settings import load_settings
    from models.datasets import Dataset, DatasetError, load_dataset
    from models.offline import class_names, load_model, scores
    from serving.calibration import SplitScores, calibrate, format_table, plot, summary, write_csv

    try:
        settings = load_settings(config_file, repository=repository)
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    routed = settings.routes.get(route)
    student = student or (routed.local_model if routed else None) or f"{route}-student"
    teacher = teacher or (routed.cloud_model if routed else None) or f"{route}-teacher"
    measure = measure or (routed.confidence if routed else "max_probability")
    output = routed.confidence_output if routed else None
    try:
        models = [load_model(settings.repository, name) for name in (student, teacher)]
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    input_name = models[0].inputs[0].name
    names = class_names(models[0])
    try:
        if data is None:
            calibration = load_dataset("builtin:digits", input_name)
            test = load_dataset("builtin:digits-test", input_name)
        else:
            calibration = load_dataset(data, input_name, names)
            if test_data is not None:
                test = load_dataset(test_data, input_name, names)
            else:
                calibration, test = calibration.split(1.0 - holdout)
    except DatasetError as exc:
        raise click.ClickException(str(exc)) from exc
    labelled = calibration.labelled and test.labelled
    goal = cast(Literal["accuracy", "agreement"], objective or "accuracy")
    if not labelled:
        if objective == "accuracy":
            raise click.ClickException("the data has unlabelled rows: use --objective agreement")
        goal = "agreement"

    def split_scores(part: Dataset) -> SplitScores:
        student_scores = scores(models[0], part, output)
        teacher_scores = scores(models[1], part, output)
        labels = part.labels if labelled else teacher_scores.argmax(axis=1)
        return SplitScores(student_scores, teacher_scores, np.asarray(labels))

    result = calibrate(
        split_scores(calibration),
        split_scores(test),
        measure=measure,
        objective=goal,
        target=target,
    )
    click.echo(f"cascade {route}: {student} (edge) over {teacher} (cloud)")
    click.echo(f"data: {len(calibration)} rows to choose on, {len(test)} to report on")
    if not labelled:
        click.echo("no labels: the teacher's answers stand in, so accuracy reads as agreement")
    click.echo(summary(result))
    click.echo("")
    click.echo(format_table(result))
    click.echo(f"\nplot written to {plot(result, plot_path)}")
    click.echo(f"curve written to {write_csv(result, csv_path or plot_path.with_suffix('.csv'))}")
    if write_config is not None:
        from serving.calibration import write_threshold

        write_threshold(
            write_config,
            route,
            result.chosen.threshold,
            measure=measure,
            local_model=student,
            cloud_model=teacher,
        )
        click.echo(f"threshold {result.chosen.threshold:.6g} written to {write_config}")
