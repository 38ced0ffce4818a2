"""``tether fleet``: signing keys, publishing model versions, staged rollouts, the fleet service.

The rollout commands only write to the fleet database; ``tether fleet serve`` (artifact
server + rollout controller) acts on what they wrote, so they work from any machine that
reaches the database, and a rollout survives restarts of both.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from cloud import fleet_migrate
from cloud.fleet_db import HARDWARE_KEY, FleetDB, schema_revision
from cloud.fleet_settings import FleetSettings, load_fleet_settings
from cloud.provision import provision_command
from cloud.rollout_policy import RolloutPolicy
from shared.client_ids import random_client_id
from shared.errors import TetherError
from shared.redaction import redact_url
from shared.shutdown import ShutdownSignals

log = logging.getLogger(__name__)

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)?$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(text: str) -> float:
    """``"500ms"``, ``"60s"``, ``"2m"``, ``"1h"``, ``"30d"`` or plain seconds -> seconds."""
    match = _DURATION.match(text.strip())
    if not match:
        raise click.BadParameter(f"{text!r} is not a duration like 60s, 2m, 30d")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_labels(text: str) -> dict[str, str]:
    """``"k=v,k2=v2"`` -> ``{"k": "v", "k2": "v2"}``."""
    labels: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{part!r} is not key=value")
        labels[key.strip()] = value.strip()
    return labels


def parse_fraction(text: str) -> float:
    """``"5%"`` or ``"0.05"`` -> 0.05."""
    text = text.strip()
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a fraction like 0.05 or 5%") from None


def _settings(ctx: click.Context) -> FleetSettings:
    settings = ctx.find_object(FleetSettings)
    assert settings is not None
    return settings


def _db(settings: FleetSettings) -> FleetDB:
    return FleetDB(settings.database, prefix=settings.table_prefix)


def _fail(exc: TetherError) -> click.ClickException:
    return click.ClickException(exc.message)


@click.group("fleet")
@click.option("--data-dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--database-url", help="sqlite:///path or postgresql://... (default SQLite).")
@click.option("--mqtt-url", help="MQTT broker URL (default TETHER_MQTT_URL or localhost).")
@click.pass_context
def fleet_group(
    ctx: click.Context, data_dir: Path | None, database_url: str | None, mqtt_url: str | None
) -> None:
    """Publish signed model versions and roll them out to the fleet in waves."""
    try:
        ctx.obj = load_fleet_settings(
            data_dir=data_dir, database_url=database_url, mqtt_url=mqtt_url
        )
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc


@fleet_group.command("keygen")
@click.argument("keyfile", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--force", is_flag=True, help="Overwrite an existing key file.")
def keygen_command(keyfile: Path, force: bool) -> None:
    """Create an ed25519 signing key; print the public key devices must trust."""
    from shared.manifest import generate_key, key_id, public_key_text, save_private_key

    if keyfile.exists() and not force:
        raise click.ClickException(f"{keyfile} exists (use --force to replace it)")
    key = generate_key()
    save_private_key(key, keyfile)
    click.echo(f"wrote {keyfile} (mode 0600), key id {key_id(key)}")
    click.echo("public key (configure devices to trust it):")
    click.echo(public_key_text(key))


@fleet_group.command("pubkey")
@click.argument("keyfile", type=click.Path(path_type=Path, dir_okay=False), required=False)
@click.pass_context
def pubkey_command(ctx: click.Context, keyfile: Path | None) -> None:
    """Print the public key of KEYFILE (default: the configured TETHER_FLEET_SIGNING_KEY)."""
    from shared.manifest import load_private_key, public_key_text

    path = keyfile or _settings(ctx).signing_key
    if path is None:
        raise click.ClickException("give KEYFILE or set TETHER_FLEET_SIGNING_KEY")
    try:
        click.echo(public_key_text(load_private_key(path)))
    except (OSError, TetherError) as exc:
        raise click.ClickException(str(exc)) from exc


@fleet_group.command("publish")
@click.argument("version_dir", type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option(
    "--key",
    "keyfile",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Signing key (default: TETHER_FLEET_SIGNING_KEY; there is no other default).",
)
@click.option("--expires", default="30d", show_default=True, help="Manifest lifetime.")
@click.option("--target-hardware", default="cpu", show_default=True)
@click.option("--min-agent-version", default="0.1.0", show_default=True)
@click.option("--artifact-url", help="Base URL devices download from (default from settings).")
@click.pass_context
def publish_command(
    ctx: click.Context,
    version_dir: Path,
    keyfile: Path | None,
    expires: str,
    target_hardware: str,
    min_agent_version: str,
    artifact_url: str | None,
) -> None:
    """Sign and store models/repository/<name>/<version> as a publishable artifact."""
    from cloud.artifacts import ArtifactStore
    from cloud.registry import PublishOptions, Registry, load_signing_key
    from shared.manifest import key_id

    settings = _settings(ctx)
    if keyfile is not None:  # the flag overrides the setting: one value, read in one place
        settings = settings.model_copy(update={"signing_key": keyfile})
    try:
        key = load_signing_key(settings)
        registry = Registry(
            _db(settings),
            ArtifactStore(settings.artifacts),
            artifact_url or settings.public_artifact_url,
        )
        signed = registry.publish(
            version_dir,
            key,
            PublishOptions(
                expires_s=parse_duration(expires),
                target_hardware=target_hardware,
                min_agent_version=min_agent_version,
            ),
        )
    except (OSError, TetherError) as exc:
        raise click.ClickException(getattr(exc, "message", str(exc))) from exc
    m = signed.manifest
    click.echo(f"published {m.model} version {m.version}: {m.size} bytes, sha256 {m.sha256}")
    click.echo(f"url {redact_url(m.url)}, signed by key {key_id(key)}, expires in {expires}")


def _serving(settings: FleetSettings, host: str | None, port: int | None) -> FleetSettings:
    updates: dict[str, Any] = {}
    if host:
        updates["http_host"] = host
    if port is not None:
        updates["http_port"] = port
    return settings.model_copy(update=updates)


@fleet_group.command("artifacts")
@click.option("--host", help="Address to listen on (default 127.0.0.1).")
@click.option("--port", type=int, help="Port (default 8090).")
@click.pass_context
def artifacts_command(ctx: click.Context, host: str | None, port: int | None) -> None:
    """Serve artifacts to devices (and /metrics) on granian, until SIGTERM.

    Needs the artifact store and the fleet database; never the signing key.
    """
    from cloud.artifact_server import serve

    serve(_serving(_settings(ctx), host, port))


@fleet_group.command("controller")
@click.option(
    "--check-alive",
    is_flag=True,
    help="Exit 0 when a running controller ticked recently (a health check), else 1.",
)
@click.pass_context
def controller_command(ctx: click.Context, check_alive: bool) -> None:
    """Run the device registry and rollout controller until SIGTERM (no listening port).

    Signs rollout orders with TETHER_FLEET_SIGNING_KEY.
    """
    settings = _settings(ctx)
    if check_alive:
        ctx.exit(0 if controller_alive(settings) else 1)
    _run_controller(settings, on_tick=None)


def controller_alive(settings: FleetSettings, now: float | None = None) -> bool:
    """Whether the controller's heartbeat file was touched within ten ticks (30 s at least)."""
    now = time.time() if now is None else now
    try:
        age = now - settings.heartbeat.stat().st_mtime
    except OSError:
        return False
    return age <= max(30.0, 10 * settings.tick_s)


