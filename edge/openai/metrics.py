"""Prometheus metrics of text generation and embeddings, in the agent's registry.

Time to first token and tokens per second are what a language model's users feel; the
prompt and completion token counters are what it costs. Each is split by model and by
where the answer was served (``served_by``: edge or cloud).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RATE_BUCKETS = (1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 200.0, 400.0, 800.0)


class TextMetrics:
    """The text-serving metrics, registered in ``registry`` (the agent's; a new one when
    none is given)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry = registry if registry is not None else CollectorRegistry()
        self.time_to_first_token = Histogram(
            "tether_llm_time_to_first_token_seconds",
            "Time from a generation request's arrival to its first token, by model and "
            "where it was served.",
            ["model", "served_by"],
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.tokens_per_second = Histogram(
            "tether_llm_tokens_per_second",
            "Completion tokens per second after the first token, per generation.",
            ["model", "served_by"],
            buckets=RATE_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "tether_llm_prompt_tokens",
            "Prompt tokens read (generation and embeddings), by model and where served.",
            ["model", "served_by"],
            registry=registry,
        )
        self.completion_tokens = Counter(
            "tether_llm_completion_tokens",
            "Completion tokens generated, by model and where served.",
            ["model", "served_by"],
            registry=registry,
        )
        self.requests = Counter(
            "tether_llm_requests",
            "Text requests answered, by model, endpoint (chat, completion, embeddings), "
            "where served and route.",
            ["model", "endpoint", "served_by", "route"],
            registry=registry,
        )
        self.failures = Counter(
            "tether_llm_request_failures",
            "Text requests that failed, by model, endpoint and reason (mid-stream breaks too).",
            ["model", "endpoint", "reason"],
            registry=registry,
        )
