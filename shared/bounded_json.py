"""Bounds on JSON that other parties send: size before decoding, depth and nodes after.

orjson refuses more than 1,024 levels of nesting, but Python's own ``json.dumps``, pydantic
and every recursive walk give up near 1,000, so a message that orjson accepts can still
raise ``RecursionError`` wherever it is re-encoded or stored. Messages from devices are
therefore checked here first, with limits far below any recursion limit and far above
anything a real device sends. The walk is iterative: checking never recurses itself.
"""

from __future__ import annotations

from typing import Any, Final

import orjson

from shared.errors import InvalidInput

#: The largest device report (status or rollout event) read, in bytes.
MAX_REPORT_BYTES: Final = 64 * 1024
#: The deepest nesting of a device report, counting the message object itself.
MAX_REPORT_DEPTH: Final = 16
#: The most values (objects, arrays and scalars together) one device report may hold.
MAX_REPORT_NODES: Final = 10_000


def check_shape(value: Any, *, max_depth: int, max_nodes: int, what: str) -> None:
    """:class:`InvalidInput` when ``value`` (decoded JSON) nests deeper than ``max_depth``
    (a scalar is depth 0, ``{}`` or ``[]`` depth 1) or holds more than ``max_nodes``."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    nodes = 0
    while stack:
        item, depth = stack.pop()
        nodes += 1
        if nodes > max_nodes:
            raise InvalidInput(f"{what} holds more than {max_nodes} values")
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        if depth + 1 > max_depth:
            raise InvalidInput(f"{what} is nested more than {max_depth} levels deep")
        stack.extend((child, depth + 1) for child in children)


def load_bounded(
    raw: bytes | str,
    *,
    what: str,
    max_bytes: int = MAX_REPORT_BYTES,
    max_depth: int = MAX_REPORT_DEPTH,
    max_nodes: int = MAX_REPORT_NODES,
) -> Any:
    """Decode JSON of at most ``max_bytes``, nested at most ``max_depth`` levels, with at
    most ``max_nodes`` values; anything else is :class:`InvalidInput` naming ``what``."""
    size = len(raw.encode() if isinstance(raw, str) else raw)
    if size > max_bytes:
        raise InvalidInput(f"{what} of {size} bytes is over the limit of {max_bytes}")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"malformed JSON: {exc}") from None
    check_shape(data, max_depth=max_depth, max_nodes=max_nodes, what=what)
    return data


def truncate(text: str, max_chars: int) -> str:
    """``text`` cut to at most ``max_chars`` characters, marked with '…' when cut."""
    if len(text) <= max_chars:
        return text
    return text[: max_chars - 1] + "…"
