"""Provenance: rendered as the V2 ``parameters`` every transport sends, and cut per reading
out of a batched cascade answer."""

from __future__ import annotations

import numpy as np

from serving.provenance import Provenance


def escalated() -> Provenance:
    """A cascade batch of three rows whose middle row went to the cloud."""
    return Provenance(
        served_by="cloud",
        route="escalated",
        model="teacher",
        model_version="2",
        edge_model="student",
        edge_version="1",
        confidence=np.array([0.9, 0.5, 0.95]),
        threshold=0.7,
        escalated=np.array([False, True, False]),
        network_ms=3.0,
        cloud_ms=1.23456,
        cloud_worker="cw-1",
        edge_ms=5.0,
        compute_ms=0.5,
    )


def test_a_partly_escalated_batch_renders_its_rows_and_the_edge_model() -> None:
    params = escalated().parameters()
    assert params == {
        "served_by": "cloud",
        "route": "escalated",
        "model": "teacher",
        "model_version": "2",
        "edge_model": "student",
        "confidence": [0.9, 0.5, 0.95],
        "threshold": 0.7,
        "escalated_rows": 1,
        "network_ms": 3.0,
        "cloud_ms": 1.235,
        "edge_ms": 5.0,
        "compute_ms": 0.5,
        "cloud_worker": "cw-1",
    }


def test_a_readings_rows_of_an_escalated_batch_say_who_answered_them() -> None:
    whole = escalated()
    local = whole.rows(0, 1).parameters()
    assert local["route"] == "local" and local["served_by"] == "edge"
    assert local["model"] == "student" and local["model_version"] == "1"
    assert local["confidence"] == 0.9
    assert not {"network_ms", "cloud_ms", "cloud_worker", "edge_model", "escalated_rows"} & set(
        local
    )
    cloud = whole.rows(1, 2).parameters()
    assert cloud["route"] == "escalated" and cloud["served_by"] == "cloud"
    assert cloud["model"] == "teacher" and cloud["escalated_rows"] == 1
    assert cloud["confidence"] == 0.5 and "edge_model" not in cloud  # all its rows escalated
    both = whole.rows(0, 2).parameters()
    assert both["edge_model"] == "student" and both["confidence"] == [0.9, 0.5]
    assert whole.parameters()["escalated_rows"] == 1  # the whole is untouched


def test_a_degraded_batch_keeps_the_cloud_error_only_on_rows_that_needed_the_cloud() -> None:
    degraded = Provenance(
        served_by="edge",
        route="degraded",
        model="student",
        model_version="1",
        confidence=np.array([0.9, 0.5, 0.95]),
        threshold=0.7,
        escalated=np.array([False, True, False]),
        cloud_error="unreachable",
    )
    calm = degraded.rows(2, 3).parameters()
    assert calm["route"] == "local" and "cloud_error" not in calm and calm["model"] == "student"
    needy = degraded.rows(1, 2).parameters()
    assert needy["route"] == "degraded" and needy["cloud_error"] == "unreachable"
    assert needy["escalated_rows"] == 1 and "edge_model" not in needy


def test_a_plain_answer_renders_only_what_is_known() -> None:
    plain = Provenance(route="local", edge_ms=1.0)
    assert plain.rows(1, 2).parameters() == {"served_by": "edge", "route": "local", "edge_ms": 1.0}
    assert Provenance(served_by="cloud", cloud_attempts=1).parameters() == {"served_by": "cloud"}
    assert Provenance(served_by="cloud", cloud_attempts=3).parameters()["cloud_attempts"] == 3
