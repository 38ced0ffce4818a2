"""Edge HTTP benchmark (run by hand, not in CI): ``python bench/edge_http.py``.

Measures, in one run on one machine, with ``wrk`` as the load generator:

1. bare ``onnxruntime`` ``session.run`` (threads calling the session directly);
2. a minimal Flask + onnxruntime app as a user would write it, on gunicorn
   (2 workers x 4 threads, gthread);
3. an empty Flask route on the same gunicorn setup (the framework's floor: the reference
   of the 75 % target);
4. the Tether edge agent (``tether edge`` with its defaults: granian, one worker, one
   request thread as no route reaches the cloud);

and, for context, the empty route on granian (Tether's default server), the agent with two
workers, and the agent on gunicorn 2x4 (``http.server = "gunicorn"``);

each at concurrency 1, 8 and 32 on ``digits-student`` (requests/s, p50 and p99 latency,
median of ``--runs`` runs). Then the agent's gRPC endpoint beside its HTTP one, both
driven by the same Python harness (threads, one keep-alive connection or channel each:
``http.client`` with a JSON body vs a ``GRPCInferenceService`` stub with raw contents), since
wrk speaks no gRPC. Then JSON vs binary tensors through Tether on a generated
model with a 1x3x224x224 FP32 input, and the agent's memory (RSS and PSS of all its
processes with both digits models loaded) and time to ready.

Writes a Markdown table to stdout and ``bench/results/edge_http.md``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.agent_process import AgentProcess  # noqa: E402
from harness.broker import free_port, wait_for_port  # noqa: E402
from harness.onnx_models import image_model, write_model  # noqa: E402
from shared.codec import encode_request  # noqa: E402

REPOSITORY = ROOT / "models" / "repository"
STUDENT = REPOSITORY / "digits-student" / "1" / "model.onnx"
PYTHON = sys.executable
GUNICORN = str(Path(sys.executable).parent / "gunicorn")

TETHER = "Tether edge agent (defaults: granian, 1 worker x 1 thread)"

MINIMAL_APP = """
import numpy as np
import onnxruntime as ort
from flask import Flask, jsonify, request

app = Flask(__name__)
session = ort.InferenceSession({model!r})


@app.post("/v2/models/digits-student/infer")
def infer():
    body = request.get_json()
    tensor = body["inputs"][0]
    x = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
    y = session.run(None, {{tensor["name"]: x}})[0]
    return jsonify(
        {{
            "model_name": "digits-student",
            "outputs": [
                {{"name": "probabilities", "datatype": "FP32", "shape": list(y.shape),
                  "data": y.ravel().tolist()}}
            ],
        }}
    )


@app.post("/empty")
def empty():
    return "{{}}"
