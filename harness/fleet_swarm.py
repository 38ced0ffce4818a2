"""Thousands of simulated devices: asyncio MQTT clients (aiomqtt) spread over a few processes.

The same protocol as :class:`harness.fleet_sim.SimDevice`, at fleet scale: each device has
its own MQTT connection with a retained status and a last will, follows retained rollout
orders, verifies the signed manifest (:func:`shared.manifest.verify_manifest`), downloads
the artifact in two HTTP Range requests and checks its sha256, and reports every step as
a :class:`~shared.fleet.RolloutEvent`. One process holds a few thousand devices on one
event loop; :class:`Swarm` starts the processes and steers them (connect, go offline,
come back, change behaviour, read their state) through pipes.

Mosquitto needs a file descriptor per device: :class:`Swarm` raises this process's own
``RLIMIT_NOFILE`` to the hard limit, and the broker inherits what its parent has (see
``bench/rollout.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import multiprocessing
import resource
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
import orjson
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from harness.fleet_sim import Behaviour, OrderGate
from shared.errors import SignatureError
from shared.fleet import DeviceStatus, HealthReport, ModelState, RolloutEvent, RolloutOrder
from shared.manifest import load_public_key, verify_manifest
from shared.topics import device_rollout, device_rollout_events, device_status

#: Seconds one device waits to connect before it counts as failed (a loaded broker
#: answers thousands of CONNECTs in a burst; nothing is waited out when all is well).
CONNECT_TIMEOUT_S = 60.0
#: Seconds :meth:`Swarm.connect` waits for every device to be online (they retry).
ONLINE_TIMEOUT_S = 600.0
#: Tries per Range request (0.2 s, 0.4 s, ... apart), like the agent's downloader.
DOWNLOAD_ATTEMPTS = 6


def raise_open_files_limit() -> int:
    """Raise this process's open-file limit to its hard limit (children inherit it)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


@dataclass
class SwarmDevice:
    """What one simulated device is and runs."""

    name: str
    labels: dict[str, str]
    models: dict[str, int]
    previous: dict[str, int | None] = field(default_factory=dict)
    trusted_version: dict[str, int] = field(default_factory=dict)
    steps: list[str] = field(default_factory=list)
    bytes_downloaded: int = 0
    generation: int = 0


