"""The one adapter around paho-mqtt (MQTT 5): every paho callback lives in this module.

The rest of Tether sees plain calls (:meth:`MqttClient.publish`, :meth:`MqttClient.subscribe`),
handler functions that receive :class:`Message` objects, and Tether errors. The client
reconnects by itself with exponential backoff, resubscribes everything after a reconnect,
and sets ``TCP_NODELAY`` on its socket: without it, small QoS 1 packets (PUBLISH, PUBACK)
wait on Nagle's algorithm and the peer's delayed ACK, costing ~40 ms per hop (see
docs/troubleshooting.md).

paho runs in its threaded mode (``loop_start``): any thread may publish, subscribe or
acknowledge, and only paho's network thread touches the socket. (Driving ``loop_forever``
from a thread of our own would put paho in its single-threaded mode, where every publish
writes to the socket from the caller's thread: two threads' large messages then
interleave on the wire, and a TLS connection is read and written from two threads at
once; either way the broker drops the connection.)

Handlers run on paho's network thread: they must be quick and hand real work to a queue.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties, VariableByteIntegers, writeBytes, writeInt32, writeUTF
from paho.mqtt.reasoncodes import ReasonCode

from shared.errors import InvalidInput, Unavailable

log = logging.getLogger(__name__)


class MqttError(Unavailable):
    """The broker cannot be reached, or refused what was asked."""

    reason = "mqtt"


class ConnectError(MqttError):
    """Connecting to the broker failed (unreachable, bad credentials, not authorised)."""


class NegativeAckError(MqttError):
    """The broker answered with a failing reason code."""

    def __init__(self, message: str, reason_code: int) -> None:
        super().__init__(message)
        self.reason_code = reason_code


@dataclass(frozen=True)
class TlsConfig:
    """TLS for the broker connection: CA bundle, and a client certificate if used."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False


@dataclass(frozen=True)
class BrokerAddress:
    """Where the broker is and how to log in: ``mqtt[s]://[user[:password]@]host[:port]``."""

    host: str = "127.0.0.1"
    port: int = 1883
    tls: bool = False
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise InvalidInput(f"broker URL must start with mqtt:// or mqtts://, got {url!r}")
        tls = parts.scheme in ("mqtts", "ssl")
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError:
            raise InvalidInput(f"bad port in broker URL {url!r}") from None
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=port,
            tls=tls,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )

    def url(self) -> str:
        """The URL without the password (for logs)."""
        user = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"


@dataclass
class Message:
    """A received MQTT message, with the MQTT 5 properties Tether uses."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    response_topic: str | None = None
    correlation_data: bytes | None = None
    user_properties: dict[str, str] = field(default_factory=dict)
    content_type: str | None = None
    #: Seconds left of the publisher's message expiry when the broker delivered it.
    expiry_s: int | None = None
    mid: int = 0
    #: The broker's DUP flag: it delivered this message before (a redelivery after reconnect).
    dup: bool = False
    _client: MqttClient | None = field(default=None, repr=False)

    def ack(self) -> None:
        """Acknowledge a QoS 1 message (only for clients created with ``manual_ack``)."""
        if self._client is not None and self.qos > 0:
            self._client.ack(self)


@dataclass(frozen=True)
class Will:
    """The last-will message the broker publishes if this client drops off."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


class Delivery:
    """One published message on its way to the broker (what :meth:`MqttClient.publish` returns).

    At QoS 0 it is delivered once written to the socket, at QoS 1 once the broker's PUBACK
    is back. A message that can no longer be delivered on this connection (it dropped before
    the message was sent) never becomes published.
    """

    __slots__ = ("_info",)

    def __init__(self, info: paho.MQTTMessageInfo) -> None:
        self._info = info

    @property
    def mid(self) -> int:
        """The message's packet id on this connection."""
        return int(self._info.mid)

    def is_published(self) -> bool:
        """Whether the broker has it (QoS 1: acknowledged it)."""
        try:
            return bool(self._info.is_published())
        except (RuntimeError, ValueError):  # paho: not queued, or the queue was dropped
            return False

    def wait_for_publish(self, timeout_s: float | None = None) -> bool:
        """Wait up to ``timeout_s`` for :meth:`is_published`; returns it. Raises
        :class:`MqttError` when the message can no longer be delivered on this connection."""
        try:
            self._info.wait_for_publish(timeout_s)
        except (RuntimeError, ValueError) as exc:
            raise MqttError(f"message {self._info.mid} will not be delivered: {exc}") from None
        return self.is_published()