def _run_controller(settings: FleetSettings, on_tick: Callable[[], None] | None) -> None:
    """The controller until SIGTERM/SIGINT; ``on_tick`` is called every second meanwhile."""
    from cloud.leadership import Leadership
    from cloud.registry import load_signing_key
    from cloud.rollout import RolloutController
    from shared.mqtt import MqttClient

    stop = ShutdownSignals()
    stop.install()
    try:
        key = load_signing_key(settings)
        db = _db(settings)
        mqtt = MqttClient(settings.mqtt_url, random_client_id("fleet", "controller"))
        mqtt.start(wait_s=None)
        controller = RolloutController(
            db,
            mqtt,
            signing_key=key,
            order_ttl_s=settings.order_ttl_s,
            tick_s=settings.tick_s,
            heartbeat=settings.heartbeat,
            leadership=Leadership(db, ttl_s=settings.lease_ttl_s),
        )
        controller.start()
        log.info(
            "rollout controller: broker %s, database %s",
            redact_url(settings.mqtt_url),
            redact_url(settings.database),
        )
        while not stop.wait(1.0):
            if on_tick is not None:
                on_tick()
        controller.stop()
        mqtt.stop()
    except TetherError as exc:
        raise _fail(exc) from exc
    finally:
        stop.restore()


