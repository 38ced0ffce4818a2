"""Device credentials for the fleet's broker: ``tether fleet provision DEVICE``.

Each device logs in to Mosquitto as itself, so the broker's ACL patterns (``%u``, see
deploy/mosquitto/acl) confine it to ``tether/<device>/...`` and its own cloud requests.
Provisioning makes, for one identity:

* a random password and its Mosquitto password-file line (PBKDF2-SHA512, the ``$7$``
  format ``mosquitto_passwd`` writes), optionally merged into the broker's password file;
* with a fleet CA (``--ca-dir``), a client certificate whose common name is the identity,
  for the broker's certificate listener (``use_identity_as_username``);
* ``edge.env`` for the device: ``TETHER_DEVICE_ID`` and ``TETHER_MQTT_URL`` with the
  password (mode 0600).

Identities are topic-safe names; ``cloud`` and ``fleet`` (topic namespaces of the cloud
side) and the service users ``cloud-worker`` and ``fleet-controller`` are refused for
devices, and so is any name starting with ``tether-``: that is where the client ids
clients choose live, while the broker binds a certificate client's id to its identity
(:mod:`shared.client_ids`), and the two must never meet. Service credentials are made with
``--service``.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import os
import re
import secrets
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import click
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.client_ids import CLIENT_ID_PREFIX
from shared.errors import InvalidInput
from shared.topics import RESERVED_DEVICE_IDS

#: Broker users of the cloud side; each has a ``user`` block of its own in the ACL.
SERVICE_IDENTITIES = frozenset({"cloud-worker", "fleet-controller"})
#: What an identity may look like: one MQTT topic segment, safe in a URL and a file name.
IDENTITY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: Mosquitto's PBKDF2-SHA512 iteration count (``mosquitto_passwd`` 2.0's default). The
#: passwords are 256 random bits, so the count guards nothing a guess could find.
PBKDF2_ITERATIONS = 101
CA_CERT, CA_KEY = "ca.crt", "ca.key"


def check_identity(name: str, *, service: bool = False) -> str:
    """Refuse names that are not topic-safe or that would alias the cloud side's topics."""
    if not IDENTITY.match(name):
        raise InvalidInput(
            f"{name!r} is not a valid identity: letters, digits, '.', '_', '-' (max 64), "
            "starting with a letter or digit"
        )
    if name.lower() in RESERVED_DEVICE_IDS:
        raise InvalidInput(f"{name!r} is reserved: tether/{name}/ is the cloud side's namespace")
    if name.lower().startswith(CLIENT_ID_PREFIX):
        raise InvalidInput(
            f"{name!r} starts with {CLIENT_ID_PREFIX!r}, which the broker keeps for the client "
            "ids clients choose (an identity with it could take over their sessions)"
        )
    if service and name not in SERVICE_IDENTITIES:
        raise InvalidInput(f"service identities are {sorted(SERVICE_IDENTITIES)}, not {name!r}")
    if not service and name.lower() in SERVICE_IDENTITIES:
        raise InvalidInput(f"{name!r} is a service identity (use --service)")
    return name


# ---------------------------------------------------------------------- passwords


def new_password() -> str:
    """A random password: 256 bits, URL-safe (it goes into ``mqtts://user:password@``)."""
    return secrets.token_urlsafe(32)


def password_hash(
    password: str, *, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS
) -> str:
    """The Mosquitto 2 password-file hash: ``$7$<iterations>$<salt b64>$<sha512 b64>``."""
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    """True when ``password`` matches a ``$7$`` hash (what the broker checks)."""
    try:
        _, kind, iterations, salt, digest = encoded.split("$")
        if kind != "7":
            return False
        expected = base64.b64decode(digest)
        actual = hashlib.pbkdf2_hmac(
            "sha512", password.encode(), base64.b64decode(salt), int(iterations)
        )
    except ValueError:
        return False
    return secrets.compare_digest(actual, expected)


def password_line(username: str, password: str) -> str:
    """One line of the broker's password file."""
    return f"{username}:{password_hash(password)}"


def update_password_file(path: Path, line: str) -> None:
    """Put ``line`` into a password file, replacing the same user's line; atomic, mode 0600."""
    username = line.split(":", 1)[0]
    kept: list[str] = []
    if path.exists():
        kept = [
            existing
            for existing in path.read_text().splitlines()
            if existing.split(":", 1)[0] != username
        ]
    _write_private(path, "\n".join([*kept, line]) + "\n")