Handler = Callable[[Message], None]
ConnectionListener = Callable[[bool], None]


class MqttClient:
    """One MQTT 5 connection with automatic reconnect and resubscription."""

    def __init__(
        self,
        address: BrokerAddress | str,
        client_id: str,
        *,
        tls: TlsConfig | None = None,
        keepalive: int = 15,
        manual_ack: bool = False,
        clean_start: bool = True,
        session_expiry_s: int = 0,
        will: Will | None = None,
        reconnect_min_s: float = 0.1,
        reconnect_max_s: float = 2.0,
        max_inflight: int = 1000,
        receive_maximum: int | None = None,
    ) -> None:
        self.address = BrokerAddress.parse(address) if isinstance(address, str) else address
        self.client_id = client_id
        self._connected = threading.Event()
        self._stopping = False
        self._subscriptions: dict[str, tuple[int, Handler]] = {}
        #: Guards the subscriptions against a connect that happens while one is added.
        self._lock = threading.Lock()
        #: SUBSCRIBE packets awaiting their SUBACK (packet id -> filter); set once granted.
        self._suback_mids: dict[int, str] = {}
        self._granted: dict[str, threading.Event] = {}
        #: Handlers kept after ``unsubscribe(keep_handler=True)`` for messages still on the way.
        self._retired: dict[str, Handler] = {}
        self._listeners: list[ConnectionListener] = []
        self._last_error: str = "not connected yet"
        self._session_expiry_s = session_expiry_s
        self._clean_start = clean_start
        #: MQTT 5 Receive Maximum: unacknowledged QoS 1 messages the broker may send at once.
        self._receive_maximum = receive_maximum
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5,
            reconnect_on_failure=True,
            manual_ack=manual_ack,
        )
        # paho annotates the delays as int but computes with them as float
        self._client.reconnect_delay_set(reconnect_min_s, reconnect_max_s)  # type: ignore[arg-type]
        self._client.max_inflight_messages_set(max_inflight)
        self._client.max_queued_messages_set(0)
        self._keepalive = keepalive
        if self.address.username:
            self._client.username_pw_set(self.address.username, self.address.password)
        if self.address.tls or tls is not None:
            tls = tls or TlsConfig()
            self._client.tls_set(
                ca_certs=tls.ca_file,
                certfile=tls.cert_file,
                keyfile=tls.key_file,
                cert_reqs=ssl.CERT_REQUIRED,
            )
            self._client.tls_insecure_set(tls.insecure)
        if will is not None:
            self._client.will_set(will.topic, will.payload, will.qos, will.retain)
        self._client.on_connect = self._on_connect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._client.on_socket_open = _on_socket_open

    # ------------------------------------------------------------------ lifecycle

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def last_error(self) -> str:
        return self._last_error

    def start(self, wait_s: float | None = 5.0) -> None:
        """Connect in the background; wait up to ``wait_s`` for the first connection.

        With ``wait_s=None`` it returns at once and keeps trying. A connection refused
        for bad credentials or authorisation raises :class:`ConnectError` when waiting.
        """
        self._stopping = False
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = self._session_expiry_s
        if self._receive_maximum is not None:
            properties.ReceiveMaximum = self._receive_maximum
        self._client.connect_async(
            self.address.host,
            self.address.port,
            keepalive=self._keepalive,
            clean_start=self._clean_start,
            properties=properties,
        )
        self._client.loop_start()  # paho's network thread connects, retries and reconnects
        if wait_s is not None and not self._connected.wait(wait_s):
            raise ConnectError(
                f"could not connect to {self.address.url()} within {wait_s:g}s: {self._last_error}"
            )

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    def stop(self) -> None:
        """Disconnect cleanly (no last will) and stop the network thread."""
        self._stopping = True
        with contextlib.suppress(Exception):  # best effort on shutdown
            self._client.disconnect()
        self._client.loop_stop()
        # paho (2.2) makes a socket pair to wake its network thread on every loop_start and
        # closes it only when the client is garbage collected: two descriptors per stopped
        # client. They add up where one process runs many clients, and paho's select()
        # cannot watch a descriptor numbered 1024 or more (its client then never connects).
        with contextlib.suppress(Exception):
            self._client._reset_sockets(sockpair_only=True)
        self._connected.clear()

    def add_connection_listener(self, listener: ConnectionListener) -> None:
        """Call ``listener(True/False)`` on every connect and disconnect."""
        self._listeners.append(listener)

    # ------------------------------------------------------------------ paho callbacks

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: Any,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:  # paho drops the connection and tries again later
            self._last_error = f"broker refused the connection: {reason_code}"
            log.warning("%s: %s", self.client_id, self._last_error)
            return
        with self._lock:  # a subscribe() racing this connect is sent once, here or there
            self._suback_mids.clear()
            for topic, (qos, _handler) in self._subscriptions.items():
                self._send_subscribe(topic, qos)
            was = self._connected.is_set()
            self._connected.set()
        if not was:
            self._notify(True)

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        """A connection attempt failed (paho calls this while handling the OSError)."""
        exc = sys.exc_info()[1]
        self._last_error = f"{type(exc).__name__}: {exc}" if exc else "could not connect"

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: Any,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if not self._stopping and self._connected.is_set():
            self._last_error = f"disconnected: {reason_code}"
            log.info("%s lost the broker: %s", self.client_id, reason_code)
        self._set_connected(False)

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        with self._lock:
            topic_filter = self._suback_mids.pop(mid, None)
            granted = self._granted.get(topic_filter) if topic_filter is not None else None
        if granted is None:
            return
        refused = [code for code in reason_codes if code.is_failure]
        if refused:
            log.warning("%s: the broker refused %s: %s", self.client_id, topic_filter, refused[0])
            return
        granted.set()

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        message = _to_message(msg, self)
        for topic_filter, (_qos, handler) in list(self._subscriptions.items()):
            if topic_matches(topic_filter, message.topic):
                try:
                    handler(message)
                except Exception:
                    log.exception("handler for %s failed on %s", topic_filter, message.topic)
                return
        for topic_filter, retired in list(self._retired.items()):
            if topic_matches(topic_filter, message.topic):
                try:
                    retired(message)
                except Exception:
                    log.exception("handler for %s failed on %s", topic_filter, message.topic)
                return

    def _set_connected(self, connected: bool) -> None:
        was = self._connected.is_set()
        if connected:
            self._connected.set()
        else:
            self._connected.clear()
        if was != connected:
            self._notify(connected)

    def _notify(self, connected: bool) -> None:
        for listener in list(self._listeners):
            try:
                listener(connected)
            except Exception:
                log.exception("connection listener failed")

    # ------------------------------------------------------------------ operations

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        """Deliver messages matching ``topic_filter`` to ``handler``; kept across reconnects.

        :meth:`wait_subscribed` waits until the broker has granted it.
        """
        with self._lock:
            self._subscriptions[topic_filter] = (qos, handler)
            self._retired.pop(topic_filter, None)
            self._granted[topic_filter] = threading.Event()
            if self._connected.is_set():
                self._send_subscribe(topic_filter, qos)

    def wait_subscribed(self, topic_filter: str, timeout_s: float) -> bool:
        """Whether the broker granted the latest :meth:`subscribe` to ``topic_filter`` (its
        SUBACK came back without a failure code) within ``timeout_s``. From then on every
        message published to a matching topic reaches the handler."""
        with self._lock:
            granted = self._granted.get(topic_filter)
        return granted is not None and granted.wait(timeout_s)

    def _send_subscribe(self, topic_filter: str, qos: int) -> None:
        """Send one SUBSCRIBE (with ``_lock`` held) and remember its packet id."""
        result, mid = self._client.subscribe(topic_filter, qos)
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS:
            log.warning(
                "subscribe to %s failed now (%s); retried on reconnect", topic_filter, result
            )
            return
        if mid is not None:
            self._suback_mids[mid] = topic_filter

    def unsubscribe(self, topic_filter: str, *, keep_handler: bool = False) -> None:
        """Stop the subscription (not renewed on reconnect).

        With ``keep_handler`` the handler still receives messages the broker routed before
        it applied the UNSUBSCRIBE: they are already acknowledged, so dropping them would
        lose them (a draining consumer wants them).
        """
        with self._lock:
            entry = self._subscriptions.pop(topic_filter, None)
            self._granted.pop(topic_filter, None)
        if keep_handler and entry is not None:
            self._retired[topic_filter] = entry[1]
        if self.connected:
            self._client.unsubscribe(topic_filter)

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
        expiry_s: float | None = None,
        user_properties: dict[str, str] | None = None,
        content_type: str | None = None,
    ) -> Delivery:
        """Publish; raises :class:`MqttError` at once when not connected.

        Returns the :class:`Delivery` (``wait_for_publish()`` waits for the broker's PUBACK).
        """
        if not self.connected:
            raise MqttError(f"not connected to {self.address.url()}: {self._last_error}")
        properties: Properties | None = None
        if response_topic or correlation_data or expiry_s or user_properties or content_type:
            properties = PackedPublishProperties(
                response_topic=response_topic,
                correlation_data=correlation_data,
                expiry_s=max(1, int(expiry_s + 0.999)) if expiry_s else None,
                content_type=content_type,
                user_properties=user_properties,
            )
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise MqttError(f"publish to {topic} failed: {paho.error_string(info.rc)}")
        return Delivery(info)

    def ack(self, message: Message) -> None:
        """Send the PUBACK for a manually acknowledged message."""
        self._client.ack(message.mid, message.qos)


