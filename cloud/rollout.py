"""The rollout controller: moves staged rollouts forward, wave by wave, through MQTT.

The database is the source of truth. :func:`start_rollout` (called by the CLI) writes a
rollout and assigns every selected device to a wave; pause, resume and abort are state
changes in the database (:func:`request_pause` ...). The :class:`RolloutController`, which
runs inside ``tether fleet serve``, records every device's status and rollout events, and
on each tick acts on the rollouts that are not finished:

* ``running``: send the current wave its retained ``install`` orders; a device is done
  when it reports ``committed`` (after its health window) or a failure (``failed``,
  ``refused``, ``rolled_back``), or is marked ``timeout`` (no ``active`` within
  ``device_timeout_s`` of its order, or no ``committed`` within ``window_s +
  device_timeout_s`` of ``active``). Too many failures stop the rollout at once; when the
  whole wave is done, its health reports pass the gate (:func:`health_verdict`) and the
  next wave starts, or the rollout is ``completed`` after the last wave.
* ``aborting`` (asked by the CLI) or a failed gate: send ``rollback`` orders (to the
  version each device had before) to every device that got the install order; the rollout
  is ``rolled_back`` when each of them reports ``rolled_back`` (or failed, or stays
  silent past ``device_timeout_s``).
* ``paused``: nothing is sent or timed out; devices already ordered carry on.

Every order is signed with the fleet key for its one device, with a sequence number that
grows with every order and an expiry (``order_ttl_s``), so a device can tell it from a
forged, altered, misdirected or replayed one (:mod:`shared.order_signing`).

Device reports are bounded and isolated: each status and event is checked when it is read
(:class:`~shared.fleet.DeviceReport`: size, depth, every field), waits in an inbox of at
most :data:`INBOX_MAX_REPORTS` reports and :data:`INBOX_MAX_BYTES` bytes, and is stored
with up to 1,000 others in one transaction; when that transaction fails, each report is
stored alone, so a report that cannot be stored is dropped by itself. Every report
dropped (refused when read, inbox full, failed to store, an event for a rollout the
device is not in) is logged and counted by reason in the database, which ``/metrics``
serves as ``tether_fleet_reports_dropped_total``.

Several controllers may run against one database (``tether fleet serve`` on two or more
machines): with a :class:`~cloud.leadership.Leadership`, only the holder of the rollout
lease drives rollouts, every state change it makes is fenced by its lease term, and each
wave is opened exactly once (the order log in the database refuses a second opening). A
controller that takes over re-sends the orders of the waves it inherits that no device has
acknowledged yet (the previous leader may have died between deciding and publishing);
devices ignore an order they already handled.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud.fleet_db import (
    MISSED,
    ORDERED,
    TIMEOUT,
    FleetDB,
    LeaseTerm,
    RolloutDevice,
    RolloutRecord,
)
from cloud.leadership import Leadership
from cloud.rollout_policy import (
    RolloutPolicy,
    allowed_failures,
    failure_budget,
    health_verdict,
    order_allowance,
    wave_sizes,
)
from shared.errors import InvalidInput, TetherError
from shared.fleet import (
    EVENTS_FILTER,
    STATUS_FILTER,
    DeviceStatus,
    RolloutEvent,
    RolloutOrder,
    device_of_topic,
)
from shared.manifest import SignedManifest
from shared.mqtt import Message, MqttClient, MqttError
from shared.order_signing import sign_order
from shared.topics import device_rollout

log = logging.getLogger(__name__)

#: The controller's own step for a device it sent a rollback order and waits on.
ROLLBACK_ORDERED = "rollback_ordered"
#: Device steps that end an install attempt unsuccessfully.
FAILED_STEPS = frozenset({"failed", "refused", "rolled_back", TIMEOUT})
#: Steps after which the controller waits no more for a device's install.
INSTALL_DONE = FAILED_STEPS | {"committed"}
#: Steps after which the controller waits no more for a device's rollback.
ROLLBACK_DONE = frozenset({"rolled_back", "failed", "refused", TIMEOUT})
#: How long a signed order stays valid (a device that reconnects later refuses it).
ORDER_TTL_S = 7 * 86400.0
#: Steps of a device that may run (or be about to run) the new version.
MAY_HAVE_NEW = frozenset(
    {ORDERED, "received", "downloading", "verifying", "staged", "active", "committed"}
)
#: Device reports received and not yet stored, at most (more are dropped and counted).
INBOX_MAX_REPORTS = 100_000
#: Payload bytes of the reports received and not yet stored, at most.
INBOX_MAX_BYTES = 64 * 1024 * 1024
#: Reports stored in one transaction.
BATCH_REPORTS = 1000
#: A rollout is re-read and judged at least this often even when no report arrived since
#: its last judgement (timeouts and the ``--until`` deadline depend on the clock alone).
REJUDGE_S = 1.0
#: Why a device report was dropped: the ``reason`` label of the drop counter.
DROP_INVALID, DROP_INBOX_FULL = "invalid", "inbox_full"
DROP_STORE_FAILED, DROP_UNKNOWN_ROLLOUT = "store_failed", "unknown_rollout"

#: A report waiting in the inbox: kind, device, parsed message, received at, payload bytes.
Report = tuple[str, str, Any, float, int]


# ---------------------------------------------------------------------------- CLI side


def start_rollout(
    db: FleetDB,
    model: str,
    version: int,
    selector: dict[str, str],
    policy: RolloutPolicy,
    *,
    now: float | None = None,
) -> tuple[RolloutRecord, bool]:
    """Create a rollout of a published version to the devices ``selector`` picks.

    Devices already at ``version`` or newer, and devices of another hardware than a
    non-``cpu`` manifest targets, are left out. Offline devices are in: they are assigned to
    the later waves (online devices first, so canaries answer) and get the order of their
    wave when they come online, until ``policy.until_s`` after the start. Returns
    ``(rollout, created)``; the same model, version and selector again returns the existing
    rollout.
    """
    now = time.time() if now is None else now
    signed = db.get_manifest(model, version)
    if signed is None:
        raise InvalidInput(f"{model} version {version} is not published (tether fleet publish)")
    target = signed.manifest.target_hardware
    devices = [
        d
        for d in db.list_devices(selector)
        if (d.active_version(model) or 0) < version and (target == "cpu" or d.hardware == target)
    ]
    rollout_id = f"{model}-v{version}-{uuid.uuid4().hex[:8]}"
    key = f"{model}/{version}/{sorted(selector.items())}"
    # Online devices first, each group in a stable pseudo-random order, so the canary is an
    # online device and not always the first one by name.
    devices.sort(
        key=lambda d: (not d.online, hashlib.sha256(f"{key}/{d.device}".encode()).hexdigest())
    )
    sizes = wave_sizes(policy.waves, len(devices))
    assignments: list[tuple[str, int, int | None]] = []
    for index, device in enumerate(devices):
        wave = next(i for i, size in enumerate(sizes) if index < size) if sizes else 0
        if sizes and index >= sizes[-1]:
            break
        assignments.append((device.device, wave, device.active_version(model)))
    with db.transaction():
        existing = db.find_rollout(model, version, selector)
        if existing is not None:
            return existing, False
        busy = db.active_rollout_of([device for device, _, _ in assignments])
        if busy:
            sample = ", ".join(sorted(busy)[:5])
            raise InvalidInput(
                f"{len(busy)} selected devices ({sample}) are in another unfinished rollout; "
                "let it finish or abort it first"
            )
        if not assignments:
            raise InvalidInput(
                f"no device matches {selector or 'the selection'} and needs {model} v{version}"
            )
        return db.create_rollout(rollout_id, model, version, selector, policy, assignments, now)


def request_pause(db: FleetDB, rollout_id: str) -> bool:
    """Pause a running rollout: no new waves, orders or timeouts until resumed."""
    return db.set_rollout_state(
        db.rollout(rollout_id).id, "paused", time.time(), only_from=("running",)
    )


def request_resume(db: FleetDB, rollout_id: str) -> bool:
    """Resume a paused rollout."""
    return db.set_rollout_state(
        db.rollout(rollout_id).id, "running", time.time(), only_from=("paused",)
    )


def request_abort(db: FleetDB, rollout_id: str, reason: str = "aborted by operator") -> bool:
    """Ask the controller to roll back every device the rollout updated."""
    return db.set_rollout_state(
        db.rollout(rollout_id).id,
        "aborting",
        time.time(),
        reason=reason,
        only_from=("running", "paused"),
    )


def summarize(db: FleetDB, rollout_id: str) -> dict[str, Any]:
    """A rollout's state and, per wave, how many devices are at each step."""
    rollout = db.rollout(rollout_id)
    waves: dict[int, dict[str, int]] = {}
    for device in db.rollout_devices(rollout.id):
        steps = waves.setdefault(device.wave, {})
        step = device.step or "waiting"
        steps[step] = steps.get(step, 0) + 1
    return {
        "id": rollout.id,
        "model": rollout.model,
        "version": rollout.version,
        "selector": rollout.selector,
        "state": rollout.state,
        "wave": rollout.wave + 1,
        "waves": len(waves),
        "reason": rollout.reason,
        "devices": {f"wave {w + 1}": steps for w, steps in sorted(waves.items())},
    }


