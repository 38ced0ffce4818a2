"""The artifact store and its HTTP server: model artifacts, addressed by their sha256.

An artifact is one model version packed as a deterministic, uncompressed tar
(:func:`pack_version`): ``config.json`` of the model, then ``<version>/...`` (every file of
the version folder), sorted, with zeroed times and owners, so the same folder always packs
to the same bytes and the same sha256. Devices fetch ``GET /artifacts/<sha256>``; Range
requests (206, ``Content-Range``, 416) let an interrupted download resume, ``HEAD`` gives
the size, and the ETag is the sha256.

For production, run the app under gunicorn:
``gunicorn -w 4 'cloud.artifacts:create_app("/var/lib/tether/artifacts")'``; ``tether fleet
serve`` runs it in a threaded WSGI server (:class:`ArtifactServer`).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from flask import Flask, Response, abort, send_file
from prometheus_client import CONTENT_TYPE_LATEST
from werkzeug.serving import BaseWSGIServer, make_server

from shared.errors import InvalidInput

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def pack_version(version_dir: Path) -> tuple[bytes, dict[str, str]]:
    """Pack ``<model>/<version>/`` and ``<model>/config.json`` into a deterministic tar.

    Returns the tar bytes and ``{path in tar: sha256}`` for the manifest's ``files``.
    """
    version_dir = Path(version_dir)
    if not version_dir.is_dir():
        raise InvalidInput(f"{version_dir} is not a model version folder")
    members: list[tuple[str, Path]] = []
    config = version_dir.parent / "config.json"
    if config.is_file():
        members.append(("config.json", config))
    for path in sorted(p for p in version_dir.rglob("*") if p.is_file()):
        members.append((f"{version_dir.name}/{path.relative_to(version_dir).as_posix()}", path))
    if not any(name != "config.json" for name, _ in members):
        raise InvalidInput(f"{version_dir} holds no files")
    buffer = io.BytesIO()
    files: dict[str, str] = {}
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, path in members:
            data = path.read_bytes()
            files[name] = hashlib.sha256(data).hexdigest()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue(), files


class ArtifactStore:
    """A folder of content-addressed files: ``<root>/<sha[:2]>/<sha>``."""

    def __init__(self, root: Path) -> None:
        # Absolute: Flask's send_file reads a relative path against the app's folder.
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def path_of(self, sha256: str) -> Path:
        if not _SHA256.match(sha256):
            raise InvalidInput(f"{sha256!r} is not a hex sha256")
        return self.root / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        return self.path_of(sha256).is_file()

    def put_bytes(self, data: bytes) -> str:
        """Store ``data`` (atomically; a no-op when already there) and return its sha256."""
        sha = hashlib.sha256(data).hexdigest()
        target = self.path_of(sha)
        if target.is_file():
            return sha
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return sha


def create_app(
    store: ArtifactStore | Path | str, metrics: Callable[[], bytes] | None = None
) -> Flask:
    """The artifact HTTP app: ``GET``/``HEAD /artifacts/<sha256>`` with Range support, and
    ``/metrics`` when ``metrics`` renders them."""
    if not isinstance(store, ArtifactStore):
        store = ArtifactStore(Path(store))
    app = Flask(__name__)

    @app.get("/artifacts/<sha256>")
    def artifact(sha256: str) -> Response:  # HEAD is served by the GET route
        if not _SHA256.match(sha256):
            abort(404)
        path = store.path_of(sha256)
        if not path.is_file():
            abort(404)
        response = send_file(
            path,
            mimetype="application/x-tar",
            conditional=True,
            etag=sha256,
            max_age=31536000,  # content-addressed: never changes
        )
        response.headers["Accept-Ranges"] = "bytes"
        return response

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    if metrics is not None:

        @app.get("/metrics")
        def prometheus() -> Response:
            return Response(metrics(), content_type=CONTENT_TYPE_LATEST)

    return app


class ArtifactServer:
    """The artifact app in a threaded WSGI server on a background thread."""

    def __init__(
        self,
        store: ArtifactStore,
        host: str = "127.0.0.1",
        port: int = 0,
        metrics: Callable[[], bytes] | None = None,
    ) -> None:
        self._server: BaseWSGIServer = make_server(
            host, port, create_app(store, metrics), threaded=True, passthrough_errors=False
        )
        self.host = host
        self.port = int(self._server.server_port)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="artifact-server", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ArtifactServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
