"""Request ids that follow a request across processes, and structured (JSON) logs.

The edge takes a request id from the ``X-Request-Id`` header (or makes one), keeps it in a
context variable while the request runs, sends it to the cloud as the envelope's
``trace_id``, and the cloud worker binds the same id while it serves the request. Every log
record carries the id of the request it was written for, so one id finds a request in the
edge's and the cloud's logs.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from pythonjsonlogger.json import JsonFormatter

_request_id: ContextVar[str | None] = ContextVar("tether_request_id", default=None)
_VALID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(process)d %(message)s"


_prefix = uuid.uuid4().hex[:12]
_counter = itertools.count(1)


def _reseed() -> None:
    """A forked worker gets a prefix of its own, so ids stay unique across processes."""
    global _prefix, _counter
    _prefix = uuid.uuid4().hex[:12]
    _counter = itertools.count(1)


os.register_at_fork(after_in_child=_reseed)


def new_request_id() -> str:
    """A process-unique id, cheap enough for every request (random prefix + counter)."""
    return f"{_prefix}-{next(_counter):x}"


def clean_request_id(value: str | None) -> str:
    """A caller's id when it is a sane token, else a fresh one (ids end up in logs)."""
    if value and _VALID.match(value):
        return value
    return new_request_id()


def current_request_id() -> str | None:
    """The id of the request this code runs for, if any."""
    return _request_id.get()


@contextmanager
def bound_request_id(request_id: str | None) -> Iterator[None]:
    """Run a block on behalf of ``request_id``."""
    token = _request_id.set(request_id)
    try:
        yield
    finally:
        _request_id.reset(token)


def set_request_id(request_id: str | None) -> None:
    """Make ``request_id`` the current thread's id until the next request sets its own."""
    _request_id.set(request_id)


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` (or ``-``) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = _request_id.get() or "-"
        return True


#: The logging configuration handed to granian (edge API, artifact server): its own records
#: go to the root logger, so they come out in Tether's format.
GRANIAN_LOGGING: dict[str, Any] = {
    "formatters": {},
    "handlers": {},
    "loggers": {
        name: {"handlers": [], "propagate": True} for name in ("_granian", "granian.access")
    },
}


def json_formatter() -> logging.Formatter:
    return JsonFormatter(
        JSON_FIELDS,
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        timestamp=False,
    )


def configure_logging(level: str = "INFO", fmt: str = "auto") -> None:
    """Log to stderr as JSON lines (``fmt="json"``) or text; ``auto`` is text on a terminal."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(json_formatter() if use_json else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
