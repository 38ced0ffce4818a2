"""Delta download benchmark (run by hand): bytes a device fetches for a version that changes
only the classification head, delta against full artifact.

``python bench/delta.py [--widths 256,1024]``

For each backbone width, the real registry publishes version 1 and version 2 of a
classifier (``harness.onnx_models.headed_classifier``: same backbone, new head) and makes
the ``zstd-patch`` delta at publish; the table gives the full artifact's size, the
delta's, their ratio, and the time to make (cloud) and apply (device) the delta, medians
of 3 runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import onnx

from cloud.artifacts import ArtifactStore
from cloud.fleet_db import FleetDB
from cloud.registry import Registry
from harness.onnx_models import headed_classifier
from shared.delta import apply_delta
from shared.manifest import generate_key

CONFIG = {
    "name": "classifier",
    "max_batch_size": 8,
    "input": [{"name": "x", "datatype": "FP32", "dims": [64]}],
    "output": [{"name": "y", "datatype": "FP32", "dims": [10]}],
}


def once(width: int, tmp: Path) -> dict[str, float]:
    db = FleetDB(f"sqlite:///{tmp}/fleet.db")
    store = ArtifactStore(tmp / "artifacts")
    registry = Registry(db, store, "http://127.0.0.1:8090")
    key = generate_key()
    for version in (1, 2):
        folder = tmp / "repo" / "classifier" / str(version)
        folder.mkdir(parents=True)
        model = headed_classifier(version, width=width, inputs=64, classes=10)
        onnx.save(model, folder / "model.onnx")
        (folder.parent / "config.json").write_text(json.dumps(CONFIG))
    registry.publish(tmp / "repo" / "classifier" / "1", key)
    started = time.perf_counter()
    signed = registry.publish(tmp / "repo" / "classifier" / "2", key)
    publish_s = time.perf_counter() - started
    manifest = signed.manifest
    assert manifest.deltas, "no delta was made"
    delta = manifest.deltas[0]
    base = store.path_of(delta.from_sha256).read_bytes()
    patch = store.path_of(delta.sha256).read_bytes()
    started = time.perf_counter()
    target = apply_delta(base, patch, max_size=manifest.size)
    apply_s = time.perf_counter() - started
    assert target == store.path_of(manifest.sha256).read_bytes()
    db.close()
    return {
        "full": manifest.size,
        "delta": delta.size,
        "publish_s": publish_s,
        "apply_s": apply_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--widths", default="256,1024")
    args = parser.parse_args()
    lines = [
        "| backbone width | full artifact (bytes) | delta (bytes) | delta / full "
        "| publish v2 incl. delta (s) | apply delta (s) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for width in (int(w) for w in args.widths.split(",")):
        runs = []
        for _ in range(3):
            with tempfile.TemporaryDirectory() as tmp:
                runs.append(once(width, Path(tmp)))
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        lines.append(
            f"| {width} | {med['full']:,.0f} | {med['delta']:,.0f} | "
            f"{med['delta'] / med['full']:.2%} | {med['publish_s']:.2f} | {med['apply_s']:.3f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(__file__).parent / "results" / "delta.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
