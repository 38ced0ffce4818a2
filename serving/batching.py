"""Requests stacked along the batch dimension, and a batched run's outputs split back.

The one place that counts a request's rows, stacks requests into one run and cuts the
run's outputs into each request's part: the data plane's batch entry
(:meth:`serving.dataplane.DataPlane.infer_batch`), the sensor bridge's micro-batches, the
router's accounting and the bridge's corrections all use it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from shared.codec import DecodedRequest
from shared.errors import InvalidInput


def rows_of_shape(shape: Sequence[int]) -> int:
    """The rows of a tensor of ``shape``: its first dimension (1 for a scalar)."""
    return int(shape[0]) if len(shape) else 1


def batch_rows(inputs: Mapping[str, np.ndarray]) -> int:
    """The rows of a request: its first input's first dimension (1 for a scalar or none)."""
    for array in inputs.values():
        return rows_of_shape(array.shape)
    return 1


def stack_requests(requests: Sequence[DecodedRequest]) -> DecodedRequest:
    """One request whose inputs are ``requests``' inputs stacked along the batch dimension
    (inputs and datatypes only: which outputs to compute is the caller's to say).

    Raises :class:`InvalidInput` when they differ in input names, datatypes or the shape
    past the batch dimension (the caller then runs them one by one).
    """
    first = requests[0]
    names = list(first.inputs)
    for other in requests[1:]:
        if list(other.inputs) != names or other.datatypes != first.datatypes:
            raise InvalidInput("requests of one batch differ in inputs or datatypes")
    try:
        inputs = {name: np.concatenate([r.inputs[name] for r in requests]) for name in names}
    except ValueError as exc:
        raise InvalidInput(f"requests of one batch differ in shape: {exc}") from None
    return DecodedRequest(inputs=inputs, datatypes=dict(first.datatypes))


def batch_major(outputs: Mapping[str, np.ndarray], rows: int) -> bool:
    """Whether every output has the batch's ``rows`` along its first dimension."""
    return all(a.ndim > 0 and a.shape[0] == rows for a in outputs.values())


def split_outputs(
    outputs: Mapping[str, np.ndarray], counts: Sequence[int]
) -> list[dict[str, np.ndarray]]:
    """A stacked run's (batch-major) outputs cut into consecutive parts of ``counts`` rows."""
    bounds = np.cumsum([0, *counts])
    return [
        {name: array[bounds[i] : bounds[i + 1]] for name, array in outputs.items()}
        for i in range(len(counts))
    ]
