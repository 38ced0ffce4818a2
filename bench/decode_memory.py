"""Request decoding memory benchmark (run by hand, not in CI): ``python bench/decode_memory.py``.

For requests the model accepts, the peak memory that decoding one takes (``tracemalloc``:
Python objects and numpy arrays) divided by the body's size, and the time it takes
(untraced, median of ``--runs``). Two decoders in the same run:

* **parsed whole** — the JSON parsed into Python objects first, then turned into arrays:
  how every HTTP request was decoded before the codec checked the model first (MQTT
  envelopes, whose JSON is parsed with the envelope, still take this path);
* **checked first** — :func:`shared.codec.decode_request` with the model: the declared
  inputs checked against the model, then numeric text parsed straight into the array in
  1 MiB pieces, binary tensors viewed in place.

Writes a Markdown table to stdout and ``bench/results/decode_memory.md``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared.codec import decode_request, decode_request_parts, encode_request, split_body  # noqa: E402
from shared.protocol import InferenceRequest  # noqa: E402


@dataclass(frozen=True)
class Spec:
    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Model:
    name: str
    inputs: tuple[Spec, ...]
    max_batch_size: int = 0


@dataclass(frozen=True)
class Case:
    label: str
    model: Model
    body: bytes
    header_length: int | None


def cases(megabytes: int) -> list[Case]:
    """Bodies of about ``megabytes`` MiB that their model accepts."""
    rng = np.random.default_rng(0)
    rows = megabytes * 1024 * 1024 // (64 * 12)
    digits = Model("digits", (Spec("pixels", "FP32", (-1, 64)),))
    pixels = rng.random((rows, 64), dtype=np.float32)
    image = Model("image", (Spec("image", "FP32", (1, 3, 224, 224)),))
    picture = rng.random((1, 3, 224, 224), dtype=np.float32)
    texts = Model("texts", (Spec("text", "BYTES", (-1,)),))
    sentences = np.array(
        [f"sensor reading {i:08d} is fine".encode() for i in range(megabytes * 1024 * 1024 // 36)],
        dtype=object,
    )

    def json_body(name: str, datatype: str, data: np.ndarray, shape: tuple[int, ...]) -> bytes:
        return orjson.dumps(
            {"inputs": [{"name": name, "datatype": datatype, "shape": list(shape), "data": data}]},
            option=orjson.OPT_SERIALIZE_NUMPY,
        )

    out = [
        Case(
            f"JSON FP32 [{rows}, 64], flat",
            digits,
            json_body("pixels", "FP32", pixels.ravel(), pixels.shape),
            None,
        ),
        Case(
            f"JSON FP32 [{rows}, 64], nested",
            digits,
            json_body("pixels", "FP32", pixels, pixels.shape),
            None,
        ),
        Case(
            "JSON FP32 [1, 3, 224, 224], flat",
            image,
            json_body("image", "FP32", picture.ravel(), picture.shape),
            None,
        ),
        Case(
            f"JSON BYTES [{len(sentences)}] (28-byte strings)",
            texts,
            orjson.dumps(
                {
                    "inputs": [
                        {
                            "name": "text",
                            "datatype": "BYTES",
                            "shape": [len(sentences)],
                            "data": [s.decode() for s in sentences],
                        }
                    ]
                }
            ),
            None,
        ),
    ]
    for label, model, name, datatype, array in (
        (f"binary FP32 [{rows}, 64]", digits, "pixels", "FP32", pixels),
        ("binary FP32 [1, 3, 224, 224]", image, "image", "FP32", picture),
        (f"binary BYTES [{len(sentences)}] (28-byte strings)", texts, "text", "BYTES", sentences),
    ):
        body, length = encode_request({name: array}, {name: datatype})
        out.append(Case(label, model, body, length))
    return out


def parsed_whole(case: Case) -> object:
    """The decoder before the model was asked first: parse everything, then build arrays."""
    header, tail = split_body(case.body, case.header_length)
    return decode_request_parts(InferenceRequest.parse(bytes(header)), tail)


def checked_first(case: Case) -> object:
    return decode_request(case.body, case.header_length, None, case.model)


def peak_ratio(call: Callable[[Case], object], case: Case) -> float:
    gc.collect()
    tracemalloc.start()
    try:
        call(case)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak / len(case.body)


def median_ms(call: Callable[[Case], object], case: Case, runs: int) -> float:
    times = []
    for _ in range(runs):
        gc.collect()
        started = time.perf_counter()
        call(case)
        times.append((time.perf_counter() - started) * 1000.0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--megabytes", type=int, default=32, help="size of the large bodies")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    lines = [
        f"Peak memory of decoding one request / its body size (tracemalloc), and median time "
        f"of {args.runs} runs. Bodies of about {args.megabytes} MiB unless the shape says.",
        "",
        "| request the model accepts | body MB | parsed whole: peak / body | checked first: "
        "peak / body | parsed whole ms | checked first ms |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for case in cases(args.megabytes):
        before = peak_ratio(parsed_whole, case)
        after = peak_ratio(checked_first, case)
        before_ms = median_ms(parsed_whole, case, args.runs)
        after_ms = median_ms(checked_first, case, args.runs)
        lines.append(
            f"| {case.label} | {len(case.body) / 1e6:.1f} | {before:.2f}x | {after:.2f}x "
            f"| {before_ms:,.0f} | {after_ms:,.0f} |"
        )
        print(lines[-1], flush=True)
    report = "\n".join(lines)
    print()
    print(report)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "decode_memory.md").write_text(report + "\n")


if __name__ == "__main__":
    main()