@fleet_group.command("serve")
@click.option("--host", help="Artifact server address (default 127.0.0.1).")
@click.option("--port", type=int, help="Artifact server port (default 8090).")
@click.pass_context
def serve_command(ctx: click.Context, host: str | None, port: int | None) -> None:
    """Run the artifact server, device registry and rollout controller until SIGTERM.

    The artifact server runs as `tether fleet artifacts` in a child process that does not
    get the signing key; this process runs the controller, which signs orders with it.
    """
    settings = _serving(_settings(ctx), host, port)
    child = subprocess.Popen(
        [sys.executable, "-m", "tether", "fleet", "artifacts"], env=_artifacts_env(settings)
    )

    def watch() -> None:
        if child.poll() is not None:
            raise click.ClickException(f"the artifact server exited with {child.returncode}")

    try:
        _run_controller(settings, on_tick=watch)
    finally:
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def _artifacts_env(settings: FleetSettings) -> dict[str, str]:
    """The environment of the artifact server child: these settings, without the key."""
    env = {k: v for k, v in os.environ.items() if k != "TETHER_FLEET_SIGNING_KEY"}
    values = {
        "DATA_DIR": settings.data_dir,
        "DATABASE_URL": settings.database_url,
        "TABLE_PREFIX": settings.table_prefix,
        "ARTIFACT_DIR": settings.artifact_dir,
        "HTTP_HOST": settings.http_host,
        "HTTP_PORT": settings.http_port,
        "HTTP_WORKERS": settings.http_workers,
        "HTTP_THREADS": settings.http_threads,
    }
    env.update({f"TETHER_FLEET_{k}": str(v) for k, v in values.items() if v is not None})
    return env


@fleet_group.command("status")
@click.option("--recent", default=5, show_default=True, help="Finished rollouts to show too.")
@click.pass_context
def status_command(ctx: click.Context, recent: int) -> None:
    """The fleet at a glance: devices, versions, rollouts with progress bars."""
    from cloud.fleet_status import render

    try:
        click.echo("\n".join(render(_db(_settings(ctx)), recent)))
    except TetherError as exc:
        raise _fail(exc) from exc


@fleet_group.command("devices")
@click.option("--select", "select", default="", help="Label selector k=v,k2=v2.")
@click.option("--hardware", help="Only devices that report this hardware.")
@click.option("--group", help="Only the devices of this group of the fleet settings, now.")
@click.pass_context
def devices_command(
    ctx: click.Context, select: str, hardware: str | None, group: str | None
) -> None:
    """List the devices that reported to the fleet (those a rollout would select)."""
    settings = _settings(ctx)
    for d in _db(settings).list_devices(device_selector(settings, select, hardware, group)):
        models = ", ".join(f"{m}:{s.get('active')}" for m, s in sorted(d.models.items()))
        labels = ",".join(f"{k}={v}" for k, v in sorted(d.labels.items()))
        state = "online" if d.online else "offline"
        click.echo(f"{d.device}\t{state}\t{d.hardware}\t{labels}\t{models}")


@fleet_group.group("db")
def db_group() -> None:
    """The fleet database's schema (every controller also migrates it when it starts)."""


@db_group.command("upgrade")
@click.pass_context
def db_upgrade_command(ctx: click.Context) -> None:
    """Migrate the fleet database to this release's schema (Alembic upgrade head)."""
    settings = _settings(ctx)
    try:
        db = _db(settings)  # opening it migrates it
        revision = db.schema_revision()
        db.close()
    except TetherError as exc:
        raise _fail(exc) from exc
    click.echo(f"{redact_url(settings.database)}: schema at revision {revision} (head)")


