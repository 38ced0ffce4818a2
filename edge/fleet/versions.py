"""Which version of a model serves: switch to one, commit it, roll it back, and bring the
device to a consistent state after a restart, however the last run ended.

The previous version stays on disk until the new one is committed, so a rollback is one
switch; versions undone or superseded are removed only after the state that no longer
needs them is saved.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from edge.fleet.context import FleetContext, finish
from edge.fleet.health_window import HealthWindow
from edge.fleet.staging import (
    clean_staging,
    has_marker,
    model_folder,
    part_file,
    remove_version,
    staging_dir,
    verify_version,
)
from edge.fleet.state import ModelState
from edge.shadow import ShadowRates
from serving.model_config import list_versions
from shared.errors import TetherError
from shared.fleet import HealthReport

log = logging.getLogger(__name__)


class VersionSwitch:
    """Serves, commits and rolls back the versions of one device's models."""

    def __init__(
        self, ctx: FleetContext, window: HealthWindow, shadow_rates: ShadowRates | None
    ) -> None:
        self.ctx = ctx
        self.window = window
        self.shadow_rates = shadow_rates

    # ------------------------------------------------------------------ recovery

    def recover(self) -> None:
        """Bring the device to a consistent state after a start, however the last run ended."""
        ctx = self.ctx
        for name, st in ctx.state.models.items():
            model_dir = model_folder(ctx.root, name)
            clean_staging(model_dir, {st.pending} if st.pending is not None else set())
            for version in st.discarded:
                if version not in (st.active, st.previous):
                    remove_version(model_dir, version)
            st.discarded = []
            if st.phase == "active":
                st.boots += 1
            ctx.save()
            if st.phase == "active" and st.boots > ctx.fleet.crash_loop_limit:
                reason = f"crash loop: {st.boots - 1} restarts while version {st.active} was new"
                self.roll_back(name, st.rollout_id or "recovery", st.previous, reason, "install")
                continue
            self._serve_verified(name, st)

    def _serve_verified(self, name: str, st: ModelState) -> None:
        ctx = self.ctx
        model_dir = model_folder(ctx.root, name)
        for version in (st.active, st.previous):
            if version is None:
                continue
            why = self.unusable(model_dir, version)
            if why is None:
                if version != st.active:
                    bad = st.active
                    log.error(
                        "%s: version %s of %s unusable; serving %s", ctx.device, bad, name, version
                    )
                    reason = f"version {bad} damaged on disk"
                    rid = st.rollout_id or "recovery"
                    self.roll_back(name, rid, version, reason, "install")
                    return
                self._switch_to(name, version)
                return
            log.error("%s: version %s of %s unusable: %s", ctx.device, version, name, why)
        # Nothing recorded is usable: the newest complete version on disk.
        for version in reversed(list_versions(model_dir) if model_dir.is_dir() else []):
            if version != st.pending and self.unusable(model_dir, version) is None:
                st.active, st.previous, st.phase = version, None, "committed"
                ctx.save()
                self._switch_to(name, version)
                return
        log.error("%s: no usable version of %s on disk", ctx.device, name)

    @staticmethod
    def unusable(model_dir: Path, version: int) -> str | None:
        """Why a version folder cannot serve (``None``: it can)."""
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
            self.ctx.target.serve(name, version)
        except TetherError as exc:
            log.error("%s: could not serve %s v%s: %s", self.ctx.device, name, version, exc.message)

    # ------------------------------------------------------------------ commit

    def commit(self, name: str, st: ModelState, report: HealthReport) -> None:
        """Keep the healthy new version, and the previous one for a later rollback; remove
        older versions the rollout superseded (not those of an A/B split)."""
        ctx = self.ctx
        version = st.active
        assert version is not None
        st.phase, st.boots, st.activated_at = "committed", 0, None
        finish(st, f"{st.rollout_id}:install", st.rollout_id or "", version, "committed", "")
        keep = {v for v in (st.active, st.previous) if v is not None}
        ab = ctx.settings.ab.get(name)
        keep |= {int(v) for v in ab.split} if ab is not None else set()
        model_dir = ctx.root / name
        st.discarded = [v for v in list_versions(model_dir) if v not in keep and v < version]
        ctx.save()
        ctx.hook("committing", name, version)
        for old in st.discarded:
            remove_version(model_dir, old)
        st.discarded = []
        ctx.save()
        self.window.close(name)
        ctx.event(st.rollout_id or "", name, version, "committed", "", report)
        ctx.status_soon()

    # ------------------------------------------------------------------ rollback

    def roll_back(self, name: str, rid: str, to: int | None, reason: str, action: str) -> None:
        """Serve ``to`` (default: the previous version) again; discard the version undone."""
        ctx = self.ctx
        st = ctx.state.model(name)
        bad = st.active
        if bad is None:
            # Nothing this agent installed is serving (an install that failed or was
            # cancelled before its switch, or a model the agent never touched): drop what
            # is staged and leave the version the repository serves alone.
            self.drop_pending(name, st)
            finish(st, f"{rid}:{action}", rid, 0, "rolled_back", f"{reason}: nothing to undo")
            ctx.save()
            ctx.event(rid, name, 0, "rolled_back", f"{reason}: nothing to undo")
            return
        if to is None:
            to = st.previous
        model_dir = model_folder(ctx.root, name)
        if to is not None and self.unusable(model_dir, to) is not None:
            why = f"cannot roll back to {to}: {self.unusable(model_dir, to)}"
            finish(st, f"{rid}:{action}", rid, bad, "failed", why)
            ctx.save()
            ctx.event(rid, name, bad, "failed", why)
            return
        report = self.window.report(name, bad)
        self.drop_pending(name, st)
        st.active, st.previous = to, None
        if to is not None and bad > to:
            st.discarded = sorted({*st.discarded, bad})
        elif to is not None:
            st.previous = bad
        st.phase, st.reason, st.boots, st.activated_at = "rolled_back", reason, 0, None
        finish(st, f"{rid}:{action}", rid, bad, "rolled_back", reason)
        if action == "abort":
            st.remember(f"{rid}:install")
        ctx.save()
        try:
            if to is None:
                ctx.target.unload(name)
            else:
                ctx.target.serve(name, to)
        except TetherError as exc:
            log.error("%s: rollback of %s to %s failed: %s", ctx.device, name, to, exc.message)
        self.window.close(name)
        if self.shadow_rates is not None:
            self.shadow_rates.clear(name)
        for version in st.discarded:
            remove_version(model_dir, version)
        st.discarded = []
        ctx.save()
        ctx.event(rid, name, bad, "rolled_back", reason, report)
        ctx.status_soon()

    def drop_pending(self, name: str, st: ModelState) -> None:
        """Forget the version being installed, and its files unless they serve."""
        version = st.pending
        st.pending = None
        if version is None:
            return
        model_dir = model_folder(self.ctx.root, name)
        part_file(model_dir, version).unlink(missing_ok=True)
        shutil.rmtree(staging_dir(model_dir, version), ignore_errors=True)
        if version not in (st.active, st.previous):
            remove_version(model_dir, version)
