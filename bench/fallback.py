"""Cloud fallback benchmark (run by hand, not in CI): ``python bench/fallback.py``.

Measures in one run, on two Mosquitto brokers side by side: one started with the
configuration Tether ships for development (``set_tcp_nodelay true``...), and a *stock*
Mosquitto 2.0 as users run it (only ``listener`` and ``allow_anonymous``, so Nagle's
algorithm stays on), each:

1. a raw paho echo at QoS 0 (request -> responder -> reply): the floor;
2. Tether's uplink directly to a cloud worker serving ``digits-teacher``;
3. Tether's cloud route through the edge's HTTP API (``digits-teacher`` routed ``cloud``);

each at 1 and 32 requests in flight (p50/p99 latency, requests/s, medians of runs). For
context, a naive paho echo at QoS 1 on the stock broker shows the delayed-ACK stall that
the uplink's QoS 0 wire avoids. Then a cloud worker's throughput at 32 in flight with
batching off and on (tuned broker), on ``digits-teacher`` and on a wide model the bench
builds (batch-1 compute >= 0.5 ms).

Writes a Markdown table to stdout and ``bench/results/fallback.md``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.edge_http import Result, digits_script, median_of, wrk  # noqa: E402
from edge.settings import UplinkSettings  # noqa: E402
from edge.uplink import Uplink  # noqa: E402
from harness.agent_process import AgentProcess  # noqa: E402
from harness.broker import Broker  # noqa: E402
from models.onnx_export import save_onnx  # noqa: E402
from models.training import MLP  # noqa: E402

REPOSITORY = ROOT / "models" / "repository"
PIXELS = np.random.default_rng(0).integers(0, 17, size=(1, 64)).astype(np.float32)


def summarise(latencies: list[float], seconds: float) -> Result:
    ordered = sorted(latencies)
    return Result(
        len(ordered) / seconds,
        ordered[len(ordered) // 2] * 1e3,
        ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e3,
    )


def closed_loop(call: Callable[[], None], in_flight: int, seconds: float) -> Result:
    """``in_flight`` threads each calling ``call`` back to back for ``seconds``."""
    latencies: list[list[float]] = [[] for _ in range(in_flight)]
    stop = time.perf_counter() + seconds

    def loop(i: int) -> None:
        while (t := time.perf_counter()) < stop:
            call()
            latencies[i].append(time.perf_counter() - t)

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(in_flight)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return summarise([v for lat in latencies for v in lat], seconds)


class RawEcho:
    """Plain paho clients: a responder that echoes, a requester with futures."""

    def __init__(self, port: int, qos: int) -> None:
        self.qos = qos
        self.pending: dict[bytes, threading.Event] = {}
        self.lock = threading.Lock()
        tag = uuid.uuid4().hex[:6]
        self.responder = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"echo-{tag}", protocol=paho.MQTTv5
        )
        self.requester = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"req-{tag}", protocol=paho.MQTTv5
        )
        for client in (self.responder, self.requester):
            client.max_inflight_messages_set(1000)
            client.connect("127.0.0.1", port)
            client.loop_start()
        self.request_topic = f"bench/{tag}/req"
        self.reply_topic = f"bench/{tag}/rep"

        def echo(client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
            self.responder.publish(self.reply_topic, msg.payload, qos=qos)

        def reply(client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
            with self.lock:
                event = self.pending.pop(bytes(msg.payload[:16]), None)
            if event is not None:
                event.set()

        self.responder.on_message = echo
        self.requester.on_message = reply
        self.responder.subscribe(self.request_topic, qos)
        self.requester.subscribe(self.reply_topic, qos)
        time.sleep(0.5)

    def call(self) -> None:
        key = uuid.uuid4().bytes
        event = threading.Event()
        with self.lock:
            self.pending[key] = event
        self.requester.publish(self.request_topic, key + PIXELS.tobytes(), qos=self.qos)
        if not event.wait(5):
            raise TimeoutError("echo reply lost")

    def close(self) -> None:
        for client in (self.responder, self.requester):
            client.loop_stop()
            client.disconnect()


class CloudProcess:
    """``tether cloud`` in its own process (so its GIL is not the load generator's)."""

    def __init__(self, broker: Broker, repository: Path, models: list[str], batch: int) -> None:
        env = {
            **os.environ,
            "TETHER_MQTT_URL": broker.url,
            "TETHER_CLOUD_BATCHING__MAX_BATCH_SIZE": str(batch),
            "TETHER_CLOUD_BATCHING__MAX_QUEUE_DELAY_MS": "2" if batch else "0",
            "TETHER_CLOUD_WORKER_THREADS": "2",
        }
        command = [
            sys.executable, "-m", "tether", "--log-level", "WARNING", "cloud",
            "--repository", str(repository), "--models", ",".join(models), "--metrics-port", "0",
        ]  # fmt: skip
        self.process = subprocess.Popen(command, env=env, cwd=ROOT)

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def uplink_for(broker: Broker) -> Uplink:
    uplink = Uplink(
        broker.url,
        f"bench-{uuid.uuid4().hex[:6]}",
        UplinkSettings(timeout_s=10, attempt_timeout_s=10, max_attempts=1, breaker_failures=1000),
    )
    uplink.start()
    return uplink


def wait_cloud(uplink: Uplink, model: str, x: np.ndarray) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            uplink.request(model, {"pixels": x}, timeout_s=1)
            return
        except Exception:  # not up yet
            time.sleep(0.2)
    raise TimeoutError(f"cloud worker never answered for {model}")


def wide_model(repository: Path) -> None:
    """A wider teacher whose batch-1 compute is >= 0.5 ms on this machine."""
    rng = np.random.default_rng(1)
    sizes = [64, 4096, 4096, 10]
    pairs = list(itertools.pairwise(sizes))
    mlp = MLP(
        weights=[rng.normal(0, 0.05, (a, b)).astype(np.float32) for a, b in pairs],
        biases=[np.zeros(b, np.float32) for _, b in pairs],
    )
    out = repository / "digits-wide" / "1"
    out.mkdir(parents=True, exist_ok=True)
    save_onnx(mlp, out / "model.onnx", graph_name="digits-wide")
    (repository / "digits-wide" / "config.json").write_text(
        orjson.dumps(
            {
                "name": "digits-wide",
                "max_batch_size": 64,
                "input": [{"name": "pixels", "datatype": "FP32", "dims": [64]}],
                "output": [{"name": "probabilities", "datatype": "FP32", "dims": [10]}],
            }
        ).decode()
    )


def batch1_ms(path: Path) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options)
    for _ in range(20):
        session.run(None, {"pixels": PIXELS})
    start = time.perf_counter()
    for _ in range(200):
        session.run(None, {"pixels": PIXELS})
    return (time.perf_counter() - start) / 200 * 1e3


