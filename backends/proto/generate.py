"""Regenerate the Python modules of ``router/protocol/proto`` from the .proto files there
(``make protos``).

Runs grpc_tools.protoc (the ``protos`` extra pins grpcio-tools 1.81.1, whose generated code
needs a protobuf 6.33 runtime), then points each generated ``*_pb2.py`` at the private
descriptor pool in ``_pool.py`` instead of protobuf's default pool (why: that package's
``__init__``). The router answers some KServe calls with these classes, and the router must
not import ``backends``, so they live in the router package; this generator is a development
tool and stays out of it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent.parent
PACKAGE = "router/protocol/proto"  # relative to ROOT, which is protoc's include path
OUT = ROOT / PACKAGE
PROTOS = (
    "grpc_predict_v2.proto", "model_stream_infer.proto", "triton_extensions.proto",
    "registry.proto", "anyserve_worker_management.proto",
)
WITH_SERVICE = ("grpc_predict_v2.proto", "registry.proto", "anyserve_worker_management.proto")
DEFAULT_POOL = "_descriptor_pool.Default()"
PRIVATE_POOL = "_pool.POOL"
POOL_IMPORT = f"from {PACKAGE.replace('/', '.')} import _pool\n"


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
        source = str(OUT / name)
        _protoc(f"--python_out={ROOT}", f"--pyi_out={ROOT}", source)
        if name in WITH_SERVICE:
            _protoc(f"--grpc_python_out={ROOT}", source)
        _use_private_pool(OUT / name.replace(".proto", "_pb2.py"))
    print(f"generated into {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