class PackedPublishProperties(Properties):
    """A PUBLISH's MQTT 5 properties, packed once into their wire bytes.

    paho's generic :class:`Properties` validates every attribute against its whole table and
    packs through several layers: ~20 µs per message, a tenth of a cloud round trip on a
    quiet machine (docs/performance.md). paho only calls :meth:`pack` on what it is given
    to publish, so this packs the few properties Tether sends directly (MQTT 5.0 §2.2.2,
    §3.3.2.3): the same bytes, the same meaning.
    """

    _packed: bytes

    def __init__(
        self,
        *,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
        expiry_s: int | None = None,
        content_type: str | None = None,
        user_properties: dict[str, str] | None = None,
    ) -> None:
        # paho's __init__ and __setattr__ build its property table: skipped on purpose
        parts: list[bytes] = []
        if expiry_s is not None:
            parts.append(b"\x02" + writeInt32(expiry_s))
        if content_type is not None:
            parts.append(b"\x03" + _utf8(content_type))
        if response_topic is not None:
            parts.append(b"\x08" + _utf8(response_topic))
        if correlation_data is not None:
            if len(correlation_data) > 0xFFFF:
                raise InvalidInput("correlation data is over 65,535 bytes")
            parts.append(b"\x09" + writeBytes(correlation_data))
        for key, value in (user_properties or {}).items():
            parts.append(b"\x26" + _utf8(key) + _utf8(value))
        body = b"".join(parts)
        object.__setattr__(self, "packetType", PacketTypes.PUBLISH)
        object.__setattr__(self, "_packed", VariableByteIntegers.encode(len(body)) + body)

    def pack(self) -> bytes:
        return self._packed

    def isEmpty(self) -> bool:
        return self._packed == b"\x00"


