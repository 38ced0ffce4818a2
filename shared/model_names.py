"""What a model name may be: one folder of a model repository and one MQTT topic segment.

A name comes from outside in many ways (rollout orders, the repository load route, the
control file the server's workers share, manifests) and ends up as ``<repository>/<name>``
on disk and as a segment of ``tether/cloud/infer/<device>/<name>``. So it is checked once,
here, wherever it enters: letters, digits, ``_``, ``.`` and ``-``, at most 128 characters,
starting with a letter or digit. That rules out ``..``, ``.staging-*`` (the fleet agent's
scratch folders), absolute paths, separators and MQTT wildcards.
"""

from __future__ import annotations

import re

from shared.errors import InvalidInput

#: The pattern every model name matches (also in the JSON Schemas of orders and manifests).
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
_MODEL_NAME = re.compile(MODEL_NAME_PATTERN)


def is_model_name(name: object) -> bool:
    """Whether ``name`` is a valid model name."""
    return isinstance(name, str) and _MODEL_NAME.fullmatch(name) is not None


def check_model_name(name: object) -> str:
    """``name`` when it is a valid model name, else :class:`InvalidInput` saying why."""
    if not is_model_name(name):
        shown = repr(name)[:80]
        raise InvalidInput(
            f"invalid model name {shown}: letters, digits, '_', '.', '-' (at most 128), "
            "starting with a letter or digit"
        )
    assert isinstance(name, str)
    return name
