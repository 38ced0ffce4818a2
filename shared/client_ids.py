"""MQTT client ids: which sessions a client can reach on the fleet broker.

A client id names a session, and a client that connects with an id already in use takes
that session over: the broker disconnects the other client (sending its last will). A
device that knew another device's ids could keep knocking it offline. So:

* every id a client sends starts with :data:`CLIENT_ID_PREFIX`, and no broker identity does
  (``cloud.provision`` refuses such names). The shipped broker enforces the prefix
  (``clientid_prefixes`` in deploy/mosquitto/secure.conf) and, on its certificate listener,
  replaces a client's id with its certificate's name (``use_username_as_clientid``): the
  ids clients choose and the ids the broker binds to identities never meet, so nobody
  can take over a certificate session such as a device's Mosquitto bridge;
* the ids Tether's clients choose cannot be guessed: :func:`random_client_id` for a
  connection without a session to keep, and, for one whose session must survive a restart,
  a secret of the device (``edge.session_ids``).
"""

from __future__ import annotations

import secrets

#: The start of every client id a client chooses (never of a broker identity).
CLIENT_ID_PREFIX = "tether-"


def client_id(*parts: str) -> str:
    """``tether-<part>-<part>...``."""
    return CLIENT_ID_PREFIX + "-".join(parts)


def random_client_id(*parts: str) -> str:
    """``tether-<parts>-<16 random hex digits>``: unique, and unguessable by others."""
    return client_id(*parts, secrets.token_hex(8))
