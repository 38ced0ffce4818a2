"""Generates the Python modules of ``grpc_predict_v2.proto`` (``make proto``; build time only).

``grpc_tools.protoc`` writes the message, type-stub and service modules; the message module
is then pointed at a descriptor pool of its own instead of protobuf's default one, so the
agent can share a process with a client library (``tritonclient.grpc``) that registers the
same ``inference.*`` names from its own ``.proto`` without a duplicate-symbol clash.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
PROTO = "edge/grpc/grpc_predict_v2.proto"
_DEFAULT_POOL = "_descriptor_pool.Default()"
_OWN_POOL = "_descriptor_pool.DescriptorPool()"


def generate(out: Path) -> None:
    """Write ``grpc_predict_v2_pb2{.py,.pyi,_grpc.py}`` into ``out``."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        status = protoc.main(
            ["protoc", f"-I{ROOT}", f"--python_out={tmp}", f"--pyi_out={tmp}",
             f"--grpc_python_out={tmp}", str(ROOT / PROTO)]
        )  # fmt: skip
        if status != 0:
            raise SystemExit(f"protoc failed with status {status}")
        generated = Path(tmp) / "edge" / "grpc"
        messages = generated / "grpc_predict_v2_pb2.py"
        text = messages.read_text()
        if text.count(_DEFAULT_POOL) != 1:
            raise SystemExit(f"protoc output changed: expected one {_DEFAULT_POOL}")
        messages.write_text(text.replace(_DEFAULT_POOL, _OWN_POOL))
        out.mkdir(parents=True, exist_ok=True)
        for path in generated.glob("grpc_predict_v2_pb2*"):
            shutil.copyfile(path, out / path.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=HERE, help="folder to write (default: here)")
    generate(parser.parse_args().out)


if __name__ == "__main__":
    main()