# ---------------------------------------------------------------------------- controller


class RolloutController:
    """Records device reports and drives unfinished rollouts (see the module docstring)."""

    def __init__(
        self,
        db: FleetDB,
        mqtt: MqttClient,
        *,
        signing_key: Ed25519PrivateKey,
        order_ttl_s: float = ORDER_TTL_S,
        tick_s: float = 0.5,
        clock: Callable[[], float] = time.time,
        heartbeat: Path | None = None,
        leadership: Leadership | None = None,
        inbox_max_reports: int = INBOX_MAX_REPORTS,
        inbox_max_bytes: int = INBOX_MAX_BYTES,
    ) -> None:
        self.db = db
        self.mqtt = mqtt
        self.signing_key = signing_key
        self.order_ttl_s = order_ttl_s
        #: Touched after every tick, so a health check can tell the loop is alive.
        self.heartbeat = heartbeat
        self.tick_s = tick_s
        self.clock = clock
        #: With several controllers per database: only the lease holder drives rollouts.
        self.leadership = leadership
        self._term: LeaseTerm | None = None
        self._seq = 0
        self._seq_lock = threading.Lock()
        self._inbox: queue.Queue[Report] = queue.Queue(maxsize=inbox_max_reports)
        self._inbox_max_bytes = inbox_max_bytes
        self._inbox_bytes = 0
        #: Reports (statuses and events) received, kept or not (written by the MQTT thread).
        self.received = 0
        self._inbox_lock = threading.Lock()
        #: Device reports dropped by this controller, by reason (also added to the
        #: database's counts, which every controller's ``/metrics`` serves).
        self.dropped: Counter[str] = Counter()
        self._unflushed: Counter[str] = Counter()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._manifests: dict[tuple[str, int], SignedManifest] = {}
        #: Batches of reports stored so far: a rollout whose record, and the reports
        #: stored, are as at its last judgement need not be re-read (see :meth:`tick`).
        self._stored = 0
        self._judged: dict[str, tuple[tuple[Any, ...], float]] = {}

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Subscribe to device status and events, and start the recorder and the loop."""
        self._stop.clear()
        self.mqtt.subscribe(STATUS_FILTER, self._on_status, qos=1)
        self.mqtt.subscribe(EVENTS_FILTER, self._on_event, qos=1)
        for name, target in (("fleet-recorder", self._record_loop), ("rollouts", self._loop)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads.clear()
        if self.leadership is not None:
            self.leadership.release()

    # ------------------------------------------------------------------ recording

    def _on_status(self, message: Message) -> None:
        self._receive("status", message, DeviceStatus)

    def _on_event(self, message: Message) -> None:
        self._receive("event", message, RolloutEvent)

    def _receive(self, kind: str, message: Message, cls: type[Any]) -> None:
        """Read one report (bounded) and queue it for storing; anything wrong with it costs
        that report alone, logged and counted, never the subscriber."""
        self.received += 1
        try:
            device = device_of_topic(message.topic)
            if not message.payload:
                return  # a cleared retained message
            parsed = cls.parse(message.payload)
        except TetherError as exc:
            log.warning("ignoring %s on %s: %s", kind, message.topic, exc.message)
            self._drop(DROP_INVALID)
            return
        except Exception:
            log.exception("ignoring %s on %s: it could not be read", kind, message.topic)
            self._drop(DROP_INVALID)
            return
        size = len(message.payload)
        with self._inbox_lock:
            room = self._inbox_bytes + size <= self._inbox_max_bytes
            if room:
                self._inbox_bytes += size
        if room:
            try:
                self._inbox.put_nowait((kind, device, parsed, self.clock(), size))
                return
            except queue.Full:
                with self._inbox_lock:
                    self._inbox_bytes -= size
        if self._drop(DROP_INBOX_FULL) % 1000 == 1:
            log.warning(
                "fleet inbox full (%d reports, %d bytes waiting): dropped the %s on %s",
                self._inbox.qsize(),
                self._inbox_bytes,
                kind,
                message.topic,
            )

    def _drop(self, reason: str, count: int = 1) -> int:
        """Count ``count`` dropped reports; returns this controller's total for ``reason``."""
        with self._inbox_lock:
            self.dropped[reason] += count
            self._unflushed[reason] += count
            return self.dropped[reason]

    def _take(self, first: Report | None = None) -> list[Report]:
        """Up to :data:`BATCH_REPORTS` reports from the inbox (``first`` already taken)."""
        batch = [] if first is None else [first]
        while len(batch) < BATCH_REPORTS:
            try:
                batch.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        with self._inbox_lock:
            self._inbox_bytes -= sum(report[4] for report in batch)
        return batch

    def _record_loop(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._inbox.get(timeout=0.1)
            except queue.Empty:
                self._flush_drops()
                continue
            self._record(self._take(first))

    def record_pending(self) -> int:
        """Store every report waiting in the inbox now, batch by batch, in this thread;
        returns how many were taken (for callers that do not :meth:`start` the loop)."""
        taken = 0
        while batch := self._take():
            self._record(batch)
            taken += len(batch)
        self._flush_drops()
        return taken

    def _record(self, batch: list[Report]) -> None:
        """Store a batch in one transaction; if that fails, each report in its own, so a
        report that cannot be stored is dropped alone and the others are kept."""
        try:
            with self.db.transaction():
                unknown = self._store(batch)
        except Exception as exc:
            if len(batch) == 1:
                self._dropped_on_store(batch[0], exc)
                return
            log.warning(
                "storing %d fleet reports at once failed (%s); storing them one by one",
                len(batch),
                exc,
            )
            unknown = 0
            for report in batch:
                try:
                    with self.db.transaction():
                        unknown += self._store([report])
                except Exception as single:
                    self._dropped_on_store(report, single)
        self._stored += 1
        if unknown:
            self._drop(DROP_UNKNOWN_ROLLOUT, unknown)
        self._flush_drops()

    def _store(self, batch: list[Report]) -> int:
        """Write reports (statuses, then events); how many events named a rollout their
        device is not in (ignored)."""
        statuses, events = [], []
        for kind, device, parsed, at, _size in batch:
            if kind == "status":
                statuses.append((device, parsed, at))
            else:
                events.append((device, parsed, at))
        if statuses:
            self.db.upsert_devices(statuses)
        return self.db.record_events(events) if events else 0

    def _dropped_on_store(self, report: Report, exc: BaseException) -> None:
        kind, device, _parsed, _at, size = report
        log.error("dropped the %s of %s (%d bytes): storing it failed: %r", kind, device, size, exc)
        self._drop(DROP_STORE_FAILED)

    def _flush_drops(self) -> None:
        """Add the drops counted since the last flush to the database's counts."""
        with self._inbox_lock:
            pending, self._unflushed = self._unflushed, Counter()
        if not pending:
            return
        try:
            self.db.add_drops(dict(pending))
        except Exception as exc:
            log.warning(
                "could not count %d dropped reports in the database: %s", sum(pending.values()), exc
            )
            with self._inbox_lock:
                self._unflushed.update(pending)

    # ------------------------------------------------------------------ driving

    def _loop(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.parent.mkdir(parents=True, exist_ok=True)
        while not self._stop.wait(self.tick_s):
            try:
                self.tick()
            except Exception:
                log.exception("rollout tick failed")
                continue
            if self.heartbeat is not None:
                self.heartbeat.touch()

    def tick(self, now: float | None = None) -> None:
        """Advance every unfinished rollout by what has happened since the last tick."""
        given = now
        now = self.clock() if now is None else now
        if self.leadership is not None:
            term = self.leadership.hold(now, self._seq)
            if term is None:
                self._term = None
                return
            if term != self._term:
                self._term = term
                self._manifests.clear()
                with self._seq_lock:
                    # Above anything the previous leader may have signed since it last
                    # renewed (at most a lease lifetime of microseconds ago).
                    floor = self.leadership.seq_floor + int(self.leadership.ttl_s * 1_000_000)
                    self._seq = max(self._seq, floor)
                self._resend_unacknowledged(now)
        for rollout in self.db.list_rollouts(active_only=True):
            if given is None and self._unchanged(rollout, now):
                continue
            try:
                if rollout.state == "running":
                    self._advance(rollout, given)
                elif rollout.state == "aborting":
                    self._roll_back(rollout, rollout.reason or "aborted", now)
                elif rollout.state == "rolling_back":
                    self._finish_rollback(rollout, now)
            except MqttError as exc:
                log.warning("rollout %s waits for the broker: %s", rollout.id, exc.message)

    def _unchanged(self, rollout: RolloutRecord, now: float) -> bool:
        """True when nothing a judgement of ``rollout`` rests on can have changed since the
        last one, less than :data:`REJUDGE_S` ago: its record, this controller's term, and
        the reports stored (every controller stores every report). Rate-limited rollouts
        are judged every tick (their allowance grows with time). Skipping only delays a
        decision; it keeps the controller from re-reading every device of a large rollout
        on every tick."""
        key = (self._stored, rollout.updated_at, rollout.state, rollout.wave, self._term)
        if rollout.state not in ("running", "rolling_back") or rollout.wave_started_at is None:
            return False
        if rollout.policy.rate_per_minute is not None:
            return False
        last = self._judged.get(rollout.id)
        if last is not None and last[0] == key and now - last[1] < REJUDGE_S:
            return True
        # Recorded before the judgement: reports stored during it make the next tick look.
        self._judged[rollout.id] = (key, now)
        if len(self._judged) > 1000:
            self._judged.clear()
        return False

    def _advance(self, rollout: RolloutRecord, now: float | None) -> None:
        policy = rollout.policy
        devices = self.db.rollout_devices(rollout.id, health=False)
        # Decisions are stamped with the time after the state they rest on was read: a
        # report received during a slow read is older than an order that follows it.
        now = self.clock() if now is None else now
        if rollout.wave_started_at is None:
            self._open_wave(rollout, rollout.wave, devices, now)
            return
        deadline = rollout.created_at + policy.until_s
        pending = [d for d in devices if d.wave <= rollout.wave and d.ordered_at is None]
        held = False  # online devices of this wave the rollout rate has not ordered yet
        if pending and now < deadline:
            ordered_now, held = self._order_late(rollout, devices, pending, now)
            if ordered_now:
                devices = self.db.rollout_devices(rollout.id, health=False)
        wave = [d for d in devices if d.wave == rollout.wave and d.ordered_at is not None]
        silent = self._silent(wave, policy, now)
        if silent:
            self.db.mark_devices(
                rollout.id,
                silent,
                TIMEOUT,
                now,
                reason=f"no answer within {policy.device_timeout_s:g}s",
                unless_steps=tuple(INSTALL_DONE),
            )
            devices = self.db.rollout_devices(rollout.id, health=False)
            wave = [d for d in devices if d.wave == rollout.wave and d.ordered_at is not None]
        ordered = [d for d in devices if d.wave <= rollout.wave and d.ordered_at is not None]
        failed = [d for d in ordered if d.step in FAILED_STEPS]
        executed = sum(1 for d in ordered if d.step in INSTALL_DONE)
        budget = failure_budget(policy, len(ordered), executed)
        if budget is not None and len(failed) > budget:
            sample = "; ".join(f"{d.device}: {d.step} {d.reason}".strip() for d in failed[:3])
            self._roll_back(
                rollout,
                f"wave {rollout.wave + 1}: {len(failed)} of {len(ordered)} devices failed "
                f"(allowed {budget}): {sample}",
                now,
            )
            return
        if held or not all(d.step in INSTALL_DONE for d in wave):
            return
        verdict = health_verdict(self.db.committed_health(rollout.id, rollout.wave), policy)
        if verdict is not None:
            self._roll_back(rollout, f"wave {rollout.wave + 1}: {verdict}", now)
            return
        last_wave = max(d.wave for d in devices)
        # Fewer devices finished than min_executed, and no more will be ordered: judge the
        # failures over those that did.
        if (
            rollout.wave >= last_wave
            and budget is None
            and len(failed) > allowed_failures(policy.max_failure, executed)
        ):
            self._roll_back(rollout, f"{len(failed)} of {executed} finished devices failed", now)
            return
        if rollout.wave >= last_wave:
            waiting = [d.device for d in devices if d.ordered_at is None and d.step is None]
            if waiting and now < deadline:
                return  # the target set is open: late devices may still come online
            if waiting:
                self.db.mark_devices(
                    rollout.id,
                    waiting,
                    MISSED,
                    now,
                    reason="offline until the rollout's deadline",
                    unless_steps=(ORDERED, *INSTALL_DONE),
                )
            if self.db.set_rollout_state(
                rollout.id,
                "completed",
                now,
                reason="",
                only_from=("running",),
                expect_wave=rollout.wave,
                fence=self._term,
            ):
                log.info("rollout %s completed", rollout.id)
            return
        log.info("rollout %s: wave %d passed", rollout.id, rollout.wave + 1)
        self._open_wave(rollout, rollout.wave + 1, devices, now)

    def _allowance(
        self, rollout: RolloutRecord, devices: list[RolloutDevice], now: float
    ) -> int | None:
        """How many devices the rollout rate lets this tick order (``None``: no limit)."""
        times = [d.ordered_at for d in devices if d.ordered_at is not None]
        committed = sum(1 for d in devices if d.step == "committed")
        first = min(times) if times else None
        return order_allowance(rollout.policy, first, len(times), committed, now)

    def _order_late(
        self,
        rollout: RolloutRecord,
        devices: list[RolloutDevice],
        pending: list[RolloutDevice],
        now: float,
    ) -> tuple[bool, bool]:
        """Order the online, not yet ordered devices of open waves (late ones, and those
        the rollout rate held back), as far as the rate allows. Returns whether any was
        ordered, and whether online devices of the current wave are still held back."""
        online = self.db.online_devices([d.device for d in pending])
        ready = [d for d in pending if d.device in online]
        allowance = self._allowance(rollout, devices, now)
        late = ready if allowance is None else ready[:allowance]
        held = any(d.wave == rollout.wave for d in ready[len(late) :])
        if not late:
            return False, held
        self.db.mark_devices(
            rollout.id, [d.device for d in late], ORDERED, now, column="ordered_at"
        )
        for wave in sorted({d.wave for d in late}):
            self._send_installs(rollout, [d for d in late if d.wave == wave], now, wave=wave)
        log.info("rollout %s: %d more devices ordered", rollout.id, len(late))
        return True, held

    def _open_wave(
        self, rollout: RolloutRecord, wave: int, devices: list[RolloutDevice], now: float
    ) -> None:
        """Decide (once, fenced) that ``wave`` starts, then send its install orders to the
        wave's online devices (the others get theirs when they come online)."""
        candidates = [d for d in devices if d.wave == wave]
        online = self.db.online_devices([d.device for d in candidates])
        members = [d for d in candidates if d.device in online]
        allowance = self._allowance(rollout, devices, now)
        if allowance is not None:
            members = members[:allowance]  # the rest when the rollout rate allows
        with self.db.transaction():
            opened = self.db.open_wave(
                rollout.id,
                wave,
                now,
                expect_wave=rollout.wave,
                first=rollout.wave_started_at is None,
                fence=self._term,
                holder=self._term.holder if self._term else "",
                epoch=self._term.epoch if self._term else 0,
            )
            if not opened:
                return  # another controller decided first, or this one lost its lease
            self.db.mark_devices(
                rollout.id, [d.device for d in members], ORDERED, now, column="ordered_at"
            )
        self._send_installs(rollout, members, now, wave=wave)

    @staticmethod
    def _silent(wave: list[RolloutDevice], policy: RolloutPolicy, now: float) -> list[str]:
        silent = []
        for d in wave:
            if d.step in INSTALL_DONE or d.ordered_at is None:
                continue
            if d.step == "active" and d.active_at is not None:
                deadline = d.active_at + policy.window_s + policy.device_timeout_s
            else:
                deadline = d.ordered_at + policy.device_timeout_s
            if now > deadline:
                silent.append(d.device)
        return silent

    def _manifest(self, rollout: RolloutRecord) -> SignedManifest:
        key = (rollout.model, rollout.version)
        if key not in self._manifests:
            signed = self.db.get_manifest(*key)
            if signed is None:
                raise InvalidInput(f"{rollout.model} v{rollout.version} is no longer published")
            self._manifests[key] = signed
        return self._manifests[key]

    def _resend_unacknowledged(self, now: float) -> None:
        """On taking the lease: send again the orders no device has acknowledged yet."""
        for rollout in self.db.list_rollouts(active_only=True):
            devices = self.db.rollout_devices(rollout.id, health=False)
            if rollout.state == "running" and rollout.wave_started_at is not None:
                silent = [d for d in devices if d.step == ORDERED and d.wave <= rollout.wave]
                for wave in sorted({d.wave for d in silent}):
                    members = [d for d in silent if d.wave == wave]
                    self._send_installs(rollout, members, now, wave=wave)
            elif rollout.state == "rolling_back":
                silent = [
                    d for d in devices if d.rollback_at is not None and d.step not in ROLLBACK_DONE
                ]
                self._send_rollbacks(rollout, silent, now)

    def _next_seq(self) -> int:
        """A number larger than any this controller signed before: microseconds of the
        wall clock (so it keeps growing across restarts), at least one more than the last."""
        with self._seq_lock:
            self._seq = max(self._seq + 1, int(time.time() * 1_000_000))
            return self._seq

    def _publish_order(self, device: str, order: RolloutOrder, now: float) -> None:
        """Sign ``order`` for ``device`` and publish it as the device's retained order."""
        signed = order.model_copy(
            update={"device": device, "seq": self._next_seq(), "expires_at": now + self.order_ttl_s}
        )
        payload = sign_order(signed, self.signing_key)
        self.mqtt.publish(device_rollout(device), payload, qos=1, retain=True)

    def _send_installs(
        self, rollout: RolloutRecord, devices: list[RolloutDevice], now: float, *, wave: int
    ) -> None:
        order = RolloutOrder(
            rollout_id=rollout.id,
            action="install",
            model=rollout.model,
            signed_manifest=self._manifest(rollout),
            health_window_s=rollout.policy.window_s,
            shadow_sample_rate=rollout.policy.shadow_sample_rate,
            issued_at=now,
            wave=wave + 1,
        )
        names = [d.device for d in devices]
        for name in names:
            self._publish_order(name, order, now)
        log.info("rollout %s: wave %d ordered on %d devices", rollout.id, wave + 1, len(names))

    def _roll_back(self, rollout: RolloutRecord, reason: str, now: float) -> None:
        """Send rollback orders to every device that got the install; wait on those that
        may run the new version."""
        log.warning("rollout %s rolls back: %s", rollout.id, reason)
        with self.db.transaction():
            if not self.db.set_rollout_state(
                rollout.id,
                "rolling_back",
                now,
                reason=reason,
                only_from=("running", "paused", "aborting"),
                fence=self._term,
            ):
                return
            devices = [
                d
                for d in self.db.rollout_devices(rollout.id, health=False)
                if d.ordered_at is not None
            ]
            waiting = [d.device for d in devices if d.step in MAY_HAVE_NEW]
            self.db.mark_devices(rollout.id, waiting, ROLLBACK_ORDERED, now, column="rollback_at")
            others = [d.device for d in devices if d.step not in MAY_HAVE_NEW]
            self.db.mark_devices(rollout.id, others, None, now, column="rollback_at")
        self._send_rollbacks(rollout, devices, now)

    def _send_rollbacks(
        self, rollout: RolloutRecord, devices: list[RolloutDevice], now: float
    ) -> None:
        for d in devices:
            order = RolloutOrder(
                rollout_id=rollout.id,
                action="rollback",
                model=rollout.model,
                rollback_to=d.previous_version,
                health_window_s=0.0,
                issued_at=now,
            )
            self._publish_order(d.device, order, now)

    def _finish_rollback(self, rollout: RolloutRecord, now: float) -> None:
        devices = [
            d
            for d in self.db.rollout_devices(rollout.id, health=False)
            if d.rollback_at is not None
        ]
        timeout = rollout.policy.device_timeout_s
        silent = [
            d.device
            for d in devices
            if d.step not in ROLLBACK_DONE and now > (d.rollback_at or now) + timeout
        ]
        if silent:
            self.db.mark_devices(
                rollout.id,
                silent,
                TIMEOUT,
                now,
                reason=f"rollback not confirmed within {timeout:g}s",
                unless_steps=tuple(ROLLBACK_DONE),
            )
            devices = [
                d
                for d in self.db.rollout_devices(rollout.id, health=False)
                if d.rollback_at is not None
            ]
        if all(d.step in ROLLBACK_DONE for d in devices) and self.db.set_rollout_state(
            rollout.id, "rolled_back", now, only_from=("rolling_back",), fence=self._term
        ):
            log.info("rollout %s rolled back", rollout.id)
