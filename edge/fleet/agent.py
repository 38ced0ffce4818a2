"""The fleet agent: installs signed model versions the cloud rolls out, and undoes them.

One :class:`FleetAgent` per device listens on ``tether/<device>/rollout`` (a retained
order, so it comes again after every reconnect and restart: handling it is idempotent).
For an ``install`` it verifies the manifest (trusted ed25519 key, not expired, newer than
the last version it trusted), checks free disk, downloads with resume, checks the sha256,
stages the version (a numeric folder only ever appears complete), self-tests it on a
runtime of its own, and switches the served version atomically. It then watches the new
version's health for the health window and commits it, or returns to the previous
version by itself: after a failed switch, an unhealthy window, a crash loop, or a
``rollback``/``abort`` order. Every step is reported on ``tether/<device>/rollout/events``.

Everything it must remember is in :class:`~edge.fleet.state.StateStore`, written
atomically before each step takes effect, so a SIGKILL at any moment leaves a device
that, on restart (:meth:`FleetAgent.recover`), serves a complete, verified version.

This module only wires the parts together: the order intake (:mod:`edge.fleet.orders`:
signature, replay, ownership, dedupe, aborts), the install pipeline
(:mod:`edge.fleet.install`), the switch between versions (:mod:`edge.fleet.versions`) and
the health window (:mod:`edge.fleet.health_window`). Model names come only from signed
orders and are checked again before they become folders (``edge.fleet.staging.model_folder``).

All work runs on one thread per agent; the MQTT handler only verifies and queues orders
(and cancels a running download when a newer order for the model arrives).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from edge.fleet.context import FleetContext, StepHook
from edge.fleet.downloader import Downloader
from edge.fleet.health_window import HealthWindow
from edge.fleet.install import Cancelled, InstallPipeline
from edge.fleet.kept_artifacts import KeptArtifacts
from edge.fleet.orders import UNVERIFIED_ORDER, OrderIntake
from edge.fleet.state import FleetState
from edge.fleet.target import ServingTarget
from edge.fleet.versions import VersionSwitch
from edge.health import HealthSource
from edge.session_ids import session_client_id
from edge.settings import EdgeSettings
from edge.shadow import ShadowRates
from shared import topics
from shared.fleet import RolloutOrder
from shared.manifest import load_public_key
from shared.mqtt import MqttClient
from shared.order_signing import OrderRefused, VerifiedOrder

__all__ = ["UNVERIFIED_ORDER", "Cancelled", "FleetAgent", "StepHook"]

log = logging.getLogger(__name__)

#: What the MQTT handler queues for the work thread.
_Work = tuple[str, VerifiedOrder | OrderRefused | None]


class FleetAgent:
    """Receives rollout orders for one device and carries them out."""

    def __init__(
        self,
        settings: EdgeSettings,
        target: ServingTarget,
        *,
        health: HealthSource | None = None,
        shadow_rates: ShadowRates | None = None,
        downloader: Downloader | None = None,
        step_hook: StepHook | None = None,
        clock: Callable[[], float] = time.time,
        client_id: str | None = None,
    ) -> None:
        self.ctx = ctx = FleetContext(settings, target, step_hook=step_hook, clock=clock)
        self.settings = settings
        self.device = ctx.device
        self.root = ctx.root
        self.target = target
        self.reporter = ctx.reporter
        self.trusted_keys = [load_public_key(k) for k in settings.fleet.public_keys()]
        self.window = HealthWindow(ctx, health, shadow_rates)
        self.switch = VersionSwitch(ctx, self.window, shadow_rates)
        self.install = InstallPipeline(
            ctx,
            window=self.window,
            switch=self.switch,
            downloader=downloader or Downloader(timeout_s=settings.fleet.download_timeout_s),
            artifacts=KeptArtifacts(settings.data_dir / "fleet" / "artifacts"),
            trusted_keys=self.trusted_keys,
            shadow_rates=shadow_rates,
        )
        self._queue: queue.Queue[_Work] = queue.Queue()
        self.intake = OrderIntake(
            ctx,
            install=self.install,
            switch=self.switch,
            trusted_keys=self.trusted_keys,
            queue_work=lambda kind, item: self._queue.put((kind, item)),
        )
        self.client = MqttClient(
            settings.mqtt_url,
            client_id or session_client_id(settings.data_dir, self.device, "fleet"),
            will=self.reporter.will(),
            tls=settings.mqtt_tls_config(),
        )
        self.reporter.attach(self.client)
        self._thread: threading.Thread | None = None
        self.recovered = False

    @property
    def state(self) -> FleetState:
        """What the agent remembers (saved in ``<data_dir>/fleet/state.json``)."""
        return self.ctx.state

    def start(self, *, connect_wait_s: float | None = 5.0) -> None:
        """Recover and serve a verified version of every managed model, then go online."""
        self.recover()
        self.client.subscribe(topics.device_rollout(self.device), self.intake.on_order, qos=1)
        self.client.add_connection_listener(self._on_connection)
        self._thread = threading.Thread(target=self._run, name=f"fleet-{self.device}", daemon=True)
        self._thread.start()
        self.client.start(wait_s=None)
        if connect_wait_s and not self.client.wait_connected(connect_wait_s):
            log.warning("fleet agent %s: no broker yet (%s)", self.device, self.client.last_error)

    def stop(self) -> None:
        """Say goodbye (retained offline status), stop the work thread, disconnect."""
        self._queue.put(("stop", None))
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        if self.client.connected:
            status = self.reporter.status(self.state, online=False)
            if self.reporter.publish_status(status):
                time.sleep(0.05)
        self.client.stop()

    def recover(self) -> None:
        """Bring the device to a consistent state after a start, however the last run ended."""
        self.switch.recover()
        self.recovered = True

    def handle(self, order: RolloutOrder) -> None:
        """Carry out one verified order (idempotent: a finished order is ignored)."""
        self.intake.handle(order)

    def save(self) -> None:
        self.ctx.save()

    def _on_connection(self, connected: bool) -> None:
        if connected:
            self._queue.put(("online", None))

    def _run(self) -> None:
        while True:
            timeout = self._next_deadline() - self.ctx.clock()
            try:
                kind, item = self._queue.get(timeout=max(0.0, min(timeout, 1.0)))
            except queue.Empty:
                kind, item = "tick", None
            try:
                if kind == "stop":
                    return
                if kind == "online":
                    self.reporter.flush()
                    self.ctx.status_soon()
                elif kind == "order" and isinstance(item, VerifiedOrder):
                    self.intake.accept(item)
                elif kind == "refused" and isinstance(item, OrderRefused):
                    self.intake.refuse(item)
                self._tick()
            except Exception:
                log.exception("fleet agent %s: unexpected failure", self.device)

    def _next_deadline(self) -> float:
        deadlines = [self.ctx.next_status]
        for st in self.state.models.values():
            end = self.window.ends_at(st)
            if end is not None:
                deadlines.append(end)
        return min(deadlines)

    def _tick(self) -> None:
        """Judge the windows that ended; refresh the retained status when it is due."""
        ctx = self.ctx
        now = ctx.clock()
        for name, st in list(self.state.models.items()):
            end = self.window.ends_at(st)
            if end is None or now < end:
                continue
            judgement = self.window.judge(name, st)
            if judgement is None:
                continue  # held for evidence
            if judgement.failure is not None:
                rid = st.rollout_id or "health"
                self.switch.roll_back(name, rid, st.previous, judgement.failure, "install")
            else:
                self.switch.commit(name, st, judgement.report)
        if now >= ctx.next_status:
            ctx.next_status = now + ctx.fleet.status_interval_s
            health = {name: report.dump() for name, report in self.window.reports().items()}
            self.reporter.publish_status(self.reporter.status(self.state, health=health))
