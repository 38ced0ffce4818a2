"""Shadow traffic: a sample of real requests also goes to the cloud teacher, off the hot path.

:class:`ShadowSampler` is a data-plane observer. For a configurable share of the requests a
model version answered on the device, it puts the inputs and the local answer on a bounded
queue and returns at once; a background thread asks the teacher (normally the cloud
through the uplink) for the same inputs and counts how many rows agree on the top-1
class. A full queue drops the sample: shadow traffic never slows or fails a request.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
from collections.abc import Callable, Mapping
from typing import Protocol

import numpy as np

from edge.uplink import Uplink
from serving.dataplane import Observation
from shared.errors import TetherError

log = logging.getLogger(__name__)

#: A queued sample: model, version, inputs, the compared output's name and local values.
_Sample = tuple[str, str, Mapping[str, np.ndarray], str, np.ndarray]

#: Answers the same inputs with the reference (cloud) model: ``teacher(model, inputs)``.
Teacher = Callable[[str, Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]


def top1_agreement(local: np.ndarray, teacher: np.ndarray) -> tuple[int, int]:
    """``(rows compared, rows whose arg-max class is the same)`` of two score arrays."""
    if local.shape != teacher.shape or local.ndim == 0:
        return 0, 0
    if local.ndim == 1:
        local, teacher = local[None, :], teacher[None, :]
    flat_local = local.reshape(local.shape[0], -1).argmax(axis=1)
    flat_teacher = teacher.reshape(teacher.shape[0], -1).argmax(axis=1)
    return int(flat_local.shape[0]), int(np.sum(flat_local == flat_teacher))


def uplink_teacher(
    uplink: Uplink, cloud_models: Mapping[str, str] | Callable[[str], str] | None = None
) -> Teacher:
    """A teacher that asks the cloud through ``uplink``: the cloud model of the same name,
    or the one ``cloud_models`` names (a table, or a function of the model's name)."""
    table = cloud_models if isinstance(cloud_models, Mapping) else {}
    rename = cloud_models if callable(cloud_models) else None

    def ask(model: str, inputs: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        name = rename(model) if rename is not None else table.get(model, model)
        return uplink.request(name, inputs).outputs

    return ask


class ShadowRecorder(Protocol):
    """Where compared shadow rows are counted: a :class:`~edge.health.HealthRecorder`
    in-process, Prometheus counters in server workers (:mod:`edge.fleet.health_figures`)."""

    def record_shadow(self, model: str, version: str, samples: int, agreements: int) -> None: ...


class ShadowRates:
    """The shadow sample rate per ``(model, version)``; the fleet agent sets it per rollout."""

    def __init__(self) -> None:
        self._rates: dict[tuple[str, str], float] = {}

    def set(self, model: str, version: str, rate: float) -> None:
        self._rates = {**self._rates, (model, version): max(0.0, min(1.0, rate))}

    def clear(self, model: str) -> None:
        self._rates = {k: v for k, v in self._rates.items() if k[0] != model}

    def get(self, model: str, version: str) -> float:
        return self._rates.get((model, version), 0.0)


class ShadowSampler:
    """Mirrors sampled requests to a teacher and records top-1 agreement per version."""

    def __init__(
        self,
        teacher: Teacher,
        recorder: ShadowRecorder,
        rates: ShadowRates,
        *,
        max_queue: int = 64,
        seed: int | None = None,
    ) -> None:
        self.teacher = teacher
        self.recorder = recorder
        self.rates = rates
        self._queue: queue.Queue[_Sample | None]
        self._queue = queue.Queue(maxsize=max_queue)
        self._random = random.Random(seed)
        self._thread: threading.Thread | None = None
        #: Samples dropped because the queue was full, and teacher calls that failed.
        self.dropped = 0
        self.failed = 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="shadow", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=5)
            self._thread = None

    def __call__(self, seen: Observation) -> None:
        """The data-plane observer: maybe enqueue this request (never blocks)."""
        prediction = seen.prediction
        if prediction is None or seen.version is None or prediction.served_by != "edge":
            return
        rate = self.rates.get(seen.model, seen.version)
        if rate <= 0.0 or self._random.random() >= rate or not prediction.outputs:
            return
        output, scores = next(iter(prediction.outputs.items()))
        try:
            self._queue.put_nowait((seen.model, seen.version, dict(seen.inputs), output, scores))
        except queue.Full:
            self.dropped += 1

    def drain(self, timeout_s: float = 5.0) -> None:
        """Wait until every queued sample was compared (for tests and shutdown)."""
        done = threading.Event()

        def wait() -> None:
            self._queue.join()
            done.set()

        threading.Thread(target=wait, daemon=True).start()
        done.wait(timeout_s)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                model, version, inputs, output, local = item
                try:
                    answer = self.teacher(model, inputs)
                except TetherError as exc:
                    self.failed += 1
                    log.debug("shadow request for %s v%s failed: %s", model, version, exc)
                    continue
                reference = answer.get(output, next(iter(answer.values()), None))
                if reference is None:
                    continue
                samples, agreements = top1_agreement(local, np.asarray(reference))
                if samples:
                    self.recorder.record_shadow(model, version, samples, agreements)
            finally:
                self._queue.task_done()