def _write_private(path: Path, text: str | bytes) -> None:
    """Write a secret file atomically with mode 0600 (never world-readable, even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(text.encode() if isinstance(text, str) else text)
        os.chmod(temp, 0o600)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------- certificates


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass
class FleetCA:
    """The certificate authority that signs the broker's and the devices' certificates."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls, common_name: str = "Tether fleet CA", days: int = 3650) -> FleetCA:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def load(cls, directory: Path) -> FleetCA:
        cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise InvalidInput(f"{directory / CA_KEY} is not an EC private key")
        return cls(cert, key)

    @classmethod
    def load_or_create(cls, directory: Path) -> FleetCA:
        """The CA in ``directory`` (``ca.crt``, ``ca.key``), made there if absent."""
        if (directory / CA_CERT).exists():
            return cls.load(directory)
        ca = cls.create()
        ca.save(directory)
        return ca

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CA_CERT).write_bytes(self.cert_pem)
        _write_private(directory / CA_KEY, _key_pem(self.key))

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(
        self, common_name: str, *, server_hosts: Sequence[str] = (), days: int = 825
    ) -> tuple[bytes, bytes]:
        """A certificate and key (PEM) for a client (``common_name`` is its broker username),
        or, with ``server_hosts``, for a server answering on those names and addresses."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server_hosts else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
        )
        if server_hosts:
            names: list[x509.GeneralName] = []
            for host in server_hosts:
                try:
                    names.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    names.append(x509.DNSName(host))
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


# ---------------------------------------------------------------------- provisioning


@dataclass
class Provisioned:
    """What provisioning made for one identity, and where it put it."""

    identity: str
    password: str = field(repr=False)
    password_line: str
    out_dir: Path
    files: dict[str, Path] = field(default_factory=dict)


def provision(
    identity: str,
    out_dir: Path,
    *,
    broker_url: str = "mqtts://BROKER:8883",
    ca: FleetCA | None = None,
    password_file: Path | None = None,
    service: bool = False,
) -> Provisioned:
    """Make one identity's credentials under ``out_dir`` (see the module docstring)."""
    check_identity(identity, service=service)
    if not broker_url.startswith("mqtts://"):
        raise InvalidInput("devices log in over TLS only: the broker URL must be mqtts://")
    host = broker_url.removeprefix("mqtts://").rstrip("/")
    if "@" in host:
        raise InvalidInput("give the broker URL without credentials; provisioning adds them")
    password = new_password()
    line = password_line(identity, password)
    result = Provisioned(identity, password, line, out_dir)
    url = f"mqtts://{identity}:{password}@{host}"
    env = (
        f"TETHER_MQTT_URL={url}\n"
        if service
        else f"TETHER_DEVICE_ID={identity}\nTETHER_MQTT_URL={url}\n"
    )
    result.files["env"] = out_dir / ("cloud.env" if service else "edge.env")
    _write_private(result.files["env"], env)
    result.files["password_line"] = out_dir / "mosquitto-passwd.line"
    _write_private(result.files["password_line"], line + "\n")
    if ca is not None:
        cert, key = ca.issue(identity)
        result.files["ca"] = out_dir / CA_CERT
        result.files["ca"].write_bytes(ca.cert_pem)
        result.files["cert"] = out_dir / f"{identity}.crt"
        result.files["cert"].write_bytes(cert)
        result.files["key"] = out_dir / f"{identity}.key"
        _write_private(result.files["key"], key)
    if password_file is not None:
        update_password_file(password_file, line)
    return result


@click.command("provision")
@click.argument("device")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Where to write the credentials (default ./provisioned/DEVICE).",
)
@click.option(
    "--broker",
    "broker_url",
    default="mqtts://BROKER:8883",
    show_default=True,
    help="The broker devices reach (mqtts://host:port, no credentials).",
)
@click.option(
    "--ca-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Fleet CA folder (ca.crt, ca.key; made if absent): also issue a client certificate.",
)
@click.option(
    "--password-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="The broker's password file: add or replace this identity's line in it.",
)
@click.option(
    "--service",
    is_flag=True,
    help="Provision a cloud-side identity (cloud-worker, fleet-controller), not a device.",
)
def provision_command(
    device: str,
    out_dir: Path | None,
    broker_url: str,
    ca_dir: Path | None,
    password_file: Path | None,
    service: bool,
) -> None:
    """Create DEVICE's broker credentials and print what to install where."""
    out = out_dir or Path("provisioned") / device
    try:
        ca = FleetCA.load_or_create(ca_dir) if ca_dir is not None else None
        made = provision(
            device,
            out,
            broker_url=broker_url,
            ca=ca,
            password_file=password_file,
            service=service,
        )
    except InvalidInput as exc:
        raise click.ClickException(exc.message) from exc
    click.echo(f"Provisioned {'service' if service else 'device'} {device!r} in {out}/")
    env = made.files["env"]
    click.echo(f"  {env.name:<24} TETHER_MQTT_URL with the password (mode 0600, keep secret)")
    click.echo(f"  {made.files['password_line'].name:<24} the broker's password-file line")
    if "cert" in made.files:
        click.echo(f"  {made.files['cert'].name:<24} client certificate (CN={device})")
        click.echo(f"  {made.files['key'].name:<24} its private key (mode 0600)")
        click.echo(f"  {CA_CERT:<24} the fleet CA that signs the broker and the devices")
    click.echo("")
    click.echo("On the broker:")
    if password_file is not None:
        click.echo(f"  {password_file} now has {device}'s line; reload Mosquitto (SIGHUP).")
    else:
        click.echo("  append this line to the password file, then reload Mosquitto (SIGHUP):")
        click.echo(f"    {made.password_line}")
    target = "the cloud worker or controller" if service else "the device"
    click.echo(f"On {target}:")
    click.echo(f"  install {env.name} as the service's environment file (e.g. /etc/tether/).")
    if "cert" in made.files:
        click.echo(
            f"  the Mosquitto bridge or an MQTT client may log in with {device}.crt/.key "
            "on the certificate listener (8884) instead of the password; there its "
            f"session is bound to the certificate (client id {device})."
        )
    click.echo(
        "  client ids must start with 'tether-' (Tether's own clients do; give your own "
        "tools one too, e.g. mosquitto_sub -i tether-debug-1)."
    )
    click.echo(
        "  trust the fleet CA if it signed the broker's certificate: on a device set "
        "TETHER_MQTT_TLS__CA_FILE=/etc/tether/ca.crt (the [mqtt_tls] ca_file setting); "
        "anywhere, or copy ca.crt to /usr/local/share/ca-certificates/tether-fleet.crt and "
        "run update-ca-certificates (or set SSL_CERT_FILE)."
    )
