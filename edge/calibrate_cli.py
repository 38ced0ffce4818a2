"""``tether calibrate MODEL``: choose a cascade's confidence threshold from held-out data."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, cast

import click

from edge.confidence import MEASURES


@click.command("calibrate")
@click.argument("model")
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Edge TOML settings; MODEL's cascade route there names the student and teacher.",
)
@click.option(
    "--repository",
    type=click.Path(path_type=Path, file_okay=False),
    help="Model repository folder (default: the config's, else models/repository).",
)
@click.option("--student", help="Edge model (default: the route's, else MODEL-student).")
@click.option("--teacher", help="Cloud model (default: the route's, else MODEL-teacher).")
@click.option(
    "--measure",
    type=click.Choice(MEASURES),
    help="Confidence measure (default: the route's, else max_probability).",
)
@click.option(
    "--objective",
    type=click.Choice(["accuracy", "agreement"]),
    default="accuracy",
    show_default=True,
    help="Reach a share of the teacher's accuracy, or agreement with the teacher.",
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
    "--write",
    "write_config",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write the chosen threshold into this TOML config's [routes.MODEL].",
)
def calibrate_command(
    model: str,
    config_file: Path | None,
    repository: Path | None,
    student: str | None,
    teacher: str | None,
    measure: str | None,
    objective: str,
    target: float,
    plot_path: Path,
    write_config: Path | None,
) -> None:
    """Choose MODEL's cascade threshold on the digits calibration split; report on test."""
    from edge.calibration import SplitScores, calibrate, format_table, plot, run_onnx, summary
    from edge.model_config import load_model_config
    from edge.settings import load_settings
    from models.digits import load_split

    try:
        settings = load_settings(config_file, repository=repository)
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    route = settings.routes.get(model)
    student = student or (route.local_model if route else None) or f"{model}-student"
    teacher = teacher or (route.cloud_model if route else None) or f"{model}-teacher"
    measure = measure or (route.confidence if route else "max_probability")

    def model_path(name: str) -> Path:
        folder = settings.repository / name
        versions = sorted(
            (int(d.name) for d in folder.glob("*") if d.is_dir() and d.name.isdigit()),
        )
        if not versions:
            raise click.ClickException(f"no model {name!r} in {settings.repository}")
        filename = load_model_config(folder).model_filename
        return folder / str(versions[-1]) / filename

    paths = model_path(student), model_path(teacher)

    def scores(split: Literal["calibration", "test"]) -> SplitScores:
        pixels, labels = load_split(split)
        return SplitScores(run_onnx(paths[0], pixels), run_onnx(paths[1], pixels), labels)

    result = calibrate(
        scores("calibration"),
        scores("test"),
        measure=measure,
        objective=cast(Literal["accuracy", "agreement"], objective),
        target=target,
    )
    click.echo(f"cascade {model}: {student} (edge) over {teacher} (cloud)")
    click.echo(summary(result))
    click.echo("")
    click.echo(format_table(result))
    click.echo(f"\nplot written to {plot(result, plot_path)}")
    if write_config is not None:
        from edge.calibration import write_threshold

        write_threshold(
            write_config,
            model,
            result.chosen.threshold,
            measure=measure,
            local_model=student,
            cloud_model=teacher,
        )
        click.echo(f"threshold {result.chosen.threshold:.6g} written to {write_config}")
