"""URLs as they may appear in logs and error messages: without the password they carry.

Provisioning puts a device's broker password into ``TETHER_MQTT_URL``
(``mqtts://cam-17:<password>@broker:8883``), database URLs carry theirs, and an artifact URL
may too. Every log line and message that shows such a URL shows :func:`redact_url` of it.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

#: What stands where a password was.
HIDDEN = "***"


def redact_url(url: str) -> str:
    """``url`` with the password of its user info replaced by ``***``; query strings (which
    may hold signatures or tokens) are dropped. Anything unparseable comes back as
    ``<unreadable URL>`` rather than as itself."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unreadable URL>"
    if "@" not in parts.netloc and not parts.query:
        return url  # nothing secret in it (and rebuilding would alter sqlite:////abs paths)
    netloc = parts.netloc
    userinfo, at, host = netloc.rpartition("@")
    if at:
        user, colon, _password = userinfo.partition(":")
        netloc = f"{user}:{HIDDEN}@{host}" if colon else f"{user}@{host}"
    query = HIDDEN if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))
