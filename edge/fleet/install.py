"""The install pipeline: verify the manifest, download (a delta when one applies), stage,
self-test, and switch to the new version, keeping the previous one to roll back to.

Each step is saved in the device's state before it takes effect and reported as a rollout
event; a newer order for the model cancels a running install (:meth:`interrupt`).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge.fleet.context import FleetContext, finish
from edge.fleet.downloader import DigestMismatch, Downloader, check_free_disk
from edge.fleet.health_window import HealthWindow
from edge.fleet.kept_artifacts import Fetched, KeptArtifacts
from edge.fleet.self_test import self_test
from edge.fleet.staging import model_folder, part_file, stage, verify_version
from edge.fleet.state import ModelState
from edge.fleet.versions import VersionSwitch
from edge.shadow import ShadowRates
from serving.model_config import list_versions, load_model_config
from shared import __version__
from shared.delta import apply_delta
from shared.errors import InvalidInput, SignatureError, TetherError
from shared.fleet import RolloutOrder
from shared.manifest import Manifest, verify_manifest

log = logging.getLogger(__name__)


class Cancelled(TetherError):
    """A newer order for the model stopped this install."""

    status = 409
    reason = "cancelled"


class InstallPipeline:
    """Carries out install orders, one at a time (on the agent's work thread)."""

    def __init__(
        self,
        ctx: FleetContext,
        *,
        window: HealthWindow,
        switch: VersionSwitch,
        downloader: Downloader,
        artifacts: KeptArtifacts,
        trusted_keys: list[Ed25519PublicKey],
        shadow_rates: ShadowRates | None,
    ) -> None:
        self.ctx = ctx
        self.window = window
        self.switch = switch
        self.downloader = downloader
        self.artifacts = artifacts
        self.trusted_keys = trusted_keys
        self.shadow_rates = shadow_rates
        self._cancel: dict[str, threading.Event] = {}
        self._installing: dict[str, str] = {}

    def interrupt(self, order: RolloutOrder) -> None:
        """Cancel a running install of ``order.model`` that ``order`` supersedes (called on
        the MQTT thread, before the order is queued)."""
        running = self._installing.get(order.model)
        if (running is not None and running != order.rollout_id) or order.action != "install":
            cancel = self._cancel.get(order.model)
            if cancel is not None:
                cancel.set()

    def install(self, order: RolloutOrder, st: ModelState) -> None:
        ctx = self.ctx
        assert order.signed_manifest is not None
        signed = order.signed_manifest
        version = signed.manifest.version
        rid = order.rollout_id
        if st.rollout_id == rid and st.active == version and st.phase == "active":
            return  # resumed after a restart: the health window goes on
        ctx.event(rid, order.model, version, "received")
        try:
            manifest = self._verify(order, st)
        except (SignatureError, InvalidInput) as exc:
            finish(st, f"{rid}:install", rid, version, "refused", exc.message)
            ctx.save()
            ctx.event(rid, order.model, version, "refused", exc.message)
            return
        if st.pending is not None and st.pending != version:
            self.switch.drop_pending(order.model, st)
        st.trusted_version, st.trusted_sha256 = version, manifest.sha256
        st.pending, st.rollout_id, st.phase, st.reason = version, rid, "downloading", ""
        st.health_window_s = order.health_window_s
        st.shadow_sample_rate = order.shadow_sample_rate
        ctx.save()
        baseline = self._measure_baseline(order, st, version)
        cancel = threading.Event()
        self._cancel[order.model] = cancel
        self._installing[order.model] = rid
        try:
            fetched = self._fetch_and_stage(order, manifest, st, cancel)
            ctx.phase(st, "staged")
            ctx.event(rid, order.model, version, "staged", fetched=fetched)
            ctx.hook("staged", order.model, version)
            self_test(
                model_folder(ctx.root, order.model),
                version,
                ctx.settings.runtime_options(),
                backend=ctx.settings.runtime.backend,
            )
            ctx.hook("self_tested", order.model, version)
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

    # ------------------------------------------------------------------ verify

    def _verify(self, order: RolloutOrder, st: ModelState) -> Manifest:
        ctx = self.ctx
        assert order.signed_manifest is not None
        claimed = order.signed_manifest.manifest
        last = st.trusted_version
        if st.active is not None:
            last = max(last or 0, st.active)
        elif last is None:
            last = ctx.target.current(order.model)
        if (
            last is not None
            and claimed.version == st.trusted_version
            and claimed.sha256 == st.trusted_sha256
            and st.rollout_id == order.rollout_id
        ):
            last -= 1  # the same order again (after a restart): resume it
        manifest = verify_manifest(
            order.signed_manifest, self.trusted_keys, now=ctx.clock(), last_trusted_version=last
        )
        if manifest.model != order.model:
            raise InvalidInput(f"manifest is for model {manifest.model!r}, not {order.model!r}")
        if manifest.target_hardware not in ("cpu", "any", ctx.fleet.hardware):
            raise InvalidInput(
                f"manifest targets {manifest.target_hardware!r}; this device is "
                f"{ctx.fleet.hardware!r}"
            )
        if _version_tuple(manifest.min_agent_version) > _version_tuple(__version__):
            raise InvalidInput(
                f"manifest needs agent {manifest.min_agent_version}; this is {__version__}"
            )
        return manifest

    # ------------------------------------------------------------------ baseline

    def _measure_baseline(self, order: RolloutOrder, st: ModelState, version: int) -> int | None:
        """Shadow-sample the version serving now at the order's rate, so that the new
        version's agreement is compared with a measured baseline (``baseline_shadow_*`` in
        its health reports); the version to measure, or ``None`` when there is nothing to
        measure (no shadow sampling asked or possible, nothing serving, none required)."""
        if (
            self.shadow_rates is None
            or order.shadow_sample_rate <= 0
            or self.ctx.fleet.min_baseline_samples <= 0
        ):
            return None
        current = st.active if st.active is not None else self.ctx.target.current(order.model)
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
        fleet = self.ctx.fleet
        need = fleet.min_baseline_samples
        deadline = time.monotonic() + fleet.evidence_timeout_s
        while (have := self.window.counters(name, current).shadow_samples) < need:
            if time.monotonic() >= deadline:
                log.warning(
                    "%s: %s v%s: %d of %d baseline shadow samples within %gs; switching anyway",
                    self.ctx.device,
                    name,
                    current,
                    have,
                    need,
                    fleet.evidence_timeout_s,
                )
                return
            if cancel.wait(0.1):
                raise Cancelled("cancelled by a newer order")

    # ------------------------------------------------------------------ download and stage

    def _fetch_and_stage(
        self, order: RolloutOrder, manifest: Manifest, st: ModelState, cancel: threading.Event
    ) -> Fetched | None:
        """Download (a delta when one applies, else the full artifact), verify and stage;
        what was fetched, or ``None`` when the version was already staged."""
        ctx = self.ctx
        name, version = order.model, manifest.version
        model_dir = model_folder(ctx.root, name)
        model_dir.mkdir(parents=True, exist_ok=True)
        version_dir = model_dir / str(version)
        if version_dir.is_dir() and verify_version(version_dir, manifest.sha256) is None:
            return None  # staged before a restart
        part = part_file(model_dir, version)
        have = part.stat().st_size if part.exists() else 0
        check_free_disk(
            model_dir, max(manifest.size - have, 0) + manifest.size, ctx.fleet.min_free_disk_mb
        )
        ctx.event(order.rollout_id, name, version, "downloading")
        ctx.hook("downloading", name, version)

        def verifying() -> None:
            ctx.phase(st, "verifying")
            ctx.event(order.rollout_id, name, version, "verifying")

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
        ctx.hook("verified", name, version)
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
                    self.ctx.device,
                    name,
                    delta.from_version,
                    manifest.version,
                    exc.message,
                )
                part.unlink(missing_ok=True)
            finally:
                delta_part.unlink(missing_ok=True)
        return None

    # ------------------------------------------------------------------ switch

    def _activate(self, order: RolloutOrder, st: ModelState, version: int) -> None:
        """Switch to the staged version (the previous one stays, to roll back to) and open
        its health window."""
        ctx = self.ctx
        name, rid = order.model, order.rollout_id
        current = st.active if st.active is not None else ctx.target.current(name)
        if current == version:
            # The policy already sees the staged folder; what served before is the highest
            # version below it (when this agent has no record of its own).
            older = [v for v in list_versions(model_folder(ctx.root, name)) if v < version]
            current = st.previous if st.previous is not None else (max(older) if older else None)
        start = self.window.counters(name, version)
        baseline = self.window.counters(name, current) if current is not None else None
        st.previous, st.active, st.pending = current, version, None
        st.phase, st.boots, st.activated_at = "active", 0, ctx.clock()
        ctx.save()
        ctx.hook("switching", name, version)
        try:
            ctx.target.serve(name, version)
        except TetherError as exc:
            self.switch.roll_back(name, rid, current, f"switch failed: {exc.message}", "install")
            return
        self.window.open(name, start, baseline)
        if self.shadow_rates is not None:
            self.shadow_rates.set(name, str(version), order.shadow_sample_rate)
        ctx.hook("switched", name, version)
        ctx.event(rid, name, version, "active")
        ctx.status_soon()

    def _fail(self, order: RolloutOrder, st: ModelState, version: int, reason: str) -> None:
        ctx = self.ctx
        finish(st, f"{order.rollout_id}:install", order.rollout_id, version, "failed", reason)
        self.switch.drop_pending(order.model, st)
        st.phase, st.reason = "failed", reason
        ctx.save()
        ctx.event(order.rollout_id, order.model, version, "failed", reason)
        log.warning("%s: install of %s v%s failed: %s", ctx.device, order.model, version, reason)


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)