FLOOR = "raw paho echo, QoS 0 (floor)"
UPLINK = "Tether uplink -> cloud worker (digits-teacher)"
HTTP = "Tether edge HTTP -> cloud route (wrk)"
NAIVE = "context: naive paho echo, QoS 1"

Measure = Callable[[int, float], Result]


class BrokerStack:
    """Everything measured through one broker, kept running for the whole bench so that
    runs on the two brokers interleave and see the same machine."""

    def __init__(self, broker: Broker, work: Path, *, naive: bool) -> None:
        self.echo = RawEcho(broker.port, qos=0)
        self.naive = RawEcho(broker.port, qos=1) if naive else None
        self.cloud = CloudProcess(broker, REPOSITORY, ["digits-teacher"], batch=0)
        self.uplink = uplink_for(broker)
        wait_cloud(self.uplink, "digits-teacher", PIXELS)
        work.mkdir(parents=True, exist_ok=True)
        config = work / "edge.toml"
        config.write_text(f'mqtt_url = "{broker.url}"\n[routes.digits-teacher]\nmode = "cloud"\n')
        self.agent = AgentProcess(work / "agent", repository=REPOSITORY, config=config)
        self.agent.start()
        self.script = digits_script(work, PIXELS)

    def paths(self) -> dict[str, Measure]:
        """What to measure: path name -> measure(in flight, seconds)."""
        url = self.agent.url + "/v2/models/digits-teacher/infer"

        def ask() -> None:
            self.uplink.request("digits-teacher", {"pixels": PIXELS})

        paths: dict[str, Measure] = {
            FLOOR: lambda n, s: closed_loop(self.echo.call, n, s),
            UPLINK: lambda n, s: closed_loop(ask, n, s),
            HTTP: lambda n, s: wrk(url, self.script, n, s),
        }
        if self.naive is not None:
            naive = self.naive
            paths[NAIVE] = lambda n, s: closed_loop(naive.call, n, s)
        return paths

    def close(self) -> None:
        self.agent.stop()
        self.uplink.close()
        self.cloud.close()
        self.echo.close()
        if self.naive is not None:
            self.naive.close()


