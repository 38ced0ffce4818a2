"""Cascade calibration: the confidence threshold that reaches a target at the least offload.

A cascade answers on the device when the student's confidence is at least the threshold
and escalates to the teacher otherwise. On a held-out labelled split this module scores
every threshold that changes the outcome (accuracy, agreement with the teacher, offload =
share of rows escalated), picks the lowest-offload one that reaches the target — a share
of the teacher's accuracy, or of agreement with the teacher — and reports the same
threshold on an untouched test split, so the figure quoted is not the one tuned on.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from serving.confidence import confidence

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

Objective = Literal["accuracy", "agreement"]


@dataclass(frozen=True)
class CurvePoint:
    """The cascade at one threshold on one split."""

    threshold: float
    offload: float
    accuracy: float
    agreement: float


@dataclass(frozen=True)
class SplitScores:
    """What calibration needs from one split: both models' scores and the labels."""

    student: np.ndarray
    teacher: np.ndarray
    labels: np.ndarray

    @property
    def student_accuracy(self) -> float:
        return float(np.mean(self.student.argmax(axis=1) == self.labels))

    @property
    def teacher_accuracy(self) -> float:
        return float(np.mean(self.teacher.argmax(axis=1) == self.labels))


def evaluate(scores: SplitScores, measure: str, threshold: float) -> CurvePoint:
    """The cascade's accuracy, teacher agreement and offload at ``threshold``."""
    conf = confidence(scores.student, measure)
    escalate = conf < threshold
    student = scores.student.argmax(axis=1)
    teacher = scores.teacher.argmax(axis=1)
    answer = np.where(escalate, teacher, student)
    return CurvePoint(
        threshold=float(threshold),
        offload=float(escalate.mean()),
        accuracy=float(np.mean(answer == scores.labels)),
        agreement=float(np.mean(answer == teacher)),
    )


def candidate_thresholds(scores: SplitScores, measure: str) -> list[float]:
    """Every threshold that changes which rows escalate: 0, each distinct confidence, >1."""
    conf = np.unique(confidence(scores.student, measure))
    return [0.0, *(float(c) for c in conf if c > 0.0), float(np.nextafter(conf.max(), 2.0))]


def curve(scores: SplitScores, measure: str, thresholds: Sequence[float]) -> list[CurvePoint]:
    """The cascade at each threshold."""
    return [evaluate(scores, measure, t) for t in thresholds]


def meets(point: CurvePoint, objective: Objective, target: float, teacher_accuracy: float) -> bool:
    """Whether a point reaches ``target`` (a share of the teacher's accuracy, or agreement)."""
    if objective == "agreement":
        return point.agreement >= target - 1e-12
    return point.accuracy >= target * teacher_accuracy - 1e-12


def choose_threshold(
    scores: SplitScores, measure: str, objective: Objective = "accuracy", target: float = 0.995
) -> CurvePoint:
    """The least-offload point that reaches the target (ties: the lowest threshold)."""
    points = curve(scores, measure, candidate_thresholds(scores, measure))
    good = [p for p in points if meets(p, objective, target, scores.teacher_accuracy)]
    if not good:  # escalating everything always reaches agreement 1 and the teacher's accuracy
        return points[-1]
    return min(good, key=lambda p: (p.offload, p.threshold))


@dataclass(frozen=True)
class Calibration:
    """The result: the chosen threshold and both splits' curves."""

    measure: str
    objective: Objective
    target: float
    chosen: CurvePoint
    test: CurvePoint
    calibration_scores: SplitScores
    test_scores: SplitScores

    def table_thresholds(self, steps: int = 10) -> list[float]:
        """Thresholds for the report: the calibration split's offload quantiles + the chosen."""
        conf = np.sort(confidence(self.calibration_scores.student, self.measure))
        picks = {0.0, self.chosen.threshold}
        for i in range(1, steps):
            picks.add(float(conf[min(len(conf) - 1, round(i * len(conf) / steps))]))
        picks.add(float(np.nextafter(conf.max(), 2.0)))
        return sorted(picks)


def calibrate(
    calibration: SplitScores,
    test: SplitScores,
    *,
    measure: str = "max_probability",
    objective: Objective = "accuracy",
    target: float = 0.995,
) -> Calibration:
    """Choose the threshold on ``calibration``; report it on ``test``."""
    chosen = choose_threshold(calibration, measure, objective, target)
    return Calibration(
        measure=measure,
        objective=objective,
        target=target,
        chosen=chosen,
        test=evaluate(test, measure, chosen.threshold),
        calibration_scores=calibration,
        test_scores=test,
    )


