"""A model's input signature, and the one check of a request's tensors against it.

The codec runs the check on the *declared* names, datatypes and shapes of a request,
before it turns any tensor data into arrays, so a request the model cannot take costs
nothing to refuse; the data plane runs it again on the decoded arrays. Both say the
same thing in the same words.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from shared.errors import InvalidInput


class InputSpec(Protocol):
    """One model input as clients see it (``-1`` marks a dynamic dimension)."""

    @property
    def name(self) -> str: ...

    @property
    def datatype(self) -> str: ...

    @property
    def shape(self) -> Sequence[int]: ...


class ModelSignature(Protocol):
    """What a model takes: its name, inputs and ``max_batch_size`` (0: not batched)."""

    @property
    def name(self) -> str: ...

    @property
    def inputs(self) -> Sequence[InputSpec]: ...

    @property
    def max_batch_size(self) -> int: ...


def takes_bytes(model: ModelSignature) -> bool:
    """True when some input of ``model`` is ``BYTES`` (strings may then travel as data)."""
    return any(spec.datatype == "BYTES" for spec in model.inputs)


def check_inputs(
    model: ModelSignature, datatypes: Mapping[str, str], shapes: Mapping[str, Sequence[int]]
) -> None:
    """Check input names, datatypes, shapes and batch size against ``model``; raises
    :class:`InvalidInput` naming the first mismatch. ``datatypes`` and ``shapes`` are keyed by
    input name (what a request declared, or the arrays it decoded to)."""
    specs = model.inputs
    if len(shapes) != len(specs) or any(spec.name not in shapes for spec in specs):
        expected = ", ".join(spec.name for spec in specs)
        given = ", ".join(shapes) or "none"
        raise InvalidInput(
            f"model {model.name!r} takes inputs [{expected}], request gave [{given}]"
        )
    for spec in specs:
        datatype = datatypes.get(spec.name)
        if datatype != spec.datatype:
            raise InvalidInput(
                f"input {spec.name!r} of model {model.name!r} must be {spec.datatype}, "
                f"got {datatype}"
            )
        _check_shape(model, spec, shapes[spec.name])


def _check_shape(model: ModelSignature, spec: InputSpec, shape: Sequence[int]) -> None:
    expected = spec.shape
    ok = len(shape) == len(expected) and all(
        want < 0 or want == got
        for want, got in zip(expected, shape)  # noqa: B905 - lengths checked first
    )
    if not ok:
        raise InvalidInput(
            f"input {spec.name!r} of model {model.name!r} must have shape "
            f"{list(expected)}, got {list(shape)}"
        )
    if model.max_batch_size and shape and shape[0] > model.max_batch_size:
        raise InvalidInput(
            f"batch of {shape[0]} is over model {model.name!r}'s max_batch_size "
            f"{model.max_batch_size}"
        )
    if shape and shape[0] == 0:
        raise InvalidInput(f"input {spec.name!r} has an empty batch")