def measure_batching(
    broker: Broker, work: Path, seconds: float, runs: int
) -> tuple[float, dict[str, dict[str, Result]]]:
    """One cloud worker's throughput at 32 in flight, batching off and on."""
    wide_repo = work / "repo"
    wide_model(wide_repo)
    shutil.copytree(REPOSITORY / "digits-teacher", wide_repo / "digits-teacher")
    wide_ms = batch1_ms(wide_repo / "digits-wide" / "1" / "model.onnx")
    batching: dict[str, dict[str, Result]] = {}
    for batch in (0, 32):
        cloud = CloudProcess(broker, wide_repo, ["digits-teacher", "digits-wide"], batch=batch)
        uplink = uplink_for(broker)
        try:
            for model in ("digits-teacher", "digits-wide"):
                wait_cloud(uplink, model, PIXELS)
                call = lambda m=model, u=uplink: u.request(m, {"pixels": PIXELS}) and None  # noqa: E731
                batching.setdefault(model, {})["on" if batch else "off"] = median_of(
                    [closed_loop(call, 32, seconds) for _ in range(runs)]
                )
        finally:
            uplink.close()
            cloud.close()
    return wide_ms, batching


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tether-fallback-"))
    brokers = {
        "tuned": Broker(work / "tuned").start(),
        "stock": Broker(work / "stock", stock=True).start(),
    }
    levels = (1, 32)
    samples: dict[tuple[str, str, int], list[Result]] = {}
    stacks: dict[str, BrokerStack] = {}
    try:
        try:
            for kind, broker in brokers.items():
                stacks[kind] = BrokerStack(broker, work / kind, naive=kind == "stock")
            for _ in range(args.runs):  # interleaved: each run measures every row once
                for n in levels:
                    for kind, stack in stacks.items():
                        for path, measure in stack.paths().items():
                            samples.setdefault((kind, path, n), []).append(measure(n, args.seconds))
        finally:
            for stack in stacks.values():
                stack.close()
        wide_ms, batching = measure_batching(brokers["tuned"], work, args.seconds, args.runs)
    finally:
        for broker in brokers.values():
            broker.stop()
    rows: dict[str, dict[str, dict[int, Result]]] = {}
    for (kind, path, n), results in samples.items():
        rows.setdefault(kind, {}).setdefault(path, {})[n] = median_of(results)

    lines = [
        f"Machine: {os.cpu_count()} cores; {args.runs} runs of {args.seconds:g} s, medians.",
        "",
        "| broker | path | in flight | requests/s | p50 ms | p99 ms |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for kind, by_path in rows.items():
        for name, by_n in by_path.items():
            for n, r in by_n.items():
                lines.append(
                    f"| {kind} | {name} | {n} | {r.rps:,.0f} | {r.p50_ms:.3f} | {r.p99_ms:.3f} |"
                )
    lines.append("")
    for kind in brokers:
        floor, up = rows[kind][FLOOR][1], rows[kind][UPLINK][1]
        lines.append(
            f"Uplink p50 over the raw QoS 0 echo at 1 in flight, {kind} broker: "
            f"{up.p50_ms - floor.p50_ms:+.3f} ms (target <= +1 ms)."
        )
    lines += [
        "",
        f"Cloud worker throughput at 32 in flight (digits-wide batch-1 compute {wide_ms:.2f} ms):",
        "",
        "| model | batching off req/s | batching on (max 32, 2 ms) req/s | ratio |",
        "| --- | --- | --- | --- |",
    ]
    for model, by in batching.items():
        lines.append(
            f"| {model} | {by['off'].rps:,.0f} | {by['on'].rps:,.0f} | {by['on'].rps / by['off'].rps:.2f}x |"
        )
    report = "\n".join(lines)
    print(report)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "fallback.md").write_text(report + "\n")


if __name__ == "__main__":
    main()
