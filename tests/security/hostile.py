"""What the hostile-input property suites share: hypothesis settings, JSON strategies and
the decode-or-refuse contract."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from shared.errors import TetherError

MANY = settings(
    max_examples=10_000,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
SOME = settings(
    max_examples=1_000,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


def decodes_or_refuses(call: Any, *args: Any, **kwargs: Any) -> Any:
    """The call's result, or ``None`` when it raised a TetherError (anything else fails)."""
    try:
        return call(*args, **kwargs)
    except TetherError:
        return None


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=24,
)