def run_onnx(path: Path, inputs: np.ndarray, input_name: str | None = None) -> np.ndarray:
    """A model's first output on ``inputs`` with ONNX Runtime on the CPU."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = input_name or session.get_inputs()[0].name
    return np.asarray(session.run(None, {name: inputs})[0])


def format_table(result: Calibration) -> str:
    """The accuracy-versus-offload curve as a Markdown table (calibration and test splits)."""
    lines = [
        "| threshold | offload (cal) | accuracy (cal) | offload (test) | accuracy (test) "
        "| agreement (test) | |",
        "|---:|---:|---:|---:|---:|---:|:--|",
    ]
    for t in result.table_thresholds():
        cal = evaluate(result.calibration_scores, result.measure, t)
        test = evaluate(result.test_scores, result.measure, t)
        mark = "**chosen**" if t == result.chosen.threshold else ""
        shown = "∞" if t > 1.0 else f"{t:.4f}"
        lines.append(
            f"| {shown} | {cal.offload:.1%} | {cal.accuracy:.2%} | {test.offload:.1%} "
            f"| {test.accuracy:.2%} | {test.agreement:.2%} | {mark} |"
        )
    return "\n".join(lines)


def summary(result: Calibration) -> str:
    """Headline figures: models' accuracies, the chosen threshold, its test-split result."""
    test = result.test_scores
    ratio = result.test.accuracy / test.teacher_accuracy if test.teacher_accuracy else 0.0
    return (
        f"measure {result.measure}, objective {result.objective} >= {result.target:.3f}\n"
        f"teacher accuracy (test) {test.teacher_accuracy:.2%}, "
        f"student accuracy (test) {test.student_accuracy:.2%}\n"
        f"chosen threshold {result.chosen.threshold:.4f}: calibration offload "
        f"{result.chosen.offload:.1%}, accuracy {result.chosen.accuracy:.2%}\n"
        f"on the test split: offload {result.test.offload:.1%}, accuracy "
        f"{result.test.accuracy:.2%} ({ratio:.2%} of the teacher's), agreement "
        f"{result.test.agreement:.2%}"
    )


def write_csv(result: Calibration, path: Path) -> Path:
    """The curve as CSV: every threshold that changes the calibration split's outcome, with
    offload, accuracy and agreement on both splits (``chosen`` marks the pick)."""
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    thresholds = candidate_thresholds(result.calibration_scores, result.measure)
    with path.open("w", newline="") as stream:
        out = csv.writer(stream)
        out.writerow(
            [
                "threshold",
                "offload_calibration",
                "accuracy_calibration",
                "agreement_calibration",
                "offload_test",
                "accuracy_test",
                "agreement_test",
                "chosen",
            ]
        )
        for t in thresholds:
            cal = evaluate(result.calibration_scores, result.measure, t)
            test = evaluate(result.test_scores, result.measure, t)
            out.writerow(
                [
                    f"{t:.6g}",
                    f"{cal.offload:.6f}",
                    f"{cal.accuracy:.6f}",
                    f"{cal.agreement:.6f}",
                    f"{test.offload:.6f}",
                    f"{test.accuracy:.6f}",
                    f"{test.agreement:.6f}",
                    int(t == result.chosen.threshold),
                ]
            )
    return path


def plot(result: Calibration, path: Path) -> Path:
    """Accuracy versus offload on both splits, with the chosen point, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for name, scores in (("calibration", result.calibration_scores), ("test", result.test_scores)):
        points = curve(scores, result.measure, candidate_thresholds(scores, result.measure))
        ax.plot([p.offload for p in points], [p.accuracy for p in points], label=name)
    test = result.test_scores
    ax.axhline(test.teacher_accuracy, color="grey", linestyle="--", label="teacher (test)")
    if result.objective == "accuracy":  # an agreement target is not a level of accuracy
        ax.axhline(
            result.target * test.teacher_accuracy,
            color="grey",
            linestyle=":",
            label=f"{result.target:.1%} of teacher",
        )
    ax.scatter([result.test.offload], [result.test.accuracy], color="red", zorder=3)
    ax.annotate(
        f"threshold {result.chosen.threshold:.3f}",
        (result.test.offload, result.test.accuracy),
        textcoords="offset points",
        xytext=(8, -14),
    )
    ax.set_xlabel("offload (share of requests escalated to the cloud)")
    ax.set_ylabel("cascade accuracy")
    ax.set_title(f"Cascade accuracy vs offload ({result.measure})")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


_SECTION = re.compile(r"^\s*\[(?P<name>[^\[\]]+)\]\s*(#.*)?$")


def write_threshold(
    config: Path,
    route: str,
    threshold: float,
    *,
    measure: str,
    local_model: str,
    cloud_model: str,
) -> None:
    """Set ``routes.<route>.threshold`` (and ``confidence``) in a TOML file, keeping the rest.

    A missing section is appended as a cascade route. The result is parsed back to check it.
    """
    text = config.read_text() if config.exists() else ""
    lines = text.splitlines()
    start = next(
        (
            i
            for i, line in enumerate(lines)
            if (m := _SECTION.match(line))
            and m["name"].strip() in (f"routes.{route}", f'routes."{route}"')
        ),
        None,
    )
    values = {"threshold": repr(float(threshold)), "confidence": f'"{measure}"'}
    if start is None:
        block = [
            "",
            f'[routes."{route}"]',
            'mode = "cascade"',
            f'local_model = "{local_model}"',
            f'cloud_model = "{cloud_model}"',
            *(f"{key} = {value}" for key, value in values.items()),
        ]
        lines = [*lines, *block]
    else:
        end = next(
            (i for i in range(start + 1, len(lines)) if _SECTION.match(lines[i])), len(lines)
        )
        for key, value in values.items():
            pattern = re.compile(rf"^\s*{key}\s*=")
            found = next((i for i in range(start + 1, end) if pattern.match(lines[i])), None)
            if found is None:
                lines.insert(start + 1, f"{key} = {value}")
                end += 1
            else:
                lines[found] = f"{key} = {value}"
    new_text = "\n".join(lines) + "\n"
    tomllib.loads(new_text)
    config.write_text(new_text)
