"""The one table between Open Inference Protocol datatypes and numpy dtypes.

Every codec (JSON, binary, MQTT envelopes) and every runtime converts through this table,
so a datatype means the same thing everywhere.
"""

from __future__ import annotations

from typing import Final

import numpy as np

from shared.errors import InvalidInput

#: V2 datatype name -> numpy dtype. ``BYTES`` maps to ``object`` (an array of ``bytes``).
V2_TO_NUMPY: Final[dict[str, np.dtype]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}

NUMPY_TO_V2: Final[dict[np.dtype, str]] = {
    dtype: name for name, dtype in V2_TO_NUMPY.items() if name != "BYTES"
}

#: ONNX tensor element type strings, as ONNX Runtime reports them, -> V2 datatype.
ONNX_TO_V2: Final[dict[str, str]] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

FLOAT_DATATYPES: Final[frozenset[str]] = frozenset({"FP16", "FP32", "FP64"})


def to_numpy_dtype(datatype: str) -> np.dtype:
    """The numpy dtype for a V2 datatype name; :class:`InvalidInput` if unknown."""
    try:
        return V2_TO_NUMPY[datatype]
    except KeyError:
        known = ", ".join(V2_TO_NUMPY)
        raise InvalidInput(f"unknown datatype {datatype!r}; expected one of {known}") from None


def from_numpy_dtype(dtype: np.dtype) -> str:
    """The V2 datatype name for a numpy dtype (``object``/``bytes``/``str`` -> ``BYTES``)."""
    if dtype.kind in ("O", "S", "U"):
        return "BYTES"
    try:
        return NUMPY_TO_V2[np.dtype(dtype)]
    except KeyError:
        raise InvalidInput(f"numpy dtype {dtype} has no Open Inference Protocol datatype") from None


def element_size(datatype: str) -> int:
    """Bytes per element of a fixed-size datatype (``BYTES`` is variable: raises)."""
    if datatype == "BYTES":
        raise InvalidInput("BYTES has no fixed element size")
    return to_numpy_dtype(datatype).itemsize