class _Device:
    """One device's connection and order handling, on the process's event loop."""

    def __init__(self, spec: SwarmDevice, host: str, port: int, shared: _Process) -> None:
        self.spec = spec
        self.host, self.port = host, port
        self.shared = shared
        self.online = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.client: aiomqtt.Client | None = None
        self.crash = False
        self.gate = OrderGate(spec.name, shared.trusted_keys)

    def start(self) -> None:
        if self.task is None or self.task.done():
            self.crash = False
            self.task = asyncio.get_running_loop().create_task(self._run())

    async def go_offline(self, *, will: bool) -> None:
        """Drop off: with ``will`` as a power cut would (the broker sends the last will)."""
        client, task = self.client, self.task
        if client is None or task is None:
            return
        if will:
            self.crash = True
            # MQTT 5 reason 0x04, "disconnect with will message": the broker publishes the
            # will exactly as after a lost connection.
            client._client.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, identifier=4))
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        self.online.clear()
        self.client = None

    async def _run(self) -> None:
        """Stay connected, as an agent does: after a refused or lost connection, connect
        again with backoff (1 s doubling to 30 s) until taken offline."""
        delay = 1.0
        while True:
            try:
                await self._session()
                delay = 1.0
            except aiomqtt.MqttError as exc:
                if self.crash:
                    return
                self.online.clear()
                self.client = None
                self.shared.reconnects += 1
                self.shared.last_error = f"{self.spec.name}: {exc}"
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    async def _session(self) -> None:
        name = self.spec.name
        will = orjson.dumps({"kind": "device_status", "device": name, "online": False})
        client = aiomqtt.Client(
            self.host,
            self.port,
            identifier=f"swarm-{name}",
            protocol=aiomqtt.ProtocolVersion.V5,
            will=aiomqtt.Will(device_status(name), will, qos=1, retain=True),
            keepalive=120,
            timeout=CONNECT_TIMEOUT_S,
        )
        async with client:
            self.client = client
            await client.subscribe(device_rollout(name), qos=1)
            await self.publish_status()
            self.online.set()
            async for message in client.messages:
                payload = bytes(message.payload) if message.payload else b""
                if payload:
                    self.shared.spawn(self._handle(payload))

    async def publish_status(self) -> None:
        spec = self.spec
        status = DeviceStatus(
            device=spec.name,
            online=True,
            agent_version="0.1.0",
            hardware="cpu",
            labels=spec.labels,
            models={
                m: ModelState(active=v, previous=spec.previous.get(m), state="ready")
                for m, v in spec.models.items()
            },
            at=time.time(),
        )
        await self._publish(device_status(spec.name), status.dump(), retain=True)

    async def _publish(self, topic: str, body: dict[str, Any], *, retain: bool = False) -> None:
        if self.client is not None:
            await self.client.publish(topic, orjson.dumps(body), qos=1, retain=retain)

    async def _report(self, order: RolloutOrder, version: int, step: str, **extra: Any) -> None:
        self.spec.steps.append(step)
        event = RolloutEvent(
            rollout_id=order.rollout_id,
            device=self.spec.name,
            model=order.model,
            version=version,
            step=step,
            at=time.time(),
            **extra,
        )
        await self._publish(device_rollout_events(self.spec.name), event.dump())

    async def _handle(self, payload: bytes) -> None:
        behaviour = self.shared.behaviour
        if behaviour.silent:
            return
        order = self.gate.accept(payload)
        if order is None:
            return
        self.spec.generation += 1
        generation = self.spec.generation
        try:
            if order.action == "install":
                await self._install(order, generation, behaviour)
            else:
                await self._rollback(order)
        except Exception as exc:  # a simulated agent reports, never dies
            await self._report(order, 0, "failed", reason=f"{type(exc).__name__}: {exc}")

    async def _install(self, order: RolloutOrder, generation: int, behaviour: Behaviour) -> None:
        assert order.signed_manifest is not None
        spec, model = self.spec, order.model
        version = order.signed_manifest.manifest.version
        if spec.models.get(model) == version:
            return  # the same retained order again after a reconnect
        await self._report(order, version, "received")
        try:
            manifest = verify_manifest(
                order.signed_manifest,
                self.shared.trusted_keys,
                now=time.time(),
                last_trusted_version=spec.trusted_version.get(model, spec.models.get(model)),
            )
        except SignatureError as exc:
            await self._report(order, version, "refused", reason=exc.message)
            return
        await self._report(order, version, "downloading")
        data = await self.shared.download(manifest.url, manifest.size)
        spec.bytes_downloaded += len(data)
        await self._report(order, version, "verifying")
        if hashlib.sha256(data).hexdigest() != manifest.sha256:
            await self._report(order, version, "failed", reason="artifact sha256 mismatch")
            return
        spec.trusted_version[model] = version
        await self._report(order, version, "staged", bytes_downloaded=len(data))
        if behaviour.self_test_fails:
            await self._report(order, version, "failed", reason="self-test failed: NaN outputs")
            return
        if generation != spec.generation:
            return  # a newer order arrived
        spec.previous[model] = spec.models.get(model)
        spec.models[model] = version
        await self.publish_status()
        await self._report(order, version, "active")
        if order.health_window_s:
            await asyncio.sleep(order.health_window_s)
        if generation != spec.generation or self.client is None:
            return
        b = behaviour
        health = HealthReport(
            requests=b.requests,
            errors=round(b.requests * b.error_rate),
            p99_ms=b.p99_ms,
            shadow_samples=max(1, round(b.requests * order.shadow_sample_rate)),
            shadow_agreement=b.shadow_agreement,
            baseline_p99_ms=b.baseline_p99_ms,
            baseline_error_rate=b.baseline_error_rate,
            baseline_shadow_agreement=b.baseline_shadow_agreement,
            baseline_shadow_samples=b.baseline_shadow_samples,
        )
        await self._report(order, version, "committed", health=health)

    async def _rollback(self, order: RolloutOrder) -> None:
        spec, model = self.spec, order.model
        if order.rollback_to is None:
            spec.models.pop(model, None)
        else:
            spec.models[model] = order.rollback_to
        spec.previous[model] = None
        await self.publish_status()
        reason = "aborted" if order.action == "abort" else ""
        await self._report(order, order.rollback_to or 0, "rolled_back", reason=reason)


class _Process:
    """The devices of one swarm process, their shared keys, behaviour and HTTP downloads."""

    def __init__(self, broker_url: str, public_keys: list[str], specs: list[SwarmDevice]):
        address = urlsplit(broker_url)
        self.trusted_keys = [load_public_key(k) for k in public_keys]
        self.behaviour = Behaviour()
        self.devices = {
            s.name: _Device(s, address.hostname or "127.0.0.1", address.port or 1883, self)
            for s in specs
        }
        #: Connections refused or lost and tried again (a loaded broker refuses some).
        self.reconnects = 0
        self.last_error = ""
        self.tasks: set[asyncio.Task[None]] = set()
        #: Downloads at once per process (the artifact server's worker threads are few).
        self.downloads = asyncio.Semaphore(16)

    def spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def download(self, url: str, size: int) -> bytes:
        """The artifact in two Range requests, as a resumed download fetches it; a failed
        request is retried with backoff, as the fleet agent's downloader does."""
        half = size // 2
        ranges = [(0, half - 1), (half, size - 1)] if half else [(0, size - 1)]
        parts = []
        async with self.downloads:
            for first, last in ranges:
                for attempt in range(DOWNLOAD_ATTEMPTS):
                    try:
                        parts.append(await _get_range(url, first, last))
                        break
                    except (OSError, asyncio.IncompleteReadError, ValueError):
                        if attempt == DOWNLOAD_ATTEMPTS - 1:
                            raise
                        await asyncio.sleep(0.2 * 2**attempt)
        return b"".join(parts)

    async def connect(self, names: list[str]) -> int:
        chosen = [self.devices[n] for n in names]
        for device in chosen:
            device.start()
        await asyncio.gather(
            *(asyncio.wait_for(d.online.wait(), ONLINE_TIMEOUT_S) for d in chosen),
            return_exceptions=True,
        )
        return sum(1 for d in chosen if d.online.is_set())

    async def offline(self, names: list[str], will: bool) -> int:
        await asyncio.gather(*(self.devices[n].go_offline(will=will) for n in names))
        return len(names)

    def state(self) -> dict[str, Any]:
        return {
            "devices": {
                name: {
                    "models": d.spec.models,
                    "steps": d.spec.steps,
                    "bytes": d.spec.bytes_downloaded,
                    "online": d.online.is_set(),
                }
                for name, d in self.devices.items()
            },
            "reconnects": self.reconnects,
            "last_error": self.last_error,
        }


