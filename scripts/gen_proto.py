#!/usr/bin/env python3
"""Regenerate minicaffe/proto/minicaffe_pb2.py from minicaffe/proto/minicaffe.proto.

Run after every edit of the .proto (the generated module is committed, so users need no
protoc):  python scripts/gen_proto.py

It uses the protoc bundled with grpcio-tools (the `test` extra). The repository root is
the include path, so the file registers in protobuf's descriptor pool as
"minicaffe/proto/minicaffe.proto", a name no other package's schema (Caffe's own
caffe.proto included) can clash with.

The generated module refuses to import on a protobuf runtime older than the protoc that
wrote it. The committed one comes from grpcio-tools 1.74.0 (protoc 31.1, "gencode 6.31.1"),
so it imports on protobuf 6.31.1 and later, 7.x included. Regenerating with a newer
grpcio-tools raises that floor: tests/test_proto.py fails until pyproject.toml's protobuf
requirement is raised to match, so either regenerate with the old tools, e.g.
    python -m venv /tmp/protoc31 && /tmp/protoc31/bin/pip install grpcio-tools==1.74.0
    /tmp/protoc31/bin/python scripts/gen_proto.py
or raise the floor on purpose.
"""

import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PROTO_RELATIVE = "minicaffe/proto/minicaffe.proto"
MODULE_RELATIVE = "minicaffe/proto/minicaffe_pb2.py"


def run_protoc(output_directory):
    """Compile the schema into `output_directory` with the bundled protoc."""
    try:
        from grpc_tools import protoc
    except ImportError:
        raise RuntimeError("grpcio-tools is not installed (pip install -e '.[test]')") from None
    status = protoc.main(["protoc", f"-I{REPO_ROOT}", f"--python_out={output_directory}",
                          str(REPO_ROOT / PROTO_RELATIVE)])
    if status != 0:
        raise RuntimeError(f"protoc failed with status {status} on {PROTO_RELATIVE}")


def gencode_version(module_path):
    """The protobuf version the generated module demands at runtime, e.g. '6.31.1'."""
    check = re.search(r"ValidateProtobufRuntimeVersion\(\s*\S+,\s*(\d+),\s*(\d+),\s*(\d+),",
                      module_path.read_text())
    return ".".join(check.groups()) if check else "any version (no runtime check found)"


def main():
    # Generate into a scratch directory first so a failed compile keeps the old module.
    with tempfile.TemporaryDirectory() as scratch:
        run_protoc(scratch)
        generated = Path(scratch) / MODULE_RELATIVE
        target = REPO_ROOT / MODULE_RELATIVE
        partial = target.with_suffix(".py.tmp")
        shutil.copyfile(generated, partial)
        os.replace(partial, target)
    print(f"wrote {MODULE_RELATIVE}; it needs protobuf>={gencode_version(target)}")


if __name__ == "__main__":
    try:
        main()
    except RuntimeError as error:
        sys.exit(str(error))
