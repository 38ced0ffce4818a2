"""Per-reading provenance cut out of a batched cascade prediction."""

from __future__ import annotations

import numpy as np

from edge.sensors.results import split_rows
from serving.runtimes.base import Prediction


def cascade(route: str, served_by: str) -> Prediction:
    return Prediction(
        outputs={"p": np.arange(30, dtype=np.float32).reshape(3, 10)},
        model_name="teacher" if served_by == "cloud" else "student",
        model_version="2" if served_by == "cloud" else "1",
        served_by=served_by,
        parameters={
            "route": route,
            "served_by": served_by,
            "model": "teacher" if served_by == "cloud" else "student",
            "model_version": "2" if served_by == "cloud" else "1",
            "confidence": [0.9, 0.5, 0.95],
            "threshold": 0.7,
            "escalated_rows": 1,
            "network_ms": 3.0,
            "edge_model": "student",
        },
    )


def test_escalated_batch_marks_only_low_rows_as_cloud_answers() -> None:
    prediction = cascade("escalated", "cloud")
    outputs, params, version = split_rows(prediction, 0, 1, 3, ("student", "1"))
    assert params["route"] == "local" and params["served_by"] == "edge"
    assert params["model"] == "student" and version == "1" and params["confidence"] == 0.9
    assert "network_ms" not in params and outputs["p"].shape == (1, 10)
    _, params, version = split_rows(prediction, 1, 2, 3, ("student", "1"))
    assert params["route"] == "escalated" and params["served_by"] == "cloud"
    assert params["model"] == "teacher" and version == "2" and params["escalated_rows"] == 1
    assert "edge_model" not in params


def test_degraded_batch_marks_only_low_rows_degraded() -> None:
    prediction = cascade("degraded", "edge")
    prediction.parameters["cloud_error"] = "unreachable"
    _, params, _ = split_rows(prediction, 2, 3, 3, ("student", "1"))
    assert params["route"] == "local" and "cloud_error" not in params
    _, params, _ = split_rows(prediction, 1, 2, 3, ("student", "1"))
    assert params["route"] == "degraded" and params["cloud_error"] == "unreachable"


def test_plain_route_parameters_are_kept() -> None:
    prediction = Prediction(
        outputs={"p": np.zeros((2, 3))},
        model_name="m",
        model_version="1",
        parameters={"route": "local", "served_by": "edge", "edge_ms": 1.0},
    )
    outputs, params, version = split_rows(prediction, 1, 2, 2, None)
    assert params == {"route": "local", "served_by": "edge", "edge_ms": 1.0}
    assert version == "1" and outputs["p"].shape == (1, 3)
