"""What the hostile-input property suites share: hypothesis settings, JSON strategies and
the decode-or-refuse contract."""

from __future__ import annotations

import math
import random
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


def random_json(rng: random.Random, depth: int = 0) -> Any:
    """A JSON value like hypothesis's ``json_values``: scalars (huge integers, NaN and
    infinities too) nested up to three levels in short lists and objects."""
    kind = rng.randrange(7 if depth < 3 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([rng.randint(-(2**70), 2**70), rng.randint(-9, 9)])
    if kind == 3:
        return rng.choice([rng.uniform(-1e9, 1e9), math.nan, math.inf, -math.inf, -0.0])
    if kind == 4:
        return "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randrange(9)))
    if kind == 5:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(7))]
    return {str(rng.randrange(99)): random_json(rng, depth + 1) for _ in range(rng.randrange(5))}
