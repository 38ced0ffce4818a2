"""Image models benchmark (run by hand, not in CI): ``python bench/images.py``.

Measures, in one run on one machine, with the baseline in the same run:

1. EfficientNet-Lite0 with JPEG input (scikit-image's ``chelsea``, 451 x 300, 35 kB):
   images/s and p50 through a real ``tether edge`` (V2 binary ``BYTES``, the labels output)
   vs a minimal Flask + onnxruntime + Pillow app as users write it (the JPEG as the raw body,
   the same decode/resize/crop/normalise, top-5 labels in JSON) on gunicorn 2 x 4 threads;
   ``wrk`` at concurrency 1 and 8, median of ``--runs`` runs;
2. bytes on the uplink per escalation: the request envelope with the encoded image (what
   Tether sends) vs with the FP32 tensor Lite0 or Lite2 takes, and one real escalation
   through the ``imagenet`` cascade seen on the broker;
3. cloud batching on EfficientNet-Lite2: a ``tether cloud`` process without batching vs with
   dynamic batching (max 32), 32 requests in flight from one uplink, images/s;
4. the edge agent's memory (RSS and PSS of its processes) serving EfficientNet-Lite0 and minilm-l6.

Writes a Markdown table to stdout and ``bench/results/images.md``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.edge_http import GUNICORN, WRK_SCRIPT, Result, median_of, memory_of, wrk  # noqa: E402
from bench.fallback import CloudProcess, closed_loop  # noqa: E402
from edge.settings import UplinkSettings  # noqa: E402
from edge.uplink import Uplink  # noqa: E402
from harness.agent_process import AgentProcess  # noqa: E402
from harness.broker import Broker, free_port, wait_for_port  # noqa: E402
from harness.images import LITE0, LITE2, REPOSITORY, sample  # noqa: E402
from shared.codec import build_request, encode_request  # noqa: E402
from shared.envelopes import InferRequestEnvelope, frame  # noqa: E402
from shared.mqtt import Message, MqttClient  # noqa: E402
from shared.protocol import InferenceRequest  # noqa: E402

MINIMAL_APP = """
import io, json
import numpy as np
import onnxruntime as ort
from flask import Flask, jsonify, request
from PIL import Image

app = Flask(__name__)
session = ort.InferenceSession({model!r}, providers=["CPUExecutionProvider"])
labels = open({labels!r}).read().splitlines()


@app.post("/classify")
def classify():
    image = Image.open(io.BytesIO(request.get_data())).convert("RGB")
    scale = 256 / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)))
    left, top = (image.width - 224) // 2, (image.height - 224) // 2
    image = image.crop((left, top, left + 224, top + 224))
    x = (np.asarray(image, dtype=np.float32) - 127.0) / 128.0
    probabilities = session.run(None, {{"input": x.transpose(2, 0, 1)[None]}})[0][0]
    best = np.argsort(-probabilities)[:5]
    return jsonify({{"labels": [labels[i] for i in best],
                     "probabilities": [float(probabilities[i]) for i in best]}})
