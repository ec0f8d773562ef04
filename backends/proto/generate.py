"""Regenerate the Python modules from the .proto files beside this one (``make protos``).

Runs grpc_tools.protoc (the ``protos`` extra pins grpcio-tools 1.81.1, whose generated code
needs a protobuf 6.33 runtime), then points each generated ``*_pb2.py`` at the private
descriptor pool in ``_pool.py`` instead of protobuf's default pool (why: ``__init__``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
PROTOS = ("grpc_predict_v2.proto", "model_stream_infer.proto")
WITH_SERVICE = ("grpc_predict_v2.proto",)
DEFAULT_POOL = "_descriptor_pool.Default()"
PRIVATE_POOL = "_pool.POOL"
POOL_IMPORT = "from backends.proto import _pool\n"


def _protoc(*args: str) -> None:
    if protoc.main(["grpc_tools.protoc", f"-I{ROOT}", *args]) != 0:
        raise SystemExit(f"protoc failed: {args}")


def _use_private_pool(path: Path) -> None:
    text = path.read_text()
    if text.count(DEFAULT_POOL) != 1:
        raise SystemExit(f"{path}: expected one {DEFAULT_POOL}, the generator changed")
    text = text.replace(DEFAULT_POOL, PRIVATE_POOL)
    anchor = "from google.protobuf.internal import builder as _builder\n"
    path.write_text(text.replace(anchor, anchor + POOL_IMPORT, 1))


def main() -> None:
    for name in PROTOS:
        rel = f"backends/proto/{name}"
        _protoc(f"--python_out={ROOT}", f"--pyi_out={ROOT}", str(ROOT / rel))
        if name in WITH_SERVICE:
            _protoc(f"--grpc_python_out={ROOT}", str(ROOT / rel))
        _use_private_pool(HERE / name.replace(".proto", "_pb2.py"))
    print(f"generated into {HERE}", file=sys.stderr)


if __name__ == "__main__":
    main()
