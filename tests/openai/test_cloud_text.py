"""Text routes through the cloud: a real ``tether edge``, a real cloud worker and Mosquitto,
driven by the official ``openai`` client.

The cloud worker (in this process) serves ``smollm2-135m`` and ``mpnet-base`` from
``models/text-repository``; the agent serves ``smollm2-135m`` itself and routes to the
cloud by mode and by the size rule. Cloud text is compared with llama.cpp run directly on
the same file; a broker killed mid-stream must end the stream with an error event in time.
"""

from __future__ import annotations

import contextlib
import queue
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest

from cloud.settings import CloudSettings
from cloud.worker import CloudWorker
from edge.settings import UplinkSettings
from edge.text_uplink import UplinkText
from edge.uplink import Uplink
from harness.agent_process import AgentProcess
from harness.broker import Broker
from serving.runtimes.generation import ChatMessage, GenerationEvent, GenerationRequest, TextDelta
from shared import topics
from shared.envelopes import (
    GenerationParams,
    TextChunkEnvelope,
    TextMessage,
    TextRequestEnvelope,
    decode_envelope,
    frame,
)
from shared.errors import TetherError
from shared.mqtt import Message, MqttClient
from tests.openai.conftest import TEXT_REPOSITORY, TOKEN, http, linked_repository, text_model_dir

#: Small, so the suite stays quick on a loaded 2-core machine; enough to compare texts.
MAX_TOKENS = 8
SEED = 7
SHORT = [{"role": "user", "content": "Name three colours."}]
#: Over the demo size rule's 64 prompt tokens: the cloud answers.
LONG = [{"role": "user", "content": "Summarise: " + "the fox jumps. " * 12}]
#: The cloud routes' deadline: to start a stream, and between two of its chunks. Generous,
#: because prompts are slow on a loaded 2-core machine; a lost broker is noticed at once.
CLOUD_TIMEOUT_S = 15.0
#: What the cloud worker serves (tests that need only the language model load only it).
CLOUD_MODELS = ("smollm2-135m", "mpnet-base")

ROUTES = f"""
[uplink]
timeout_s = {CLOUD_TIMEOUT_S}
attempt_timeout_s = 2.0
connect_wait_s = 5.0

[routes.assistant]
mode = "local"
local_model = "smollm2-135m"
cloud_model = "smollm2-135m"
max_local_prompt_tokens = 64

[routes.smollm2-cloud]
mode = "cloud"
task = "chat"
cloud_model = "smollm2-135m"

[routes.assistant-cloud-first]
mode = "cloud-first"
local_model = "smollm2-135m"
cloud_model = "smollm2-135m"

[routes.mpnet-base]
mode = "cloud"
task = "embedding"
"""


@dataclass
class Stack:
    broker: Broker
    worker: CloudWorker
    agent: AgentProcess
    client: Any


def cloud_worker(broker: Broker, name: str, models: tuple[str, ...] = CLOUD_MODELS) -> CloudWorker:
    for model in models:
        text_model_dir(model)
    settings = CloudSettings(
        mqtt_url=broker.url,
        worker_id=f"tether-test-{name}",
        repository=TEXT_REPOSITORY,
        models=[],
        text_models=list(models),
        text_threads=2,
        metrics_port=0,
        drain_timeout_s=2.0,
    )
    worker = CloudWorker(settings)
    worker.start()
    return worker


def start_stack(base: Path, broker: Broker, models: tuple[str, ...] = CLOUD_MODELS) -> Stack:
    worker = cloud_worker(broker, base.name, models)
    config = base / "edge.toml"
    config.write_text(ROUTES)
    agent = AgentProcess(
        base / "data",
        repository=linked_repository(base / "repository", ["smollm2-135m"]),
        config=config,
        env={"TETHER_API_TOKENS": TOKEN, "TETHER_MQTT_URL": broker.url},
    )
    try:
        agent.start(ready_timeout_s=120)
    except BaseException:
        worker.stop(drain=False)
        raise
    client = openai.OpenAI(base_url=agent.url + "/v1", api_key=TOKEN, max_retries=0, timeout=60)
    return Stack(broker, worker, agent, client)