"""


def images(*items: bytes) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    array[:] = list(items)
    return array


def throughput(workdir: Path, seconds: float, runs: int) -> list[tuple[str, int, Result]]:
    """Rows: (system, concurrency, median result)."""
    jpeg = sample("chelsea")
    repository = workdir / "repository"
    shutil.copytree(REPOSITORY / LITE0, repository / LITE0)
    body, length = encode_request(
        {"image": images(jpeg)}, {"image": "BYTES"}, outputs=None, binary=True
    )
    header_extra = f'wrk.headers["Inference-Header-Content-Length"] = "{length}"'
    (workdir / "tether.body").write_bytes(body)
    (workdir / "tether.lua").write_text(
        WRK_SCRIPT.format(
            body=str(workdir / "tether.body"),
            content_type="application/octet-stream",
            extra=header_extra,
        )
    )
    (workdir / "raw.jpg").write_bytes(jpeg)
    (workdir / "flask.lua").write_text(
        WRK_SCRIPT.format(body=str(workdir / "raw.jpg"), content_type="image/jpeg", extra="")
    )
    (workdir / "minimal_app.py").write_text(
        MINIMAL_APP.format(
            model=str(REPOSITORY / LITE0 / "1" / "model.onnx"),
            labels=str(REPOSITORY / LITE0 / "labels.txt"),
        )
    )
    rows: list[tuple[str, int, Result]] = []
    port = free_port()
    command = [GUNICORN, "-w", "2", "--threads", "4", "-k", "gthread", "-b"]
    flask = subprocess.Popen(
        [*command, f"127.0.0.1:{port}", "minimal_app:app"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    configs = {
        # The shipped config.json asks for all cores (parameters.intra_op_threads = 0).
        "Tether edge agent (defaults: 1 worker x 1 thread, ORT on all cores per the model)": "",
    }
    agents: dict[str, AgentProcess] = {}
    try:
        wait_for_port(port, timeout_s=60)
        ready(f"http://127.0.0.1:{port}/classify", jpeg, {"Content-Type": "image/jpeg"})
        wrk(f"http://127.0.0.1:{port}/classify", workdir / "flask.lua", 8, 3)  # both workers
        for name, extra in configs.items():
            data = workdir / f"agent-{len(agents)}"
            data.mkdir()
            (data / "edge.toml").write_text(f'repository = "{repository}"\n{extra}')
            agents[name] = AgentProcess(data, config=data / "edge.toml")
        for concurrency in (1, 8):
            systems: dict[str, list[Result]] = {}
            for _ in range(runs):
                flask_run = wrk(
                    f"http://127.0.0.1:{port}/classify", workdir / "flask.lua", concurrency, seconds
                )
                systems.setdefault("Flask + onnxruntime + Pillow (gunicorn 2 x 4)", []).append(
                    flask_run
                )
                for name, agent in agents.items():
                    agent.start(ready_timeout_s=120)
                    try:
                        url = f"{agent.url}/v2/models/{LITE0}/infer"
                        ready(url, body, {"Inference-Header-Content-Length": str(length)})
                        result = wrk(url, workdir / "tether.lua", concurrency, seconds)
                    finally:
                        agent.stop()
                    systems.setdefault(name, []).append(result)
            for name, results in systems.items():
                rows.append((name, concurrency, median_of(results)))
    finally:
        flask.terminate()
        flask.wait()
    return rows


def ready(url: str, body: bytes, headers: dict[str, str], timeout_s: float = 120.0) -> None:
    """Wait until ``url`` answers ``body`` with a 200 (the app has loaded its model)."""
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            request = urllib.request.Request(url, data=body, headers=headers)
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                response.read()
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def envelope_bytes(inputs: dict[str, np.ndarray], datatypes: dict[str, str]) -> int:
    header, blobs = build_request(inputs, datatypes, request_id=uuid.uuid4().hex)
    message = InferRequestEnvelope(
        request_id=header["id"],
        model=LITE2,
        deadline=time.time() + 10,
        request=InferenceRequest.model_validate(header),
    )
    return len(frame(message.dump(), blobs))


def uplink_sizes(workdir: Path) -> list[tuple[str, int]]:
    """Envelope sizes per escalated image, and one real escalation seen on the broker."""
    jpeg = sample("chelsea")
    rows = [
        (
            "encoded JPEG (what Tether sends)",
            envelope_bytes({"image": images(jpeg)}, {"image": "BYTES"}),
        ),
        (
            "the same as base64 text (a JSON client's form, if sent as received)",
            envelope_bytes({"image": images(base64.b64encode(jpeg))}, {"image": "BYTES"}),
        ),
        (
            "FP32 tensor for Lite0 (1 x 3 x 224 x 224)",
            envelope_bytes({"input": np.zeros((1, 3, 224, 224), np.float32)}, {"input": "FP32"}),
        ),
        (
            "FP32 tensor for Lite2 (1 x 3 x 260 x 260)",
            envelope_bytes({"input": np.zeros((1, 3, 260, 260), np.float32)}, {"input": "FP32"}),
        ),
    ]
    broker = Broker(workdir / "mosquitto-uplink").start()
    repository = workdir / "uplink-repository"
    for name in (LITE0, LITE2):
        shutil.copytree(REPOSITORY / name, repository / name)
    cloud = CloudProcess(broker, repository, [LITE2], 0)
    seen: list[Message] = []
    watcher = MqttClient(broker.url, f"watch-{uuid.uuid4().hex[:6]}")
    watcher.start()
    watcher.subscribe("tether/cloud/infer/+/+", seen.append)
    data = workdir / "agent-cascade"
    data.mkdir()
    (data / "edge.toml").write_text(
        f'repository = "{repository}"\nmqtt_url = "{broker.url}"\nmodels = ["{LITE0}"]\n'
        f'[uplink]\ntimeout_s = 60.0\nattempt_timeout_s = 60.0\n[routes.{LITE2}]\nmode = "cloud"\n'
        f'[routes.imagenet]\nmode = "cascade"\nlocal_model = "{LITE0}"\n'
        f'cloud_model = "{LITE2}"\nthreshold = 1.0\n'
    )
    agent = AgentProcess(data, config=data / "edge.toml")
    try:
        agent.start(ready_timeout_s=120)
        body, length = encode_request({"image": images(jpeg)}, {"image": "BYTES"})
        import urllib.request

        for _ in range(30):  # the cloud worker may still be loading
            request = urllib.request.Request(
                f"{agent.url}/v2/models/imagenet/infer",
                data=body,
                headers={"Inference-Header-Content-Length": str(length)},
            )
            try:
                with urllib.request.urlopen(request, timeout=120) as response:
                    if b'"served_by":"cloud"' in response.read():
                        break
            except OSError:
                time.sleep(2)
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            time.sleep(0.1)
        rows.append(
            ("one real escalation through `imagenet`, on the broker", len(seen[-1].payload))
        )
    finally:
        agent.stop()
        watcher.stop()
        cloud.close()
        broker.stop()
    return rows


def caller(uplink: Uplink, inputs: dict[str, np.ndarray]) -> Callable[[], None]:
    def call() -> None:
        uplink.request(LITE2, inputs, datatypes={"image": "BYTES"}, timeout_s=600)

    return call


def batching(workdir: Path, seconds: float, in_flight: int = 32) -> list[tuple[str, Result]]:
    jpeg = sample("chelsea")
    repository = workdir / "batch-repository"
    shutil.copytree(REPOSITORY / LITE2, repository / LITE2)
    rows = []
    for label, batch in (("no batching", 0), ("dynamic batching, max 32", 32)):
        broker = Broker(workdir / f"mosquitto-{batch}").start()
        cloud = CloudProcess(broker, repository, [LITE2], batch)
        uplink = Uplink(
            broker.url,
            f"bench-{uuid.uuid4().hex[:6]}",
            UplinkSettings(
                timeout_s=600, attempt_timeout_s=600, max_attempts=1, breaker_failures=10_000
            ),
        )
        uplink.start()
        try:
            inputs = {"image": images(jpeg)}
            call = caller(uplink, inputs)
            deadline = time.monotonic() + 180
            while True:  # the worker loads Lite2 first; a request before it subscribes is lost
                try:
                    uplink.request(LITE2, inputs, datatypes={"image": "BYTES"}, timeout_s=10)
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
            closed_loop(call, in_flight, min(seconds, 5))  # warm the batch sizes
            rows.append((label, closed_loop(call, in_flight, seconds)))
            print(label, rows[-1][1], flush=True)
        finally:
            uplink.close()
            cloud.close()
            broker.stop()
    return rows


def memory(workdir: Path) -> tuple[float, float]:
    """RSS and PSS of the agent serving Lite0 and ``minilm-l6`` (the device's embedding
    model), after 20 requests to each."""
    repository = workdir / "memory-repository"
    shutil.copytree(REPOSITORY / LITE0, repository / LITE0)
    (repository / "minilm-l6").symlink_to(
        REPOSITORY.parent / "text-repository" / "minilm-l6", target_is_directory=True
    )
    data = workdir / "agent-memory"
    data.mkdir()
    agent = AgentProcess(data, repository=repository)
    agent.start(ready_timeout_s=120)
    try:
        body, length = encode_request({"image": images(sample("chelsea"))}, {"image": "BYTES"})
        import urllib.request

        for _ in range(20):
            request = urllib.request.Request(
                f"{agent.url}/v2/models/{LITE0}/infer",
                data=body,
                headers={"Inference-Header-Content-Length": str(length)},
            )
            with urllib.request.urlopen(request, timeout=60) as response:
                response.read()
            embed = urllib.request.Request(
                f"{agent.url}/v1/embeddings",
                data=json.dumps({"model": "minilm-l6", "input": ["a cat on a mat"] * 8}).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(embed, timeout=60) as response:
                response.read()
        return memory_of(agent.pids())
    finally:
        agent.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch-seconds", type=float, default=30.0)
    args = parser.parse_args()
    lines = [f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start", ""]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = throughput(work, args.seconds, args.runs)
        lines += [
            "| EfficientNet-Lite0, JPEG in | c | images/s | p50 ms | p99 ms | vs Flask |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        base = {c: r for n, c, r in rows if n.startswith("Flask")}
        for name, concurrency, result in rows:
            ratio = result.rps / max(base[concurrency].rps, 1e-9)
            lines.append(
                f"| {name} | {concurrency} | {result.rps:.1f} | {result.p50_ms:.0f} "
                f"| {result.p99_ms:.0f} | {ratio:.2f}x |"
            )
        print("\n".join(lines), flush=True)
        lines += ["", "| uplink bytes per escalated image | bytes |", "|---|---:|"]
        lines += [f"| {name} | {size:,} |" for name, size in uplink_sizes(work)]
        print("\n".join(lines[-8:]), flush=True)
        batch_rows = batching(work, args.batch_seconds)
        lines += ["", "| EfficientNet-Lite2 cloud worker, 32 in flight | images/s | p50 ms |"]
        lines += ["|---|---:|---:|"]
        lines += [f"| {name} | {r.rps:.1f} | {r.p50_ms:.0f} |" for name, r in batch_rows]
        gain = batch_rows[1][1].rps / batch_rows[0][1].rps
        lines += ["", f"batching gain: {gain:.2f}x"]
        rss, pss = memory(work)
        lines += [
            "",
            f"edge agent serving {LITE0} and minilm-l6: RSS {rss:.0f} MB, PSS {pss:.0f} MB",
        ]
        lines += [f"machine load average at the end: {os.getloadavg()[0]:.1f}"]
        print("\n".join(lines[-6:]), flush=True)
    text = "\n".join(lines)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "images.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
