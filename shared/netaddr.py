"""Host names in addresses: the one place that knows an IPv6 literal needs brackets."""

from __future__ import annotations


def bracket(host: str) -> str:
    """An IPv6 literal in brackets, as it goes into a bind address or URL (``::1`` ->
    ``[::1]``); names, IPv4 addresses and already bracketed literals are left as they are."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