"""

WRK_SCRIPT = """
local f = io.open({body!r}, "rb")
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "{content_type}"
{extra}
"""


def digits_script(work: Path, x: np.ndarray) -> Path:
    """A wrk script that POSTs ``x`` as a V2 JSON request for a digits model's ``pixels``."""
    body = work / "digits.json"
    inputs = [
        {"name": "pixels", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
    ]
    body.write_bytes(orjson.dumps({"inputs": inputs}))
    script = work / "digits.lua"
    script.write_text(WRK_SCRIPT.format(body=str(body), content_type="application/json", extra=""))
    return script


@dataclass
class Result:
    rps: float
    p50_ms: float
    p99_ms: float


def _ms(text: str) -> float:
    match = re.match(r"([\d.]+)(us|ms|s)", text)
    assert match, text
    value, unit = float(match.group(1)), match.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def wrk(url: str, script: Path, concurrency: int, seconds: float) -> Result:
    threads = min(concurrency, 2)
    out = subprocess.run(
        [
            "wrk",
            f"-t{threads}",
            f"-c{concurrency}",
            f"-d{seconds:g}s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if "Non-2xx" in out:
        raise RuntimeError(f"non-2xx responses from {url}:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    return Result(rps, p50, p99)


def median_of(runs: list[Result]) -> Result:
    return Result(
        statistics.median(r.rps for r in runs),
        statistics.median(r.p50_ms for r in runs),
        statistics.median(r.p99_ms for r in runs),
    )


def bare_onnxruntime(x: np.ndarray, concurrency: int, seconds: float) -> Result:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(STUDENT), options)
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    stop = time.perf_counter() + seconds

    def loop(i: int) -> None:
        while (t := time.perf_counter()) < stop:
            session.run(None, {"pixels": x})
            latencies[i].append(time.perf_counter() - t)

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = sorted(v for lat in latencies for v in lat)
    return Result(
        len(flat) / seconds, flat[len(flat) // 2] * 1e3, flat[int(len(flat) * 0.99)] * 1e3
    )


class AppServer:
    """The minimal app file (with its empty route) on a WSGI server, 2 workers x 4 threads."""

    def __init__(self, workdir: Path, command: list[str]) -> None:
        (workdir / "minimal_app.py").write_text(MINIMAL_APP.format(model=str(STUDENT)))
        self.port = free_port()
        self.workdir = workdir
        self.command = [part.format(port=self.port) for part in command]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> AppServer:
        self.process = subprocess.Popen(
            self.command, cwd=self.workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for_port(self.port)
        time.sleep(1.0)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.process is not None
        self.process.terminate()
        self.process.wait()


#: gunicorn as a user would run the minimal app: gthread, 2 workers x 4 threads.
GUNICORN_2X4 = [GUNICORN, "-w", "2", "--threads", "4", "-k", "gthread"]
GUNICORN_2X4 += ["-b", "127.0.0.1:{port}", "minimal_app:app"]
#: granian (Tether's server) with the same shape: 2 workers x 4 blocking threads.
GRANIAN_2X4 = [str(Path(sys.executable).parent / "granian"), "--interface", "wsgi"]
GRANIAN_2X4 += ["--workers", "2", "--blocking-threads", "4", "--no-ws"]
GRANIAN_2X4 += ["--port", "{port}", "minimal_app:app"]


def memory_of(pids: list[int]) -> tuple[float, float]:
    """(RSS, PSS) in MB summed over ``pids``."""
    rss = pss = 0.0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        rss += int(re.search(r"^Rss:\s+(\d+)", text, re.M).group(1)) / 1024  # type: ignore[union-attr]
        pss += int(re.search(r"^Pss:\s+(\d+)", text, re.M).group(1)) / 1024  # type: ignore[union-attr]
    return rss, pss


def python_client(
    kind: str, agent: AgentProcess, x: np.ndarray, concurrency: int, seconds: float
) -> Result:
    """Requests/s and latency of ``concurrency`` threads calling the agent over ``kind``
    (``http`` or ``grpc``), each on its own connection, for ``seconds``."""
    import http.client

    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    body = orjson.dumps(
        {"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": x.ravel()}]},
        option=orjson.OPT_SERIALIZE_NUMPY,
    )
    request = service_pb2.ModelInferRequest(model_name="digits-student")
    request.inputs.add(name="pixels", datatype="FP32", shape=[1, 64])
    request.raw_input_contents.append(x.tobytes())
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    stop = time.perf_counter() + seconds

    def loop(i: int) -> None:
        if kind == "http":
            conn = http.client.HTTPConnection("127.0.0.1", agent.port)
            headers = {"Content-Type": "application/json"}

            def call() -> None:
                conn.request("POST", "/v2/models/digits-student/infer", body, headers)
                response = conn.getresponse()
                response.read()
                assert response.status == 200

        else:
            channel = grpc.insecure_channel(
                f"127.0.0.1:{agent.grpc_port}", options=[("grpc.use_local_subchannel_pool", 1)]
            )
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

            def call() -> None:
                stub.ModelInfer(request, timeout=10)

        while (t := time.perf_counter()) < stop:
            call()
            latencies[i].append(time.perf_counter() - t)

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = sorted(v for lat in latencies for v in lat)
    return Result(
        len(flat) / seconds, flat[len(flat) // 2] * 1e3, flat[int(len(flat) * 0.99)] * 1e3
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", default="1,8,32")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is required: apt-get install wrk")
    levels = [int(c) for c in args.concurrency.split(",")]
    work = Path(tempfile.mkdtemp(prefix="tether-bench-"))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 17, size=(1, 64)).astype(np.float32)
    script = digits_script(work, x)

    def measure(url: str) -> dict[int, Result]:
        """The median of ``--runs`` wrk runs at each concurrency level."""
        return {
            c: median_of([wrk(url, script, c, args.seconds) for _ in range(args.runs)])
            for c in levels
        }

    infer_path = "/v2/models/digits-student/infer"
    rows: dict[str, dict[int, Result]] = {}
    rows["bare onnxruntime session.run"] = {
        c: median_of([bare_onnxruntime(x, c, args.seconds) for _ in range(args.runs)])
        for c in levels
    }
    with AppServer(work, GUNICORN_2X4) as server:
        rows["minimal Flask+ORT (gunicorn 2x4)"] = measure(server.url + infer_path)
        rows["empty Flask route (gunicorn 2x4)"] = measure(server.url + "/empty")
    with AppServer(work, GRANIAN_2X4) as server:
        rows["empty Flask route (granian 2x4, context)"] = measure(server.url + "/empty")
    agent = AgentProcess(work / "agent", repository=REPOSITORY, grpc_port=free_port())
    ready_s = agent.start()
    time.sleep(1.0)
    rss, pss = memory_of(agent.pids())
    processes = len(agent.pids())
    protocols: dict[str, dict[int, Result]] = {}
    try:
        rows[TETHER] = measure(agent.url + infer_path)
        for kind in ("http", "grpc"):
            protocols[kind] = {
                c: median_of(
                    [python_client(kind, agent, x, c, args.seconds) for _ in range(args.runs)]
                )
                for c in levels
                if c <= 8
            }
    finally:
        agent.stop()
    context_agents = {
        "Tether edge agent (granian, 2 workers x 1 thread, context)": {"TETHER_HTTP__WORKERS": "2"},
        "Tether edge agent (gunicorn 2x4, context)": {
            "TETHER_HTTP__SERVER": "gunicorn",
            "TETHER_HTTP__WORKERS": "2",
            "TETHER_HTTP__THREADS": "4",
        },
    }
    for index, (name, env) in enumerate(context_agents.items()):
        agent = AgentProcess(work / f"agent-{index}", repository=REPOSITORY, env=env)
        agent.start()
        try:
            rows[name] = measure(agent.url + infer_path)
        finally:
            agent.stop()

    # JSON vs binary tensors on a 1x3x224x224 FP32 input.
    image_repo = work / "image-repo"
    write_model(image_repo, "image", image_model())
    image = rng.random((1, 3, 224, 224), dtype=np.float32)
    image_json = work / "image.json"
    image_json.write_bytes(
        orjson.dumps(
            {
                "inputs": [
                    {
                        "name": "image",
                        "shape": [1, 3, 224, 224],
                        "datatype": "FP32",
                        "data": image.ravel(),
                    }
                ]
            },
            option=orjson.OPT_SERIALIZE_NUMPY,
        )
    )
    body, length = encode_request({"image": image}, parameters={"binary_data_output": True})
    image_bin = work / "image.bin"
    image_bin.write_bytes(body)
    json_script = work / "image-json.lua"
    json_script.write_text(
        WRK_SCRIPT.format(body=str(image_json), content_type="application/json", extra="")
    )
    bin_script = work / "image-bin.lua"
    bin_script.write_text(
        WRK_SCRIPT.format(
            body=str(image_bin),
            content_type="application/octet-stream",
            extra=f'wrk.headers["Inference-Header-Content-Length"] = "{length}"',
        )
    )
    image_agent = AgentProcess(work / "image-agent", repository=image_repo)
    image_agent.start()
    try:
        url = image_agent.url + "/v2/models/image/infer"
        json_res = median_of([wrk(url, json_script, 1, args.seconds) for _ in range(args.runs)])
        bin_res = median_of([wrk(url, bin_script, 1, args.seconds) for _ in range(args.runs)])
    finally:
        image_agent.stop()

    lines = [
        f"Machine: {os.cpu_count()} cores; wrk load generator on the same machine; "
        f"{args.runs} runs of {args.seconds:g} s each, medians. Model: digits-student, batch 1, JSON.",
        "",
        "| server | c | requests/s | p50 ms | p99 ms |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, by_c in rows.items():
        for c, r in by_c.items():
            lines.append(f"| {name} | {c} | {r.rps:,.0f} | {r.p50_ms:.3f} | {r.p99_ms:.3f} |")
    tether = rows[TETHER]
    minimal = rows["minimal Flask+ORT (gunicorn 2x4)"]
    empty = rows["empty Flask route (gunicorn 2x4)"]
    empty_granian = rows["empty Flask route (granian 2x4, context)"]
    tether_gunicorn = rows["Tether edge agent (gunicorn 2x4, context)"]
    lines += ["", "| check | value | target |", "| --- | --- | --- |"]
    for c in (8, 32):
        if c in tether:
            lines.append(
                f"| Tether / minimal app throughput, c={c} | {tether[c].rps / minimal[c].rps:.2f}x | >= 1.00x |"
            )
            lines.append(
                f"| Tether / empty route throughput, c={c} | {tether[c].rps / empty[c].rps:.0%} | >= 75% |"
            )
            lines.append(
                f"| (context) Tether / empty route on granian, c={c} | {tether[c].rps / empty_granian[c].rps:.0%} | |"
            )
            lines.append(
                f"| (context) Tether on gunicorn / empty route, c={c} | {tether_gunicorn[c].rps / empty[c].rps:.0%} | |"
            )
    if 1 in tether:
        lines.append(
            f"| Tether p50 - minimal p50, c=1 | {tether[1].p50_ms - minimal[1].p50_ms:+.3f} ms | <= +0.300 ms |"
        )
    lines += [
        f"| JSON 1x3x224x224 FP32, c=1 | {json_res.rps:,.1f} req/s, p50 {json_res.p50_ms:.2f} ms | |",
        f"| binary 1x3x224x224 FP32, c=1 | {bin_res.rps:,.1f} req/s, p50 {bin_res.p50_ms:.2f} ms | |",
        f"| binary speed-up (p50) | {json_res.p50_ms / bin_res.p50_ms:.1f}x | >= 10x |",
        f"| agent memory, both digits models loaded ({processes} processes) | RSS {rss:.0f} MB, PSS {pss:.0f} MB | < 200 MB |",
        f"| time from start to ready | {ready_s:.2f} s | <= 3 s |",
    ]
    lines += [
        "",
        "Same agent, HTTP (JSON) vs gRPC (raw contents), one Python harness as the client:",
        "",
        "| protocol | c | requests/s | p50 ms | p99 ms |",
        "| --- | --- | --- | --- | --- |",
    ]
    for kind, by_c in protocols.items():
        for c, r in by_c.items():
            lines.append(f"| {kind} | {c} | {r.rps:,.0f} | {r.p50_ms:.3f} | {r.p99_ms:.3f} |")
    report = "\n".join(lines)
    print(report)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "edge_http.md").write_text(report + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