@db_group.command("current")
@click.pass_context
def db_current_command(ctx: click.Context) -> None:
    """Show the fleet database's schema revision and this release's (changes nothing)."""
    settings = _settings(ctx)
    try:
        revision = schema_revision(settings.database, prefix=settings.table_prefix)
    except TetherError as exc:
        raise _fail(exc) from exc
    click.echo(
        f"{redact_url(settings.database)}: schema at revision {revision or 'none'}"
        f" (this release: {fleet_migrate.head()})"
    )


@fleet_group.group("rollout")
def rollout_group() -> None:
    """Start and steer staged rollouts (the controller in `tether fleet serve` acts)."""


def device_selector(
    settings: FleetSettings, select: str, hardware: str | None, group: str | None
) -> dict[str, str]:
    """The selector of ``--select``, ``--hardware`` and ``--group`` together (every part
    must match); a label or hardware given twice with different values is refused."""
    selector: dict[str, str] = {}
    if group is not None:
        spec = settings.groups.get(group)
        if spec is None:
            known = ", ".join(sorted(settings.groups)) or "none defined (TETHER_FLEET_GROUPS)"
            raise click.BadParameter(
                f"no device group {group!r}; groups: {known}", param_hint="--group"
            )
        selector.update(spec.labels)
        if spec.hardware is not None:
            selector[HARDWARE_KEY] = spec.hardware
    for key, value in parse_labels(select).items():
        if selector.get(key, value) != value:
            raise click.BadParameter(
                f"label {key} is {selector[key]!r} in group {group!r}", param_hint="--select"
            )
        selector[key] = value
    if hardware is not None:
        if selector.get(HARDWARE_KEY, hardware) != hardware:
            raise click.BadParameter(
                f"group {group!r} selects hardware {selector[HARDWARE_KEY]!r}",
                param_hint="--hardware",
            )
        selector[HARDWARE_KEY] = hardware
    return selector


@rollout_group.command("start")
@click.argument("model")
@click.argument("version", type=int)
@click.option("--select", "select", default="", help="Label selector k=v,k2=v2 (default all).")
@click.option("--hardware", help="Only devices that report this hardware (cpu, cuda...).")
@click.option(
    "--group",
    help="A device group named in the fleet settings (TETHER_FLEET_GROUPS): its labels and "
    "hardware, matched against the devices when the rollout starts.",
)
@click.option("--waves", default="1,10%,50%,100%", show_default=True)
@click.option("--window", default="60s", show_default=True, help="Health window per wave.")
@click.option("--max-failure", default="5%", show_default=True, help="Failed/silent devices.")
@click.option(
    "--min-executed",
    type=int,
    default=0,
    show_default=True,
    help="Devices that must have finished before --max-failure can stop the rollout.",
)
@click.option("--max-error-rate", default="2%", show_default=True, help="Allowed increase.")
@click.option("--max-p99-ratio", type=float, default=1.5, show_default=True)
@click.option(
    "--min-agreement-drop",
    "--max-agreement-drop",
    "agreement_drop",
    default="0.05",
    show_default=True,
    help="Largest allowed drop in shadow agreement with the cloud teacher.",
)
@click.option("--device-timeout", default="120s", show_default=True)
@click.option("--shadow-sample-rate", type=float, default=0.1, show_default=True)
@click.option(
    "--min-requests",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    help="Requests a wave's committed devices must report, or the wave fails (no evidence).",
)
@click.option(
    "--min-shadow-samples",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    help="Shadow samples a wave must report when agreement is checked, or it fails.",
)
@click.option(
    "--min-baseline-samples",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    help="Shadow samples of the previous version (the baseline agreement) a wave must "
    "report when agreement is checked, or it fails; reports of devices before schema 1.2 "
    "carry none.",
)
@click.option("--rate", type=float, help="At most this many devices ordered per minute.")
@click.option(
    "--rate-growth",
    type=float,
    default=1.0,
    show_default=True,
    help="Multiply the rate by this after every --growth-every committed devices.",
)
@click.option("--growth-every", type=int, default=0, show_default=True)
@click.option(
    "--until",
    default="24h",
    show_default=True,
    help="How long the target set stays open: devices offline at the start (or selected "
    "later) get the order of their wave when they come online until then.",
)
@click.pass_context
def rollout_start_command(
    ctx: click.Context,
    model: str,
    version: int,
    select: str,
    hardware: str | None,
    group: str | None,
    waves: str,
    window: str,
    max_failure: str,
    min_executed: int,
    max_error_rate: str,
    max_p99_ratio: float,
    agreement_drop: str,
    device_timeout: str,
    shadow_sample_rate: float,
    min_requests: int,
    min_shadow_samples: int,
    min_baseline_samples: int,
    rate: float | None,
    rate_growth: float,
    growth_every: int,
    until: str,
) -> None:
    """Roll MODEL VERSION out to the selected devices in waves (idempotent)."""
    from cloud.rollout import start_rollout, summarize
    from cloud.rollout_policy import parse_waves

    try:
        policy = RolloutPolicy(
            waves=parse_waves(waves),
            window_s=parse_duration(window),
            max_failure=max_failure,
            min_executed=min_executed,
            max_error_rate=parse_fraction(max_error_rate),
            max_p99_ratio=max_p99_ratio,
            max_agreement_drop=parse_fraction(agreement_drop),
            device_timeout_s=parse_duration(device_timeout),
            shadow_sample_rate=shadow_sample_rate,
            min_requests=min_requests,
            min_shadow_samples=min_shadow_samples,
            min_baseline_samples=min_baseline_samples,
            until_s=parse_duration(until),
            rate_per_minute=rate,
            rate_growth=rate_growth,
            growth_every=growth_every,
        )
        settings = _settings(ctx)
        selector = device_selector(settings, select, hardware, group)
        db = _db(settings)
        rollout, created = start_rollout(db, model, version, selector, policy)
        click.echo(("started " if created else "already exists: ") + rollout.id)
        _echo(summarize(db, rollout.id))
    except TetherError as exc:
        raise _fail(exc) from exc