async def _get_range(url: str, first: int, last: int) -> bytes:
    """One HTTP/1.1 GET with ``Range: bytes=first-last`` on a fresh connection."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
    try:
        writer.write(
            f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"Range: bytes={first}-{last}\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if status != 206:
            raise OSError(f"artifact server answered {status} to a Range request")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        return await reader.readexactly(length)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def _serve(pipe: Connection, broker_url: str, keys: list[str], specs: list[SwarmDevice]) -> None:
    """A swarm process: runs commands from ``pipe`` on one event loop until ``stop``."""
    raise_open_files_limit()

    async def main() -> None:
        swarm = _Process(broker_url, keys, specs)
        loop = asyncio.get_running_loop()
        while True:
            command, args = await loop.run_in_executor(None, pipe.recv)
            if command == "stop":
                await swarm.offline([n for n, d in swarm.devices.items() if d.client], False)
                pipe.send(None)
                return
            if command == "connect":
                pipe.send(await swarm.connect(args))
            elif command == "offline":
                pipe.send(await swarm.offline(args["names"], args["will"]))
            elif command == "behaviour":
                swarm.behaviour = args
                pipe.send(None)
            elif command == "state":
                pipe.send(swarm.state())

    asyncio.run(main())


class Swarm:
    """``size`` simulated devices in ``processes`` processes, steered from this one."""

    def __init__(
        self,
        broker_url: str,
        public_keys: list[str],
        size: int,
        *,
        processes: int = 4,
        prefix: str = "swarm",
        labels: dict[str, str] | None = None,
        models: dict[str, int] | None = None,
    ) -> None:
        raise_open_files_limit()
        self.names = [f"{prefix}-{i:05d}" for i in range(size)]
        context = multiprocessing.get_context("spawn")
        self._pipes: list[Connection] = []
        self._owner: dict[str, int] = {}
        self._processes = []
        count = max(1, min(processes, size))
        for index in range(count):
            names = self.names[index::count]
            specs = [
                SwarmDevice(n, dict(labels or {}), dict(models or {"digits": 1})) for n in names
            ]
            ours, theirs = context.Pipe()
            process = context.Process(
                target=_serve, args=(theirs, broker_url, public_keys, specs), daemon=True
            )
            process.start()
            self._pipes.append(ours)
            self._processes.append(process)
            self._owner.update({n: index for n in names})

    def _ask(self, command: str, per_process: list[Any]) -> list[Any]:
        for pipe, args in zip(self._pipes, per_process, strict=True):
            pipe.send((command, args))
        return [pipe.recv() for pipe in self._pipes]

    def _split(self, names: list[str]) -> list[list[str]]:
        groups: list[list[str]] = [[] for _ in self._pipes]
        for name in names:
            groups[self._owner[name]].append(name)
        return groups

    def connect(self, names: list[str] | None = None) -> int:
        """Bring devices online (status published, orders subscribed); how many made it."""
        return sum(self._ask("connect", self._split(names or self.names)))

    def offline(self, names: list[str], *, will: bool = True) -> None:
        """Take devices offline; ``will``: abruptly, so the broker publishes their will."""
        groups = self._split(names)
        self._ask("offline", [{"names": g, "will": will} for g in groups])

    def behave(self, behaviour: Behaviour) -> None:
        self._ask("behaviour", [behaviour for _ in self._pipes])

    def state(self) -> dict[str, dict[str, Any]]:
        """Per device: models, steps, bytes downloaded, online."""
        devices: dict[str, dict[str, Any]] = {}
        for part in self._ask("state", [None for _ in self._pipes]):
            devices.update(part["devices"])
        return devices

    def reconnects(self) -> tuple[int, str]:
        """Connections refused or lost so far, and the last such error."""
        parts = self._ask("state", [None for _ in self._pipes])
        last = next((p["last_error"] for p in parts if p["last_error"]), "")
        return sum(p["reconnects"] for p in parts), last

    def stop(self) -> None:
        with contextlib.suppress(OSError, EOFError):
            self._ask("stop", [None for _ in self._pipes])
        for process in self._processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
