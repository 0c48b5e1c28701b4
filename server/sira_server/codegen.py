"""Generate the Python stubs of the API from `protos/` (the `make protos` target).

Usage: ``python -m sira_server.codegen OUT_DIR``. The committed copy lives in
``client/``; the stub-drift test generates into a temporary directory and
compares. Needs the pinned ``grpcio-tools`` and ``mypy-protobuf`` (dev extra).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "protos"
PROTO_PACKAGE_DIR = Path("sira/experiments/v1")
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / PROTO_PACKAGE_DIR).glob("*.proto"))


def generated_files(out_dir: Path) -> list[Path]:
    package_dir = out_dir / PROTO_PACKAGE_DIR
    return sorted(p for p in package_dir.iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def generate(out_dir: Path) -> list[Path]:
    """Run protoc with the Python, gRPC and mypy-protobuf plugins into out_dir."""
    from grpc_tools import protoc  # dev dependency, imported only here

    plugin_dir = str(Path(sys.executable).parent)
    mypy_plugin = shutil.which("protoc-gen-mypy", path=plugin_dir)
    mypy_grpc_plugin = shutil.which("protoc-gen-mypy_grpc", path=plugin_dir)
    well_known = Path(protoc.__file__).parent / "_proto"
    for stale in generated_files(out_dir) if (out_dir / PROTO_PACKAGE_DIR).exists() else []:
        stale.unlink()
    (out_dir / PROTO_PACKAGE_DIR).mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--proto_path={well_known}",
        f"--plugin=protoc-gen-mypy={mypy_plugin}",
        f"--plugin=protoc-gen-mypy_grpc={mypy_grpc_plugin}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *(str(p.relative_to(PROTO_ROOT)) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return generated_files(out_dir)


def main() -> None:
    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO_ROOT / "client"
    for path in generate(out_dir):
        print(path.relative_to(out_dir))


if __name__ == "__main__":
    main()