@rollout_group.command("status")
@click.argument("rollout_id", required=False)
@click.option("--all", "show_all", is_flag=True, help="Finished rollouts too.")
@click.pass_context
def rollout_status_command(ctx: click.Context, rollout_id: str | None, show_all: bool) -> None:
    """Show one rollout, or every unfinished one."""
    from cloud.rollout import summarize

    db = _db(_settings(ctx))
    try:
        ids = (
            [rollout_id]
            if rollout_id
            else [r.id for r in db.list_rollouts(active_only=not show_all)]
        )
        for rid in ids:
            _echo(summarize(db, rid))
    except TetherError as exc:
        raise _fail(exc) from exc


def _steer(ctx: click.Context, rollout_id: str, action: str) -> None:
    from cloud.rollout import request_abort, request_pause, request_resume

    db = _db(_settings(ctx))
    act = {"pause": request_pause, "resume": request_resume, "abort": request_abort}[action]
    try:
        moved = act(db, rollout_id)
        state = db.rollout(rollout_id).state
    except TetherError as exc:
        raise _fail(exc) from exc
    if not moved:
        raise click.ClickException(f"cannot {action} rollout {rollout_id} in state {state}")
    click.echo(f"{rollout_id}: {state}")


@rollout_group.command("pause")
@click.argument("rollout_id")
@click.pass_context
def rollout_pause_command(ctx: click.Context, rollout_id: str) -> None:
    """Pause a rollout: no new waves or orders until resumed."""
    _steer(ctx, rollout_id, "pause")


@rollout_group.command("resume")
@click.argument("rollout_id")
@click.pass_context
def rollout_resume_command(ctx: click.Context, rollout_id: str) -> None:
    """Resume a paused rollout."""
    _steer(ctx, rollout_id, "resume")


@rollout_group.command("abort")
@click.argument("rollout_id")
@click.pass_context
def rollout_abort_command(ctx: click.Context, rollout_id: str) -> None:
    """Abort a rollout: every updated device rolls back to its previous version."""
    _steer(ctx, rollout_id, "abort")


def _echo(summary: dict[str, Any]) -> None:
    click.echo(json.dumps(summary, indent=2, sort_keys=False))


# `tether fleet provision DEVICE` lives with the credentials code (docs/security.md).
fleet_group.add_command(provision_command)
