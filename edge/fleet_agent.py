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

Everything it must remember is in :class:`~edge.fleet_state.StateStore`, written
atomically before each step takes effect, so a SIGKILL at any moment leaves a device
that, on restart (:meth:`FleetAgent.recover`), serves a complete, verified version.

An order is acted on only when the fleet key signed it for this device, it has not
expired, and it is newer than the last order accepted (:mod:`shared.order_signing`);
anything else is refused with a ``refused`` event (rollout id ``unverified-order``) and a
log line, before it can touch a file or cancel anything. Model names come only from signed
orders and are checked again before they become folders (``edge.staging.model_folder``);
a rollback or abort of a model this device does not manage changes nothing.

All work runs on one thread per agent; the MQTT handler only verifies and queues orders
(and cancels a running download when a newer order for the model arrives).
"""

from __future__ import annotations

import hashlib
import logging
import queue
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.downloader import DigestMismatch, Downloader, check_free_disk
from edge.fleet_state import FleetState, ModelPhase, ModelState, StateStore
from edge.fleet_target import ServingTarget
from edge.health import HealthCounters, HealthSource
from edge.kept_artifacts import Fetched, KeptArtifacts
from edge.self_test import self_test
from edge.session_ids import session_client_id
from edge.settings import EdgeSettings
from edge.shadow import ShadowRates
from edge.staging import (
    clean_staging,
    has_marker,
    model_folder,
    part_file,
    remove_version,
    stage,
    staging_dir,
    verify_version,
)
from edge.status_reporter import StatusReporter
from serving.model_config import list_models, list_versions, load_model_config
from shared import __version__, topics
from shared.delta import apply_delta
from shared.errors import InvalidInput, SignatureError, TetherError
from shared.fleet import HealthReport, RolloutEvent, RolloutOrder
from shared.manifest import Manifest, load_public_key, verify_manifest
from shared.mqtt import Message, MqttClient
from shared.order_signing import OrderRefused, VerifiedOrder, replay_reason, verify_order

log = logging.getLogger(__name__)

#: Called at named points of an install (tests use it to SIGKILL at a chosen moment).
StepHook = Callable[[str, str, int], None]
#: The rollout id of the ``refused`` event for an order that failed verification: its own
#: rollout id is not trusted, and a refusal must not count against a real rollout.
UNVERIFIED_ORDER = "unverified-order"
#: At most this many refusal events per ``REFUSAL_WINDOW_S`` (each is logged regardless).
REFUSAL_EVENTS = 10
REFUSAL_WINDOW_S = 10.0

#: What the MQTT handler queues for the work thread.
_Work = tuple[str, VerifiedOrder | OrderRefused | None]


class Cancelled(TetherError):
    """A newer order for the model stopped this install."""

    status = 409
    reason = "cancelled"


@dataclass
class _Window:
    """The health window of a freshly switched version (in memory; restarts reset it)."""

    start: HealthCounters
    baseline: HealthCounters | None


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
        self.settings = settings
        self.fleet = settings.fleet
        self.device = topics.check_segment(settings.device_id, "device id")
        self.root = settings.repository
        self.target = target
        self.health = health
        self.shadow_rates = shadow_rates
        self.downloader = downloader or Downloader(timeout_s=settings.fleet.download_timeout_s)
        self.step_hook = step_hook
        self.clock = clock
        self.trusted_keys = [load_public_key(k) for k in self.fleet.public_keys()]
        self.store = StateStore(settings.data_dir / "fleet" / "state.json")
        self.artifacts = KeptArtifacts(settings.data_dir / "fleet" / "artifacts")
        self.state: FleetState = self.store.load()
        self.reporter = StatusReporter(
            self.device, hardware=self.fleet.hardware, labels=self.fleet.labels
        )
        self.client = MqttClient(
            settings.mqtt_url,
            client_id or session_client_id(settings.data_dir, self.device, "fleet"),
            will=self.reporter.will(),
            tls=settings.mqtt_tls_config(),
        )
        self.reporter.attach(self.client)
        self._queue: queue.Queue[_Work] = queue.Queue()
        self._refusals: deque[float] = deque()
        self._cancel: dict[str, threading.Event] = {}
        self._installing: dict[str, str] = {}
        self._windows: dict[str, _Window] = {}
        self._last_health: dict[str, HealthReport] = {}
        self._reported_again: set[str] = set()
        self._thread: threading.Thread | None = None
        self._next_status = 0.0
        self.recovered = False

    # ------------------------------------------------------------------ lifecycle

    def start(self, *, connect_wait_s: float | None = 5.0) -> None:
        """Recover and serve a verified version of every managed model, then go online."""
        self.recover()
        self.client.subscribe(topics.device_rollout(self.device), self._on_order, qos=1)
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

    def _on_connection(self, connected: bool) -> None:
        if connected:
            self._queue.put(("online", None))

    def _on_order(self, message: Message) -> None:
        """Verify an order (MQTT thread) and queue it, or queue its refusal."""
        if not message.payload:
            return  # a cleared retained order
        try:
            verified = verify_order(
                message.payload,
                self.trusted_keys,
                device=self.device,
                now=self.clock(),
                accepted_digest=self.state.order_digest,
            )
            self._check_replay(verified)
        except OrderRefused as exc:
            self._queue.put(("refused", exc))
            return
        order = verified.order
        running = self._installing.get(order.model)
        if (running is not None and running != order.rollout_id) or order.action != "install":
            cancel = self._cancel.get(order.model)
            if cancel is not None:
                cancel.set()
        self._queue.put(("order", verified))

    def _check_replay(self, verified: VerifiedOrder) -> None:
        why = replay_reason(verified, self.state.order_seq, self.state.order_digest)
        if why is not None:
            order = verified.order
            claimed = f"action {order.action}, rollout_id {order.rollout_id}, model {order.model}"
            raise OrderRefused(why, claimed)

    def _run(self) -> None:
        while True:
            timeout = self._next_deadline() - self.clock()
            try:
                kind, item = self._queue.get(timeout=max(0.0, min(timeout, 1.0)))
            except queue.Empty:
                kind, item = "tick", None
            try:
                if kind == "stop":
                    return
                if kind == "online":
                    self.reporter.flush()
                    self._next_status = 0.0
                elif kind == "order" and isinstance(item, VerifiedOrder):
                    self._accept(item)
                elif kind == "refused" and isinstance(item, OrderRefused):
                    self._refuse(item)
                self._tick()
            except Exception:
                log.exception("fleet agent %s: unexpected failure", self.device)

    def _accept(self, verified: VerifiedOrder) -> None:
        """Record a verified order as the last accepted (so an older one is a replay from
        now on), then carry it out."""
        try:
            self._check_replay(verified)  # again: another order may have come first
        except OrderRefused as exc:
            self._refuse(exc)
            return
        if (self.state.order_seq, self.state.order_digest) != (
            verified.order.seq,
            verified.digest,
        ):
            self.state.order_seq, self.state.order_digest = verified.order.seq, verified.digest
            self.save()
        self.handle(verified.order)

    def _refuse(self, refused: OrderRefused) -> None:
        """Log a refused order and report it (at most ``REFUSAL_EVENTS`` per window)."""
        reason = f"order refused: {refused.message}"
        if refused.claimed:
            reason += f" (it claims {refused.claimed})"
        log.warning("%s: %s", self.device, reason)
        now = time.monotonic()
        while self._refusals and now - self._refusals[0] > REFUSAL_WINDOW_S:
            self._refusals.popleft()
        if len(self._refusals) >= REFUSAL_EVENTS:
            return
        self._refusals.append(now)
        self._event(UNVERIFIED_ORDER, "unknown", 0, "refused", reason)

    def _next_deadline(self) -> float:
        deadlines = [self._next_status]
        for _name, st in self.state.models.items():
            if st.phase == "active" and st.activated_at is not None:
                deadlines.append(st.activated_at + self._window_s(st))
        return min(deadlines)

    # ------------------------------------------------------------------ recovery

    def recover(self) -> None:
        """Bring the device to a consistent state after a start, however the last run ended."""
        for name, st in self.state.models.items():
            model_dir = model_folder(self.root, name)
            clean_staging(model_dir, {st.pending} if st.pending is not None else set())
            for version in st.discarded:
                if version not in (st.active, st.previous):
                    remove_version(model_dir, version)
            st.discarded = []
            if st.phase == "active":
                st.boots += 1
            self.save()
            if st.phase == "active" and st.boots > self.fleet.crash_loop_limit:
                reason = f"crash loop: {st.boots - 1} restarts while version {st.active} was new"
                self._roll_back(name, st.rollout_id or "recovery", st.previous, reason, "install")
                continue
            self._serve_verified(name, st)
        self.recovered = True

    def _serve_verified(self, name: str, st: ModelState) -> None:
        model_dir = model_folder(self.root, name)
        for version in (st.active, st.previous):
            if version is None:
                continue
            why = self._unusable(model_dir, version)
            if why is None:
                if version != st.active:
                    bad = st.active
                    log.error(
                        "%s: version %s of %s unusable; serving %s", self.device, bad, name, version
                    )
                    reason = f"version {bad} damaged on disk"
                    rid = st.rollout_id or "recovery"
                    self._roll_back(name, rid, version, reason, "install")
                    return
                self._switch_to(name, version)
                return
            log.error("%s: version %s of %s unusable: %s", self.device, version, name, why)
        # Nothing recorded is usable: the newest complete version on disk.
        for version in reversed(list_versions(model_dir) if model_dir.is_dir() else []):
            if version != st.pending and self._unusable(model_dir, version) is None:
                st.active, st.previous, st.phase = version, None, "committed"
                self.save()
                self._switch_to(name, version)
                return
        log.error("%s: no usable version of %s on disk", self.device, name)

    def _unusable(self, model_dir: Path, version: int) -> str | None:
        version_dir = model_dir / str(version)
        if not version_dir.is_dir():
            return "not on disk"
        if has_marker(version_dir):
            return verify_version(version_dir)
        if not any(version_dir.iterdir()):
            return "empty folder"
        return None  # provisioned by the operator, not by a rollout

    def _switch_to(self, name: str, version: int) -> None:
        try:
            self.target.serve(name, version)
        except TetherError as exc:
            log.error("%s: could not serve %s v%s: %s", self.device, name, version, exc.message)

    # ------------------------------------------------------------------ orders

    def handle(self, order: RolloutOrder) -> None:
        """Carry out one verified order (idempotent: a finished order is ignored)."""
        if order.action != "install" and not self._manages(order.model):
            # Nothing of this model is on the device or in the agent's records: there is
            # nothing to undo, and no folder or record is made for a name it never had.
            reason = f"{order.action} of {order.model}: not managed here, nothing to undo"
            self._event(order.rollout_id, order.model, 0, "rolled_back", reason)
            return
        st = self.state.model(order.model)
        if f"{order.rollout_id}:{order.action}" in st.handled:
            self._report_again(order.model, st)
            return
        if order.action == "install":
            self._install(order, st)
        elif order.action == "rollback":
            version = st.active or 0
            self._roll_back(
                order.model, order.rollout_id, order.rollback_to, "rollback ordered", "rollback"
            )
            log.info("%s: rolled %s back from %s", self.device, order.model, version)
        else:
            self._abort(order, st)

    def _manages(self, name: str) -> bool:
        """Whether ``name`` is a model of this device: in the agent's records or a model
        folder with versions in the repository."""
        if name in self.state.models:
            return True
        return name in list_models(self.root)

    def _report_again(self, name: str, st: ModelState) -> None:
        """Repeat the last final event once per run: the previous run may have died first."""
        final = st.last_final
        if final is None or name in self._reported_again:
            return
        self._reported_again.add(name)
        self._event(
            str(final["rollout_id"]),
            name,
            int(final["version"]),
            final["step"],
            str(final["reason"]),
        )

    def _abort(self, order: RolloutOrder, st: ModelState) -> None:
        if st.rollout_id == order.rollout_id and st.phase in ("active", "committed"):
            self._roll_back(order.model, order.rollout_id, order.rollback_to, "aborted", "abort")
            return
        version = st.pending or 0
        _finish(
            st, f"{order.rollout_id}:abort", order.rollout_id, version, "rolled_back", "aborted"
        )
        # An install order of the aborted rollout that arrives after this one (a resend
        # that crossed the abort) is stale: it must never start a download.
        st.remember(f"{order.rollout_id}:install")
        self.save()
        self._event(order.rollout_id, order.model, version, "rolled_back", "aborted")

    def _install(self, order: RolloutOrder, st: ModelState) -> None:
        assert order.signed_manifest is not None
        signed = order.signed_manifest
        version = signed.manifest.version
        rid = order.rollout_id
        if st.rollout_id == rid and st.active == version and st.phase == "active":
            return  # resumed after a restart: the health window goes on
        self._event(rid, order.model, version, "received")
        try:
            manifest = self._verify(order, st)
        except (SignatureError, InvalidInput) as exc:
            _finish(st, f"{rid}:install", rid, version, "refused", exc.message)
            self.save()
            self._event(rid, order.model, version, "refused", exc.message)
            return
        if st.pending is not None and st.pending != version:
            self._drop_pending(order.model, st)
        st.trusted_version, st.trusted_sha256 = version, manifest.sha256
        st.pending, st.rollout_id, st.phase, st.reason = version, rid, "downloading", ""
        st.health_window_s = order.health_window_s
        st.shadow_sample_rate = order.shadow_sample_rate
        self.save()
        baseline = self._measure_baseline(order, st, version)
        cancel = threading.Event()
        self._cancel[order.model] = cancel
        self._installing[order.model] = rid
        try:
            fetched = self._fetch_and_stage(order, manifest, st, cancel)
            self._phase(st, "staged")
            self._event(rid, order.model, version, "staged", fetched=fetched)
            self._hook("staged", order.model, version)
            self_test(
                model_folder(self.root, order.model),
                version,
                self.settings.runtime_options(),
                backend=self.settings.runtime.backend,
            )
            self._hook("self_tested", order.model, version)
            if baseline is not None:
                self._await_baseline(order.model, baseline, cancel)
            if cancel.is_set():
                raise Cancelled("cancelled by a newer order")
        except TetherError as exc:
            self._fail(order, st, version, exc.message)
            return
        finally:
            self._cancel.pop(order.model, None)
            self._installing.pop(order.model, None)
        self._activate(order, st, version)

    def _measure_baseline(self, order: RolloutOrder, st: ModelState, version: int) -> int | None:
        """Shadow-sample the version serving now at the order's rate, so that the new
        version's agreement is compared with a measured baseline (``baseline_shadow_*`` in
        its health reports); the version to measure, or ``None`` when there is nothing to
        measure (no shadow sampling asked or possible, nothing serving, none required)."""
        if (
            self.shadow_rates is None
            or order.shadow_sample_rate <= 0
            or self.fleet.min_baseline_samples <= 0
        ):
            return None
        current = st.active if st.active is not None else self.target.current(order.model)
        if current is None or current == version:
            return None
        if self.shadow_rates.get(order.model, str(current)) < order.shadow_sample_rate:
            self.shadow_rates.set(order.model, str(current), order.shadow_sample_rate)
        return current

    def _await_baseline(self, name: str, current: int, cancel: threading.Event) -> None:
        """Hold the switch until the version serving now has ``min_baseline_samples``
        shadow samples (it serves the requests meanwhile), at most ``evidence_timeout_s``.
        Without them the switch goes ahead: the reports then say how few baseline samples
        there are, and the controller's gate fails the wave rather than pass it on none."""
        need = self.fleet.min_baseline_samples
        deadline = time.monotonic() + self.fleet.evidence_timeout_s
        while (have := self._counters(name, current).shadow_samples) < need:
            if time.monotonic() >= deadline:
                log.warning(
                    "%s: %s v%s: %d of %d baseline shadow samples within %gs; switching anyway",
                    self.device,
                    name,
                    current,
                    have,
                    need,
                    self.fleet.evidence_timeout_s,
                )
                return
            if cancel.wait(0.1):
                raise Cancelled("cancelled by a newer order")

    def _verify(self, order: RolloutOrder, st: ModelState) -> Manifest:
        assert order.signed_manifest is not None
        claimed = order.signed_manifest.manifest
        last = st.trusted_version
        if st.active is not None:
            last = max(last or 0, st.active)
        elif last is None:
            last = self.target.current(order.model)
        if (
            last is not None
            and claimed.version == st.trusted_version
            and claimed.sha256 == st.trusted_sha256
            and st.rollout_id == order.rollout_id
        ):
            last -= 1  # the same order again (after a restart): resume it
        manifest = verify_manifest(
            order.signed_manifest, self.trusted_keys, now=self.clock(), last_trusted_version=last
        )
        if manifest.model != order.model:
            raise InvalidInput(f"manifest is for model {manifest.model!r}, not {order.model!r}")
        if manifest.target_hardware not in ("cpu", "any", self.fleet.hardware):
            raise InvalidInput(
                f"manifest targets {manifest.target_hardware!r}; this device is "
                f"{self.fleet.hardware!r}"
            )
        if _version_tuple(manifest.min_agent_version) > _version_tuple(__version__):
            raise InvalidInput(
                f"manifest needs agent {manifest.min_agent_version}; this is {__version__}"
            )
        return manifest

    def _fetch_and_stage(
        self, order: RolloutOrder, manifest: Manifest, st: ModelState, cancel: threading.Event
    ) -> Fetched | None:
        """Download (a delta when one applies, else the full artifact), verify and stage;
        what was fetched, or ``None`` when the version was already staged."""
        name, version = order.model, manifest.version
        model_dir = model_folder(self.root, name)
        model_dir.mkdir(parents=True, exist_ok=True)
        version_dir = model_dir / str(version)
        if version_dir.is_dir() and verify_version(version_dir, manifest.sha256) is None:
            return None  # staged before a restart
        part = part_file(model_dir, version)
        have = part.stat().st_size if part.exists() else 0
        check_free_disk(
            model_dir, max(manifest.size - have, 0) + manifest.size, self.fleet.min_free_disk_mb
        )
        self._event(order.rollout_id, name, version, "downloading")
        self._hook("downloading", name, version)

        def verifying() -> None:
            self._phase(st, "verifying")
            self._event(order.rollout_id, name, version, "verifying")

        fetched = self._fetch_delta(name, manifest, st, part, cancel) if not have else None
        if fetched is not None:
            verifying()
        else:
            try:
                self.downloader.fetch(
                    manifest.url,
                    part,
                    size=manifest.size,
                    sha256=manifest.sha256,
                    cancel=cancel,
                    verifying=verifying,
                )
            except DigestMismatch:
                part.unlink(missing_ok=True)
                raise
            fetched = Fetched(manifest.size - have, None)
        self._hook("verified", name, version)
        config = load_model_config(model_dir)
        stage(
            part,
            model_dir,
            version,
            sha256=manifest.sha256,
            model_filename=config.model_filename,
            expected_files=manifest.files,
        )
        self.artifacts.keep(name, version, manifest.sha256, part, also=st.active)
        return fetched

    def _fetch_delta(
        self,
        name: str,
        manifest: Manifest,
        st: ModelState,
        part: Path,
        cancel: threading.Event,
    ) -> Fetched | None:
        """Build the artifact from a delta against the kept artifact of the active version;
        ``None`` (and nothing left behind) when no delta applies or it fails."""
        base = self.artifacts.find(name, st.active) if st.active is not None else None
        for delta in manifest.deltas or []:
            if base is None or (delta.from_version, delta.from_sha256) != base[:2]:
                continue
            delta_part = part.with_name(part.name + ".delta")
            try:
                self.downloader.fetch(
                    delta.url, delta_part, size=delta.size, sha256=delta.sha256, cancel=cancel
                )
                target = apply_delta(
                    base[2].read_bytes(), delta_part.read_bytes(), max_size=manifest.size
                )
                if hashlib.sha256(target).hexdigest() != manifest.sha256:
                    raise DigestMismatch("the patched artifact does not match the manifest")
                part.write_bytes(target)
                return Fetched(delta.size, delta.from_version)
            except TetherError as exc:
                log.warning(
                    "%s: delta %s v%s -> v%s failed (%s); fetching the full artifact",
                    self.device,
                    name,
                    delta.from_version,
                    manifest.version,
                    exc.message,
                )
                part.unlink(missing_ok=True)
            finally:
                delta_part.unlink(missing_ok=True)
        return None

    def _activate(self, order: RolloutOrder, st: ModelState, version: int) -> None:
        name, rid = order.model, order.rollout_id
        current = st.active if st.active is not None else self.target.current(name)
        if current == version:
            # The policy already sees the staged folder; what served before is the highest
            # version below it (when this agent has no record of its own).
            older = [v for v in list_versions(model_folder(self.root, name)) if v < version]
            current = st.previous if st.previous is not None else (max(older) if older else None)
        start = self._counters(name, version)
        baseline = self._counters(name, current) if current is not None else None
        st.previous, st.active, st.pending = current, version, None
        st.phase, st.boots, st.activated_at = "active", 0, self.clock()
        self.save()
        self._hook("switching", name, version)
        try:
            self.target.serve(name, version)
        except TetherError as exc:
            self._roll_back(name, rid, current, f"switch failed: {exc.message}", "install")
            return
        self._windows[name] = _Window(start, baseline)
        if self.shadow_rates is not None:
            self.shadow_rates.set(name, str(version), order.shadow_sample_rate)
        self._hook("switched", name, version)
        self._event(rid, name, version, "active")
        self._next_status = 0.0

    def _fail(self, order: RolloutOrder, st: ModelState, version: int, reason: str) -> None:
        _finish(st, f"{order.rollout_id}:install", order.rollout_id, version, "failed", reason)
        self._drop_pending(order.model, st)
        st.phase, st.reason = "failed", reason
        self.save()
        self._event(order.rollout_id, order.model, version, "failed", reason)
        log.warning("%s: install of %s v%s failed: %s", self.device, order.model, version, reason)

    def _drop_pending(self, name: str, st: ModelState) -> None:
        version = st.pending
        st.pending = None
        if version is None:
            return
        model_dir = model_folder(self.root, name)
        part_file(model_dir, version).unlink(missing_ok=True)
        shutil.rmtree(staging_dir(model_dir, version), ignore_errors=True)
        if version not in (st.active, st.previous):
            remove_version(model_dir, version)

    # ------------------------------------------------------------------ rollback

    def _roll_back(self, name: str, rid: str, to: int | None, reason: str, action: str) -> None:
        """Serve ``to`` (default: the previous version) again; discard the version undone."""
        st = self.state.model(name)
        bad = st.active
        if bad is None:
            # Nothing this agent installed is serving (an install that failed or was
            # cancelled before its switch, or a model the agent never touched): drop what
            # is staged and leave the version the repository serves alone.
            self._drop_pending(name, st)
            _finish(st, f"{rid}:{action}", rid, 0, "rolled_back", f"{reason}: nothing to undo")
            self.save()
            self._event(rid, name, 0, "rolled_back", f"{reason}: nothing to undo")
            return
        if to is None:
            to = st.previous
        model_dir = model_folder(self.root, name)
        if to is not None and self._unusable(model_dir, to) is not None:
            why = f"cannot roll back to {to}: {self._unusable(model_dir, to)}"
            _finish(st, f"{rid}:{action}", rid, bad or 0, "failed", why)
            self.save()
            self._event(rid, name, bad or 0, "failed", why)
            return
        report = self._health_report(name, bad) if bad is not None else None
        self._drop_pending(name, st)
        st.active, st.previous = to, None
        if bad is not None and to is not None and bad > to:
            st.discarded = sorted({*st.discarded, bad})
        elif bad is not None and to is not None:
            st.previous = bad
        st.phase, st.reason, st.boots, st.activated_at = "rolled_back", reason, 0, None
        _finish(st, f"{rid}:{action}", rid, bad or 0, "rolled_back", reason)
        if action == "abort":
            st.remember(f"{rid}:install")
        self.save()
        try:
            if to is None:
                self.target.unload(name)
            else:
                self.target.serve(name, to)
        except TetherError as exc:
            log.error("%s: rollback of %s to %s failed: %s", self.device, name, to, exc.message)
        self._windows.pop(name, None)
        if self.shadow_rates is not None:
            self.shadow_rates.clear(name)
        for version in st.discarded:
            remove_version(model_dir, version)
        st.discarded = []
        self.save()
        self._event(rid, name, bad or 0, "rolled_back", reason, report)
        self._next_status = 0.0

    # ------------------------------------------------------------------ health window

    def _window_s(self, st: ModelState) -> float:
        if self.fleet.health_window_s is not None:
            return self.fleet.health_window_s
        return st.health_window_s if st.health_window_s is not None else 60.0

    def _tick(self) -> None:
        now = self.clock()
        for name, st in list(self.state.models.items()):
            if st.phase != "active" or st.activated_at is None or st.active is None:
                continue
            if now >= st.activated_at + self._window_s(st):
                self._judge(name, st)
        if now >= self._next_status:
            self._next_status = now + self.fleet.status_interval_s
            health = {
                name: self._health_report(name, st.active).dump()
                for name, st in self.state.models.items()
                if st.phase == "active" and st.active is not None
            }
            self.reporter.publish_status(self.reporter.status(self.state, health=health))

    def _judge(self, name: str, st: ModelState) -> None:
        assert st.active is not None
        report = self._health_report(name, st.active)
        missing = self._missing_evidence(name, st.active, report)
        if missing is not None:
            assert st.activated_at is not None
            deadline = st.activated_at + self._window_s(st) + self.fleet.evidence_timeout_s
            if self.clock() < deadline:
                return  # hold the window until the evidence arrives
            reason = f"unhealthy: no evidence: {missing} within {self.fleet.evidence_timeout_s:g}s"
            self._roll_back(name, st.rollout_id or "health", st.previous, reason, "install")
            return
        problem = self._unhealthy(report)
        if problem is not None:
            reason = f"unhealthy: {problem}"
            self._roll_back(name, st.rollout_id or "health", st.previous, reason, "install")
            return
        version = st.active
        st.phase, st.boots, st.activated_at = "committed", 0, None
        _finish(st, f"{st.rollout_id}:install", st.rollout_id or "", version, "committed", "")
        keep = {v for v in (st.active, st.previous) if v is not None}
        ab = self.settings.ab.get(name)
        keep |= {int(v) for v in ab.split} if ab is not None else set()
        model_dir = self.root / name
        st.discarded = [v for v in list_versions(model_dir) if v not in keep and v < version]
        self.save()
        self._hook("committing", name, version)
        for old in st.discarded:
            remove_version(model_dir, old)
        st.discarded = []
        self.save()
        self._windows.pop(name, None)
        self._event(st.rollout_id or "", name, version, "committed", "", report)
        self._next_status = 0.0

    def _missing_evidence(self, name: str, version: int, report: HealthReport) -> str | None:
        """What the health gate lacks to judge ``version`` (``None``: enough evidence).

        A version is never healthy for want of figures: it needs ``min_requests`` answered
        requests, ``min_shadow_samples`` compared rows when its order asked for shadow
        sampling (and this device shadows: it was given shadow rates), and figures that
        could be read (``/metrics`` scraped)."""
        fleet = self.fleet
        rate = self.shadow_rates.get(name, str(version)) if self.shadow_rates else 0.0
        shadowed = rate > 0 and fleet.min_shadow_samples > 0
        if not shadowed and fleet.min_requests == 0:
            return None  # configured to judge without evidence
        unreadable = getattr(self.health, "last_error", "")
        if unreadable:
            return f"health figures unavailable ({unreadable})"
        if report.requests < fleet.min_requests:
            return f"{report.requests} requests recorded (min_requests {fleet.min_requests})"
        if shadowed and report.shadow_samples < fleet.min_shadow_samples:
            return (
                f"{report.shadow_samples} shadow samples "
                f"(min_shadow_samples {fleet.min_shadow_samples})"
            )
        return None

    def _unhealthy(self, report: HealthReport) -> str | None:
        fleet = self.fleet
        rate = report.error_rate
        if rate is not None and rate > fleet.max_error_rate:
            return f"error rate {rate:.3f} over {fleet.max_error_rate}"
        if (
            report.p99_ms is not None
            and report.baseline_p99_ms
            and report.requests >= 20
            and report.p99_ms > fleet.max_p99_ratio * report.baseline_p99_ms
        ):
            return f"p99 {report.p99_ms:g} ms over {fleet.max_p99_ratio}x {report.baseline_p99_ms:g} ms"
        agreement = report.shadow_agreement
        if agreement is not None and agreement < fleet.min_shadow_agreement:
            return f"shadow agreement {agreement:.3f} under {fleet.min_shadow_agreement}"
        return None

    def _counters(self, name: str, version: int) -> HealthCounters:
        if self.health is None:
            return HealthCounters()
        return self.health.counters(name, str(version))

    def _health_report(self, name: str, version: int) -> HealthReport:
        window = self._windows.get(name)
        now = self._counters(name, version)
        seen = now.minus(window.start) if window is not None else now
        baseline = window.baseline if window is not None else None
        report = HealthReport(
            requests=seen.requests,
            errors=seen.errors,
            p99_ms=seen.p99_ms(),
            shadow_samples=seen.shadow_samples,
            shadow_agreement=seen.agreement(),
            baseline_p99_ms=baseline.p99_ms() if baseline is not None else None,
            baseline_error_rate=baseline.error_rate() if baseline is not None else None,
            baseline_shadow_agreement=baseline.agreement() if baseline is not None else None,
            baseline_shadow_samples=baseline.shadow_samples if baseline is not None else None,
        )
        self._last_health[name] = report
        return report

    # ------------------------------------------------------------------ plumbing

    def save(self) -> None:
        self.store.save(self.state)

    def _phase(self, st: ModelState, phase: ModelPhase) -> None:
        st.phase = phase
        self.save()

    def _hook(self, step: str, name: str, version: int) -> None:
        if self.step_hook is not None:
            self.step_hook(step, name, version)

    def _event(
        self,
        rid: str,
        name: str,
        version: int,
        step: Any,
        reason: str = "",
        health: HealthReport | None = None,
        fetched: Fetched | None = None,
    ) -> None:
        event = RolloutEvent(
            rollout_id=rid or "none",
            device=self.device,
            model=name,
            version=version,
            step=step,
            reason=reason,
            health=health,
            at=self.clock(),
            bytes_downloaded=fetched.bytes if fetched is not None else None,
            delta_from=fetched.delta_from if fetched is not None else None,
        )
        log.info("%s: %s v%s %s %s", self.device, name, version, step, reason)
        self.reporter.publish_event(event)


def _finish(st: ModelState, key: str, rid: str, version: int, step: str, reason: str) -> None:
    """Mark an order finished and remember its final event (saved with the state change)."""
    st.remember(key)
    st.last_final = {"rollout_id": rid, "version": version, "step": step, "reason": reason}


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)
