"""The committed stubs in cluster/ are what ``make proto`` generates from proto/ today."""

from __future__ import annotations

from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[2]
PROTO = "moecluster/v1/moecluster.proto"


def test_stubs_match_proto(tmp_path):
    # The same protoc call and import rewrite as the Makefile's proto target.
    args = ["protoc", f"-I{ROOT / 'proto'}", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}", str(ROOT / "proto" / PROTO)]
    assert protoc.main(args) == 0
    generated = tmp_path / "moecluster" / "v1"
    grpc_stub = (generated / "moecluster_pb2_grpc.py").read_text().replace(
        "\nfrom moecluster.v1 import ", "\nfrom cluster import ")
    stale = []
    for name, text in (("moecluster_pb2.py", (generated / "moecluster_pb2.py").read_text()),
                       ("moecluster_pb2.pyi", (generated / "moecluster_pb2.pyi").read_text()),
                       ("moecluster_pb2_grpc.py", grpc_stub)):
        if (ROOT / "cluster" / name).read_text() != text:
            stale.append(name)
    assert not stale, f"cluster/{', '.join(stale)} out of date with proto/{PROTO}: run `make proto`"
