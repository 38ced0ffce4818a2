"""Bindings: which model answers a sensor topic, and where its results and errors go."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from edge.sensor_settings import BindingSettings, PayloadFormatName
from shared.mqtt import topic_matches
from shared.topics import check_segment


@dataclass(frozen=True)
class Binding:
    """One topic filter bound to one model, with the device id filled in."""

    topic_filter: str
    model: str
    version: str | None
    results_template: str
    errors_template: str
    format: PayloadFormatName
    #: Index of the topic level that holds the sensor id (the filter's first ``+``).
    sensor_level: int

    @classmethod
    def from_settings(cls, settings: BindingSettings, device: str) -> Binding:
        check_segment(device, "device id")
        topic_filter = settings.topic.format(device=device)
        return cls(
            topic_filter=topic_filter,
            model=settings.model,
            version=settings.version,
            results_template=settings.results,
            errors_template=settings.errors,
            format=settings.format,
            sensor_level=topic_filter.split("/").index("+"),
        )

    def matches(self, topic: str) -> bool:
        return topic_matches(self.topic_filter, topic)

    def sensor_of(self, topic: str) -> str:
        """The sensor id in a data topic this binding matched."""
        levels = topic.split("/")
        return levels[self.sensor_level] if self.sensor_level < len(levels) else ""

    def results_topic(self, device: str, sensor: str) -> str:
        return self.results_template.format(device=device, sensor=_safe(sensor))

    def errors_topic(self, device: str, sensor: str) -> str:
        return self.errors_template.format(device=device, sensor=_safe(sensor))


def _safe(sensor: str) -> str:
    # A topic level can never hold '/', '+' or '#', but it can be empty.
    return sensor or "_"


def build_bindings(settings: Sequence[BindingSettings], device: str) -> list[Binding]:
    """The configured bindings for this device, in order (the first match wins)."""
    return [Binding.from_settings(item, device) for item in settings]


def binding_for(bindings: Sequence[Binding], topic: str) -> Binding | None:
    """The first binding whose filter matches ``topic``."""
    for binding in bindings:
        if binding.matches(topic):
            return binding
    return None
