"""The route modes: the one list of how a model name may be served (docs/routing.md).

Settings validation (:class:`edge.settings.RouteSettings`), whether the agent needs an
uplink (:func:`edge.settings.needs_uplink`) and the routers (:mod:`edge.router` for V2
inference, :mod:`edge.text_router` for chat and embeddings) all read this registry; a new
mode is added here and given its route class in :data:`edge.router.ROUTE_CLASSES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

#: The mode names, as the settings' ``routes.<name>.mode`` takes them.
RouteModeName = Literal["local", "cloud", "cascade", "local-first", "cloud-first"]


@dataclass(frozen=True)
class RouteMode:
    """One way of serving a model name."""

    name: RouteModeName
    #: Whether the mode may send a request to the cloud (the agent then needs an uplink).
    needs_cloud: bool
    #: Whether the device must hold a local model for it.
    needs_local: bool
    summary: str


ROUTE_MODES: dict[str, RouteMode] = {
    mode.name: mode
    for mode in (
        RouteMode("local", False, True, "the device's model answers"),
        RouteMode("cloud", True, False, "the cloud's model answers, over the uplink"),
        RouteMode(
            "cascade", True, True, "the device answers; rows it is unsure of go to the cloud"
        ),
        RouteMode(
            "local-first", True, True, "the device; the cloud when it fails or is over its queue"
        ),
        RouteMode(
            "cloud-first", True, True, "the cloud; the device (degraded) when the cloud is away"
        ),
    )
}

assert set(ROUTE_MODES) == set(get_args(RouteModeName)), "every mode name has one entry"


def needs_cloud(mode: str) -> bool:
    """Whether routes of ``mode`` may ask the cloud."""
    return ROUTE_MODES[mode].needs_cloud
