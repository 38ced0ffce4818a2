"""Binary deltas between two artifacts: the ``zstd-patch`` format of a manifest's ``deltas``.

A delta is the new artifact compressed by zstd with the old artifact as its raw-content
dictionary (zstd's "patch-from" idea: a window that spans both), so what the two share
costs almost nothing. Level 12 is the lowest whose match finder indexes the whole base
(lower levels miss most of a multi-megabyte model; see docs/performance.md). The cloud makes deltas at publish
(:func:`make_delta`); a device that still has the old artifact applies one
(:func:`apply_delta`) and then checks the result against the manifest's sha256, exactly as
it checks a full download; anything wrong and it fetches the full artifact instead.
"""

from __future__ import annotations

import zstandard

from shared.errors import InvalidInput

FORMAT = "zstd-patch"
#: Largest artifact (base or target) a delta is made for: zstd's window must span both.
MAX_ARTIFACT_BYTES = 1 << 30
_LEVEL = 12


def _window_log(base_size: int, target_size: int) -> int:
    span = max(base_size + target_size, 1 << 20)
    return min(max(span.bit_length(), 20), 31)


def make_delta(base: bytes, target: bytes) -> bytes:
    """The ``zstd-patch`` delta that turns ``base`` into ``target``."""
    if len(base) > MAX_ARTIFACT_BYTES or len(target) > MAX_ARTIFACT_BYTES:
        raise InvalidInput("artifacts over 1 GiB get no delta")
    params = zstandard.ZstdCompressionParameters.from_level(
        _LEVEL,
        source_size=len(target),
        window_log=_window_log(len(base), len(target)),
    )
    dictionary = zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    compressor = zstandard.ZstdCompressor(compression_params=params, dict_data=dictionary)
    return compressor.compress(target)


def apply_delta(base: bytes, delta: bytes, *, max_size: int) -> bytes:
    """``target`` from ``base`` and its delta; at most ``max_size`` bytes (the manifest's
    size), else :class:`InvalidInput` (as for a delta that is not one)."""
    dictionary = zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    decompressor = zstandard.ZstdDecompressor(
        dict_data=dictionary, max_window_size=1 << _window_log(len(base), max_size)
    )
    try:
        target = decompressor.decompress(delta, max_output_size=max_size)
    except zstandard.ZstdError as exc:
        raise InvalidInput(f"delta does not apply: {exc}") from None
    if len(target) > max_size:
        raise InvalidInput(f"delta yields {len(target)} bytes, more than {max_size}")
    return target
