"""Bearer-token authentication, token scopes and rate limiting of the Flask app: the glue
between Flask and the transport-neutral :class:`~edge.access.guard.Guard`.

:func:`install_security` hooks one ``before_request`` check into an app. Unknown paths are
guarded too, so an anonymous caller learns nothing about what exists; a route nobody
marked with :func:`requires` needs ``admin``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from flask import Flask, request

from edge.access.guard import Guard
from edge.access.tokens import ADMIN, Scope

GUARD_KEY = "tether.guard"
#: The attribute :func:`requires` sets on a view function.
_SCOPE_ATTRIBUTE = "tether_scope"

View = TypeVar("View", bound=Callable[..., Any])


def requires(scope: Scope) -> Callable[[View], View]:
    """Mark a Flask view as needing a token with ``scope`` (put it under the route
    decorator). A view left unmarked needs ``admin``: a new route is closed until someone
    says who may call it."""

    def mark(view: View) -> View:
        setattr(view, _SCOPE_ATTRIBUTE, scope)
        return view

    return mark


def required_scope(app: Flask, endpoint: str | None) -> Scope | None:
    """The scope ``endpoint`` needs; ``None`` when no route matched (any valid token then
    gets its 404, an anonymous caller its 401)."""
    if endpoint is None:
        return None
    view = app.view_functions.get(endpoint)
    scope: Scope = getattr(view, _SCOPE_ATTRIBUTE, ADMIN)
    return scope


def endpoint_name(endpoint: str | None) -> str | None:
    """``v2.infer`` -> ``infer`` (the operationId); ``None`` when no route matched."""
    return endpoint.rsplit(".", 1)[-1] if endpoint else None


def install_security(app: Flask, guard: Guard) -> None:
    """Guard every request of ``app`` with ``guard``'s tokens and rate limits."""
    app.extensions[GUARD_KEY] = guard
    if not guard.active:
        return

    @app.before_request
    def check() -> None:
        endpoint = request.endpoint
        guard.check(
            endpoint_name(endpoint),
            required_scope(app, endpoint),
            request.headers.get("Authorization"),
            request.remote_addr,
        )
