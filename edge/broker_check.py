"""What a request/response exchange costs on the device's broker, measured, not assumed.

Tether's uplink asks and is answered at QoS 0, so its round trips need no broker setting.
A QoS 1 exchange does: on a broker that leaves Nagle's algorithm on (a stock Mosquitto,
without ``set_tcp_nodelay true``), the broker's PUBACK to a client that then waits for an
answer is not acknowledged at once (the client's delayed-ACK timer, >= 40 ms on Linux),
and the answer queues behind it. A sensor that publishes readings at QoS 1 and reads its
results on the same connection sees that on every result.

An MQTT client cannot read a broker's configuration, so :func:`check_broker` measures it:
two short-lived connections with the device's own credentials, on the device's probe topic
``tether/<device>/probe/<client>/...``, time an answer to a QoS 0 question and to a QoS 1
question, a few times each. The fastest of each is compared: the stall delays every QoS 1
answer, while a loaded machine delays some round trips and never all, so a fastest QoS 1
round trip far above the fastest QoS 0 one is the stall. The edge agent logs it at
start-up and exports both times, which ``tether status`` shows.
"""

from __future__ import annotations

import logging
import queue
import statistics
import time
from dataclasses import dataclass

from shared import topics
from shared.errors import TetherError
from shared.mqtt import Message, MqttClient, TlsConfig

log = logging.getLogger(__name__)

#: A QoS 1 round trip this much slower than a QoS 0 one is a delayed-ACK stall, not noise:
#: the stall is >= 40 ms, a loopback round trip well under 5 ms.
STALL_MS = 20.0

ADVICE = (
    "the broker leaves Nagle's algorithm on (QoS 1 round trip {qos1:.1f} ms, QoS 0 {qos0:.1f} ms):"
    " Tether's cloud uplink is not affected (it uses QoS 0), but every QoS 1 answer to a client"
    " that waits for it (a sensor reading its results) waits ~40 ms for a delayed ACK; add"
    " `set_tcp_nodelay true` to the Mosquitto config (docs/troubleshooting.md)"
)


@dataclass(frozen=True)
class BrokerCheck:
    """The median round trip through the broker, in milliseconds, by the question's QoS (the
    median, not the fastest: a busy machine can let one QoS 1 exchange slip past the stall)."""

    qos0_ms: float
    qos1_ms: float

    @property
    def nagle_stall(self) -> bool:
        """Whether QoS 1 answers wait for a delayed ACK (the broker lacks TCP_NODELAY)."""
        return self.qos1_ms - self.qos0_ms > STALL_MS

    def advice(self) -> str | None:
        """What to change on the broker, or ``None`` when nothing needs to."""
        if not self.nagle_stall:
            return None
        return ADVICE.format(qos0=self.qos0_ms, qos1=self.qos1_ms)


def check_broker(
    url: str,
    device_id: str,
    client_id: str,
    *,
    tls: TlsConfig | None = None,
    samples: int = 7,
    timeout_s: float = 3.0,
) -> BrokerCheck:
    """Measure the broker at ``url`` as ``device_id``; raises a Tether error when it cannot
    (broker down, probe topic not allowed by the broker's ACL, no answer in ``timeout_s``).
    """
    base = topics.broker_probe(device_id, client_id)
    ask, answer = f"{base}/ask", f"{base}/answer"
    answers: queue.Queue[bytes] = queue.Queue()
    asker = MqttClient(url, f"{client_id}-pa", tls=tls)
    echo = MqttClient(url, f"{client_id}-pb", tls=tls)

    def reply(message: Message) -> None:
        echo.publish(answer, message.payload, qos=0)

    asker.subscribe(answer, lambda message: answers.put(message.payload), qos=0)
    echo.subscribe(ask, reply, qos=1)
    try:
        for client in (asker, echo):
            client.start(wait_s=timeout_s)
        for client, topic in ((asker, answer), (echo, ask)):
            if not client.wait_subscribed(topic, timeout_s):
                raise TetherError(f"the broker did not grant the probe topic {topic}", status=503)
        times = {qos: _round_trips(asker, ask, answers, qos, samples, timeout_s) for qos in (0, 1)}
    finally:
        asker.stop()
        echo.stop()
    return BrokerCheck(qos0_ms=statistics.median(times[0]), qos1_ms=statistics.median(times[1]))


def _round_trips(
    asker: MqttClient,
    ask: str,
    answers: queue.Queue[bytes],
    qos: int,
    samples: int,
    timeout_s: float,
) -> list[float]:
    times: list[float] = []
    for index in range(samples + 1):  # the first one warms the path up
        token = f"{qos}-{index}".encode()
        started = time.perf_counter()
        asker.publish(ask, token, qos=qos)
        until = started + timeout_s
        while True:
            try:
                got = answers.get(timeout=max(0.0, until - time.perf_counter()))
            except queue.Empty:
                raise TetherError(
                    f"no answer on the broker probe within {timeout_s:g}s", status=504
                ) from None
            if got == token:
                break
        if index:
            times.append((time.perf_counter() - started) * 1000.0)
    return times
