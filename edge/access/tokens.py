"""API tokens: the one entry syntax every token source uses, their scopes, and the rules
every token obeys (docs/security.md, "Tokens and scopes").

A token entry is the token, then optionally its scopes, separated by whitespace::

    ops-token-0123456789abcdef                  the default scopes (http.auth.default_scopes)
    tenant-a-token-0123456789 infer             inference, metadata and model health only
    deploy-token-0123456789ab admin             repository load/unload/index and metrics only
    both-token-0123456789abcd infer admin

The same syntax holds in each source: an item of ``http.auth.tokens``, a comma-separated
item of ``TETHER_API_TOKENS``, a line of ``http.auth.tokens_file``. In the file a ``#`` at
the start of a line or after whitespace begins a comment; inside a token it is part of it.

Every token, whatever its source: at least :data:`MIN_TOKEN_LENGTH` characters of visible
ASCII (no spaces, no control characters), not starting with ``#``. Error messages name an
entry by its position, never by its text, so a token cannot leak into a log.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal, get_args

#: What a token may do. ``infer``: inference, model metadata, model readiness, server
#: metadata. ``admin``: the model repository (index, load, unload) and ``/metrics``.
Scope = Literal["infer", "admin"]
INFER: Final[Scope] = "infer"
ADMIN: Final[Scope] = "admin"
SCOPES: Final[tuple[Scope, ...]] = get_args(Scope)
#: The scopes of an entry that names none (``http.auth.default_scopes``' default): every
#: scope, so configurations written before scopes existed keep working unchanged.
DEFAULT_SCOPES: Final[tuple[Scope, ...]] = SCOPES

#: Shortest bearer token accepted: a token is a secret, not a password to remember.
MIN_TOKEN_LENGTH: Final = 16

_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]+")
_COMMENT = re.compile(r"(?:^|\s)#.*$")


class TokenSyntaxError(ValueError):
    """A token entry breaks the rules; the message never contains the entry's text."""


@dataclass(frozen=True)
class TokenEntry:
    """One accepted token and the scopes it was given (``None``: the default scopes)."""

    token: str = field(repr=False)
    scopes: frozenset[Scope] | None = None

    def granted(self, default: Iterable[Scope]) -> frozenset[Scope]:
        """The scopes this token has, given the configured default."""
        return self.scopes if self.scopes is not None else frozenset(default)


def parse_entry(text: str) -> TokenEntry:
    """One entry (``TOKEN [SCOPE ...]``) -> :class:`TokenEntry`; :class:`TokenSyntaxError`
    if the token is too short or has characters a token may not have, or a scope is unknown.
    """
    words = text.split()
    if not words:
        raise TokenSyntaxError("empty token entry")
    token, scope_words = words[0], words[1:]
    check_token(token)
    if not scope_words:
        return TokenEntry(token)
    scopes: set[Scope] = set()
    for word in scope_words:
        for name in filter(None, word.lower().split(",")):
            if name not in SCOPES:
                # a scope word is not a secret, but it could be half a token that held a space
                raise TokenSyntaxError(
                    f"unknown scope (after the token; scopes are {', '.join(SCOPES)}; a token "
                    "may not contain spaces)"
                )
            scopes.add(name)
    return TokenEntry(token, frozenset(scopes))


def check_token(token: str) -> None:
    """Raise :class:`TokenSyntaxError` unless ``token`` obeys the rules every source shares."""
    if len(token) < MIN_TOKEN_LENGTH:
        raise TokenSyntaxError(f"token shorter than {MIN_TOKEN_LENGTH} characters")
    if not _VISIBLE_ASCII.fullmatch(token):
        raise TokenSyntaxError("token has characters other than visible ASCII")
    if token.startswith("#"):
        raise TokenSyntaxError("token starts with '#' (a comment in a tokens file)")


def parse_entries(texts: Iterable[str], source: str) -> list[TokenEntry]:
    """Every entry of one source, or :class:`TokenSyntaxError` naming the first bad one by
    its position (``source #2``)."""
    entries = []
    for index, text in enumerate(texts):
        try:
            entries.append(parse_entry(text))
        except TokenSyntaxError as exc:
            raise TokenSyntaxError(f"{source} #{index}: {exc}") from None
    return entries


def parse_tokens_text(text: str) -> tuple[list[TokenEntry], list[str]]:
    """A tokens file's text -> its valid entries, and one problem per invalid line
    (``line 3: token shorter than 16 characters``)."""
    entries: list[TokenEntry] = []
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        content = _COMMENT.sub("", line).strip()
        if not content:
            continue
        try:
            entries.append(parse_entry(content))
        except TokenSyntaxError as exc:
            problems.append(f"line {number}: {exc}")
    return entries, problems


def read_tokens_file(path: Path) -> tuple[list[TokenEntry], list[str]]:
    """A tokens file's valid entries and its invalid lines' problems (OSError if unreadable)."""
    return parse_tokens_text(path.read_text(encoding="utf-8", errors="replace"))


def token_with_scope(
    entries: Iterable[TokenEntry], scope: Scope, default: Iterable[Scope]
) -> str | None:
    """The first token granted ``scope``, or ``None`` (for the agent's own calls to its API)."""
    default = frozenset(default)
    for entry in entries:
        if scope in entry.granted(default):
            return entry.token
    return None
