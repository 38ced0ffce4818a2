"""A real Mosquitto started from the shipped deploy/mosquitto/secure.conf and acl.

Only what cannot be the same on a test machine is rewritten: the two listener ports (free
loopback ports), the folder of the certificates, password file and ACL (a temporary one),
persistence (off), and, when the tests run as root, ``user root`` (so Mosquitto does not
drop to a user that cannot read the temporary folder). Every rewrite must find its line, so a change to the shipped file
that the tests would silently stop covering fails loudly instead.

:class:`Probe` is a bare paho MQTT 5 client that records the broker's reason codes
(CONNACK, SUBACK, PUBACK) and the messages it receives, to observe what the ACL allows.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import ssl
import subprocess
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from cloud.provision import FleetCA, password_line, provision
from harness.broker import free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "deploy" / "mosquitto"
ETC = "/etc/mosquitto/tether/"
NOT_AUTHORIZED = 0x87
BAD_CREDENTIALS = 0x86


@dataclass
class Pki:
    """A test fleet CA and the broker's certificate for 127.0.0.1 / localhost."""

    directory: Path
    ca: FleetCA

    @classmethod
    def create(cls, directory: Path) -> Pki:
        directory.mkdir(parents=True, exist_ok=True)
        ca = FleetCA.create("Tether test fleet CA")
        ca.save(directory)
        cert, key = ca.issue("localhost", server_hosts=["127.0.0.1", "localhost"])
        (directory / "server.crt").write_bytes(cert)
        (directory / "server.key").write_bytes(key)
        return cls(directory, ca)

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.crt"

    def client_cert(self, name: str) -> tuple[Path, Path]:
        """A client certificate with CN=name signed by the fleet CA: (cert, key) files."""
        cert, key = self.ca.issue(name)
        cert_file, key_file = self.directory / f"{name}.crt", self.directory / f"{name}.key"
        cert_file.write_bytes(cert)
        key_file.write_bytes(key)
        return cert_file, key_file


@dataclass
class Identity:
    """A provisioned broker user: its name and password."""

    name: str
    password: str