def stop_stack(stack: Stack) -> None:
    stack.agent.stop()
    stack.worker.stop(drain=False, timeout_s=2.0)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, broker: Broker) -> Iterator[Stack]:
    started = start_stack(tmp_path_factory.mktemp("cloud-text"), broker)
    try:
        yield started
    finally:
        stop_stack(started)


@pytest.fixture(scope="module")
def engine() -> Any:
    """llama.cpp itself, on the same file and context as the cloud worker."""
    from llama_cpp import Llama

    path = text_model_dir("smollm2-135m") / "1" / "model.gguf"
    return Llama(model_path=str(path), n_ctx=2048, verbose=False)


def direct(engine: Any, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    engine.reset()
    answer: dict[str, Any] = engine.create_chat_completion(
        messages=messages, max_tokens=max_tokens, temperature=0, seed=SEED
    )
    return answer


def test_a_short_chat_is_served_on_the_device(stack: Stack) -> None:
    answer = stack.client.chat.completions.create(
        model="assistant", messages=SHORT, max_tokens=2, temperature=0
    )
    assert (answer.model_extra["served_by"], answer.model_extra["route"]) == ("edge", "local")


def test_a_long_chat_streams_from_the_cloud_with_the_engines_text(
    stack: Stack, engine: Any
) -> None:
    expected = direct(engine, LONG, MAX_TOKENS)
    stream = stack.client.chat.completions.create(
        model="assistant",
        messages=LONG,
        max_tokens=MAX_TOKENS,
        temperature=0,
        seed=SEED,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert {(c.model_extra["served_by"], c.model_extra["route"]) for c in chunks} == {
        ("cloud", "size")
    }
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected["choices"][0]["message"]["content"]
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == expected["choices"][0]["finish_reason"]
    usage = chunks[-1].usage
    assert usage.prompt_tokens == expected["usage"]["prompt_tokens"]
    assert usage.completion_tokens == expected["usage"]["completion_tokens"]


def test_cloud_chat_greedy_with_a_seed_gives_the_engines_text(stack: Stack, engine: Any) -> None:
    expected = direct(engine, SHORT, MAX_TOKENS)
    answer = stack.client.chat.completions.create(
        model="smollm2-cloud", messages=SHORT, max_tokens=MAX_TOKENS, temperature=0, seed=SEED
    )
    assert answer.choices[0].message.content == expected["choices"][0]["message"]["content"]
    assert answer.usage.prompt_tokens == expected["usage"]["prompt_tokens"]
    assert answer.usage.completion_tokens == expected["usage"]["completion_tokens"]
    assert answer.model_extra["served_by"] == "cloud"
    assert answer.model_extra["cloud_worker"] == stack.worker.worker_id


def test_cloud_errors_keep_their_status_and_code(stack: Stack) -> None:
    huge = [{"role": "user", "content": "word " * 3000}]  # over the 2048-token context
    with pytest.raises(openai.BadRequestError) as caught:
        stack.client.chat.completions.create(model="smollm2-cloud", messages=huge, max_tokens=2)
    assert caught.value.code == "context_length_exceeded"


def test_embeddings_from_the_cloud(stack: Stack) -> None:
    texts = [f"sentence {i} about the {['sea', 'sky'][i % 2]}" for i in range(5)]
    status, headers, body = http(
        stack.agent.url + "/v1/embeddings",
        {"model": "mpnet-base", "input": texts, "encoding_format": "base64"},
    )
    assert status == 200, body
    assert headers["X-Tether-Served-By"] == "cloud"
    answer = stack.client.embeddings.create(model="mpnet-base", input=texts)
    got = np.array([d.embedding for d in answer.data], dtype=np.float32)
    runtime = stack.worker.text.repository.get("mpnet-base")
    reference, tokens = runtime.embed(texts)  # type: ignore[attr-defined]
    assert got.shape == (5, 768)
    np.testing.assert_allclose(got, reference, atol=1e-6)
    assert answer.usage.prompt_tokens == tokens


def test_killing_the_broker_mid_stream_ends_it_with_an_error_then_cloud_first_is_local(
    tmp_path: Path, fresh_broker: Broker
) -> None:
    stack = start_stack(tmp_path, fresh_broker, ("smollm2-135m",))
    try:
        stream = stack.client.chat.completions.create(
            model="smollm2-cloud",
            messages=[{"role": "user", "content": "Write a long story about a lighthouse."}],
            max_tokens=400,
            temperature=0,
            stream=True,
        )
        pieces: list[str] = []
        with pytest.raises(openai.APIError) as caught:
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    pieces.append(chunk.choices[0].delta.content)
                    if len(pieces) == 2:
                        fresh_broker.kill()
                        killed = time.monotonic()
        assert len(pieces) >= 2  # the stream had started
        assert time.monotonic() - killed < CLOUD_TIMEOUT_S
        assert caught.value.code == "stream_broken"
        assert "broke" in caught.value.message
        answer = stack.client.chat.completions.create(
            model="assistant-cloud-first", messages=SHORT, max_tokens=2, temperature=0
        )
        assert (answer.model_extra["served_by"], answer.model_extra["route"]) == (
            "edge",
            "degraded",
        )
    finally:
        stop_stack(stack)


@contextlib.contextmanager
def long_cloud_stream(broker: Broker, device: str) -> Iterator[Iterator[GenerationEvent]]:
    """A 400-token cloud generation through an uplink of this process, its first text read."""
    uplink = Uplink(broker.url, device, UplinkSettings(timeout_s=CLOUD_TIMEOUT_S))
    uplink.start()
    try:
        story = GenerationRequest(
            messages=(ChatMessage("user", "Tell a long story."),), max_tokens=400
        )
        events = UplinkText(uplink).generate("smollm2-135m", story, None)
        assert isinstance(next(events), TextDelta)
        yield events
    finally:
        uplink.close()


def test_a_stream_left_early_stops_the_clouds_generation(stack: Stack) -> None:
    with long_cloud_stream(stack.broker, "text-cancel") as events:
        events.close()  # type: ignore[attr-defined]  # the client went away

        def cancelled() -> float:
            sample = stack.worker.metrics.registry.get_sample_value(
                "tether_cloud_failures_total", {"model": "smollm2-135m", "reason": "cancelled"}
            )
            return sample or 0.0

        deadline = time.monotonic() + CLOUD_TIMEOUT_S
        while cancelled() < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cancelled() == 1  # stopped long before its 400 tokens


def test_a_worker_stopped_without_draining_ends_its_streams_with_an_error(
    fresh_broker: Broker,
) -> None:
    worker = cloud_worker(fresh_broker, "stopping", ("smollm2-135m",))
    try:
        with long_cloud_stream(fresh_broker, "text-stop") as events:
            worker.stop(drain=False)
            with pytest.raises(TetherError) as caught:
                for _event in events:
                    pass
            assert caught.value.status == 503
            assert "stopping" in caught.value.message  # the worker said so; not a stall
    finally:
        worker.stop(drain=False)


def test_a_repeated_text_request_is_generated_once(stack: Stack) -> None:
    """The uplink sends a request again when its start is slow; the worker runs it once."""
    device = "text-twice"
    reply_topic = topics.cloud_replies(device, "c1")
    chunks: queue.SimpleQueue[TextChunkEnvelope] = queue.SimpleQueue()

    def on_reply(message: Message) -> None:
        envelope, _tail = decode_envelope(message.payload)
        assert isinstance(envelope, TextChunkEnvelope)
        chunks.put(envelope)

    def duplicates() -> float:
        sample = stack.worker.metrics.registry.get_sample_value(
            "tether_cloud_duplicates_total", {"outcome": "dropped"}
        )
        return sample or 0.0

    before = duplicates()
    client = MqttClient(stack.broker.url, f"tether-{device}")
    client.subscribe(reply_topic, on_reply, qos=0)
    client.start()
    try:
        request = TextRequestEnvelope(
            request_id="twice-1",
            model="smollm2-135m",
            task="generate",
            generation=GenerationParams(
                messages=[TextMessage(role="user", content="Hi")], max_tokens=4, temperature=0
            ),
        )
        for _ in range(2):
            client.publish(
                topics.cloud_request(device, "smollm2-135m"),
                frame(request.dump()),
                qos=0,
                response_topic=reply_topic,
                correlation_data=b"twice-1",
            )
        received = []
        while not (received and received[-1].final):
            received.append(chunks.get(timeout=CLOUD_TIMEOUT_S))
        assert [c.seq for c in received] == list(range(len(received)))  # one stream, in order
        assert duplicates() == before + 1
    finally:
        client.stop()