def _utf8(text: str) -> bytes:
    """An MQTT UTF-8 string (two length bytes, then the bytes), refused past 65,535 bytes."""
    data = text.encode("utf-8")
    if len(data) > 0xFFFF:
        raise InvalidInput("an MQTT string is over 65,535 bytes")
    return bytes(writeUTF(data))


def _on_socket_open(client: paho.Client, userdata: Any, sock: Any) -> None:
    with contextlib.suppress(OSError, AttributeError):  # TLS-wrapped or non-TCP sockets
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _to_message(msg: paho.MQTTMessage, client: MqttClient) -> Message:
    props = getattr(msg, "properties", None)
    response_topic = getattr(props, "ResponseTopic", None) if props else None
    correlation = getattr(props, "CorrelationData", None) if props else None
    content_type = getattr(props, "ContentType", None) if props else None
    user_props = dict(getattr(props, "UserProperty", []) or []) if props else {}
    expiry = getattr(props, "MessageExpiryInterval", None) if props else None
    return Message(
        topic=msg.topic,
        payload=bytes(msg.payload),
        qos=msg.qos,
        retain=bool(msg.retain),
        response_topic=response_topic,
        correlation_data=bytes(correlation) if correlation is not None else None,
        user_properties=user_props,
        content_type=content_type,
        expiry_s=int(expiry) if expiry is not None else None,
        mid=msg.mid,
        dup=bool(msg.dup),
        _client=client,
    )


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic-filter matching (``+`` and ``#``), including shared subscriptions."""
    if topic_filter.startswith("$share/"):
        topic_filter = topic_filter.split("/", 2)[2]
    return bool(paho.topic_matches_sub(topic_filter, topic))