class SecureBroker:
    """Mosquitto running the shipped TLS + ACL configuration on two free loopback ports."""

    def __init__(self, workdir: Path, pki: Pki) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(binary).exists():
            raise RuntimeError("mosquitto is not installed (make install-broker)")
        self.binary = binary
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.pki = pki
        self.password_port = free_port()
        self.cert_port = free_port()
        self.identities: dict[str, Identity] = {}
        self.process: subprocess.Popen[bytes] | None = None
        for name in ("ca.crt", "server.crt", "server.key"):
            shutil.copy(pki.directory / name, workdir / name)
        shutil.copy(SHIPPED / "acl", workdir / "acl")
        (workdir / "passwd").write_text("")

    def provision(self, name: str, *, service: bool = False) -> Identity:
        """Provision ``name`` the way operators do, into this broker's password file."""
        made = provision(
            name,
            self.workdir / "provisioned" / name,
            broker_url=f"mqtts://127.0.0.1:{self.password_port}",
            password_file=self.workdir / "passwd",
            service=service,
        )
        identity = Identity(name, made.password)
        self.identities[name] = identity
        return identity

    def add_password(self, name: str, password: str) -> None:
        """Write a password-file line directly (for refusal tests)."""
        with open(self.workdir / "passwd", "a") as handle:
            handle.write(password_line(name, password) + "\n")

    def config_text(self) -> str:
        text = (SHIPPED / "secure.conf").read_text()
        rewrites = {
            "listener 8883\n": f"listener {self.password_port} 127.0.0.1\n",
            "listener 8884\n": f"listener {self.cert_port} 127.0.0.1\n",
            ETC: f"{self.workdir}/",
            "persistence true\n": "persistence false\n",
            "persistence_location /var/lib/mosquitto/\n": "",
        }
        for old, new in rewrites.items():
            assert old in text, f"deploy/mosquitto/secure.conf no longer has {old!r}"
            text = text.replace(old, new)
        if os.geteuid() == 0:
            # Started as root, Mosquitto drops to the `mosquitto` user, which cannot read
            # a root-only temporary folder; in production the files belong to that user.
            text += "user root\n"
        return text

    def url(self, identity: Identity | str, password: str | None = None) -> str:
        """``mqtts://name:password@127.0.0.1:<password port>``."""
        if isinstance(identity, str):
            identity = Identity(identity, password or self.identities[identity].password)
        return f"mqtts://{identity.name}:{identity.password}@127.0.0.1:{self.password_port}"

    def password_probe(self, identity: str, client_id: str | None = None) -> Probe:
        """A (not yet connected) probe logged in as ``identity`` with its password."""
        return Probe(
            self.password_port,
            self.pki.ca_file,
            username=identity,
            password=self.identities[identity].password,
            client_id=client_id,
        )

    def certificate_probe(self, common_name: str, client_id: str | None = None) -> Probe:
        """A (not yet connected) probe with a fleet certificate for ``common_name``."""
        return Probe(
            self.cert_port,
            self.pki.ca_file,
            cert=self.pki.client_cert(common_name),
            client_id=client_id,
        )

    def clear_retained(self, identity: str, topic: str) -> None:
        """Clear a retained message (as ``identity``, who may write ``topic``), so that a
        test leaves no retained status or order for the next one to receive."""
        probe = self.password_probe(identity).connect()
        try:
            probe.publish(topic, b"", retain=True)
        finally:
            probe.close()

    def start(self) -> SecureBroker:
        config = self.workdir / "mosquitto.conf"
        config.write_text(self.config_text())
        log = open(self.workdir / "mosquitto.log", "ab")  # noqa: SIM115
        self.process = subprocess.Popen([self.binary, "-c", str(config)], stdout=log, stderr=log)
        wait_for_port(self.password_port)
        wait_for_port(self.cert_port)
        return self

    def reload(self) -> None:
        """SIGHUP: Mosquitto re-reads the password file and the ACL."""
        assert self.process is not None
        self.process.send_signal(signal.SIGHUP)

    def log(self) -> str:
        try:
            return (self.workdir / "mosquitto.log").read_text()[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


class Refused(Exception):
    """The broker (or the TLS handshake) refused the connection."""


class Probe:
    """A bare paho MQTT 5 client that records reason codes and received messages."""

    def __init__(
        self,
        port: int,
        ca_file: Path,
        *,
        username: str | None = None,
        password: str | None = None,
        cert: tuple[Path, Path] | None = None,
        client_id: str | None = None,
    ) -> None:
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"tether-probe-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv5,
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.tls_set(
            ca_certs=str(ca_file),
            certfile=str(cert[0]) if cert else None,
            keyfile=str(cert[1]) if cert else None,
            cert_reqs=ssl.CERT_REQUIRED,
        )
        self.port = port
        self.messages: queue.Queue[paho.MQTTMessage] = queue.Queue()
        self._connack: queue.Queue[ReasonCode] = queue.Queue()
        self._acks: dict[int, queue.Queue[list[int]]] = {}
        self._lock = threading.Lock()
        #: Every disconnect, with its reason (a session taken over: 0x8E).
        self.disconnects: queue.Queue[ReasonCode] = queue.Queue()
        self.session_present = False
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self.client.on_message = lambda _c, _u, msg: self.messages.put(msg)

    def _on_connect(self, _c: Any, _u: Any, flags: Any, rc: ReasonCode, _p: Any) -> None:
        self.session_present = bool(getattr(flags, "session_present", False))
        self._connack.put(rc)

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        self.disconnects.put(rc)
        self._connack.put(
            rc if rc.is_failure else ReasonCode(PacketTypes.CONNACK, "Unspecified error")
        )

    def _ack_queue(self, mid: int) -> queue.Queue[list[int]]:
        with self._lock:
            return self._acks.setdefault(mid, queue.Queue())

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, codes: list[ReasonCode], _p: Any) -> None:
        self._ack_queue(mid).put([code.value for code in codes])

    def _on_publish(self, _c: Any, _u: Any, mid: int, rc: ReasonCode, _p: Any) -> None:
        self._ack_queue(mid).put([rc.value])

    def connect(
        self, timeout_s: float = 5.0, *, clean_start: bool = True, session_expiry_s: int = 0
    ) -> Probe:
        """Connect, or raise :class:`Refused` (bad credentials, no or foreign certificate,
        a client id the broker does not allow). ``clean_start=False`` with a session expiry
        resumes (or starts) a persistent session."""
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = session_expiry_s
        try:
            self.client.connect(
                "127.0.0.1",
                self.port,
                keepalive=10,
                clean_start=clean_start,
                properties=properties,
            )
        except (OSError, ssl.SSLError) as exc:
            raise Refused(f"{type(exc).__name__}: {exc}") from exc
        self.client.loop_start()
        try:
            rc = self._connack.get(timeout=timeout_s)
        except queue.Empty:
            self.close()
            raise Refused("no CONNACK (the connection was dropped)") from None
        if rc.is_failure:
            self.close()
            raise Refused(f"CONNACK {rc.value:#x} {rc}")
        return self

    @property
    def connected(self) -> bool:
        return self.disconnects.empty() and self.client.is_connected()

    def subscribe(self, topic_filter: str, timeout_s: float = 5.0) -> int:
        """SUBSCRIBE at QoS 1; returns the SUBACK reason code (0x87 when denied)."""
        _result, mid = self.client.subscribe(topic_filter, qos=1)
        assert mid is not None, "not connected"
        return self._ack_queue(mid).get(timeout=timeout_s)[0]

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        retain: bool = False,
        properties: Properties | None = None,
        timeout_s: float = 5.0,
    ) -> int:
        """PUBLISH at QoS 1; returns the PUBACK reason code."""
        info = self.client.publish(topic, payload, qos=1, retain=retain, properties=properties)
        return self._ack_queue(info.mid).get(timeout=timeout_s)[0]

    def received(self, wait_s: float = 0.5) -> list[paho.MQTTMessage]:
        """Messages that arrive within ``wait_s`` (after the queue drains)."""
        got: list[paho.MQTTMessage] = []
        try:
            while True:
                got.append(self.messages.get(timeout=wait_s))
        except queue.Empty:
            return got

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
