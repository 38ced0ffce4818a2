"""``tether status`` summarises what the agent's metrics say."""

from __future__ import annotations

from flask import Flask

from edge.status import Scrape, bar, render_bridge, render_edge


def test_status_reports_models_traffic_and_offload(app: Flask) -> None:
    client = app.test_client()
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    for _ in range(3):
        assert client.post("/v2/models/dense/infer", json=body).status_code == 200
    client.post("/v2/models/dense/infer", json={"inputs": []})
    text = "\n".join(render_edge(Scrape.parse(client.get("/metrics").data.decode())))
    assert "dense                    v2    CPUExecutionProvider" in text
    assert "requests answered   3  (edge 3, cloud 0)" in text
    assert "failed              1" in text
    assert "offload to cloud    [------------------------]   0%" in text
    assert "circuit breaker     closed" in text


def test_bar_and_bridge_section() -> None:
    assert bar(0.5, width=10) == "[#####-----]  50%"
    assert bar(2.0, width=4) == "[####] 100%"
    scrape = Scrape.parse("tether_sensor_outbox_depth 7\ntether_sensor_messages_in_total 12\n")
    text = "\n".join(render_bridge(scrape))
    assert "outbox_depth" in text and "7.00" in text
    assert "(no sensor metrics)" in "\n".join(render_bridge(Scrape.parse("")))
