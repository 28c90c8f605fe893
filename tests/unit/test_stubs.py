"""The committed gRPC/protobuf stubs match the .proto (proto/generate.py --check), and the check catches stale ones."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("grpc_tools", reason="grpcio-tools (the [test] extra) generates the stubs")

REPO = pathlib.Path(__file__).resolve().parents[2]
STUB = pathlib.Path("featurebank/v1/featurebank_pb2.py")


def run_generate(script: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(script), *args], cwd=script.parent.parent, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def proto_copy(tmp_path) -> pathlib.Path:
    """A copy of proto/ (the script resolves the .proto and the stubs from its own location)."""
    dst = tmp_path / "proto"
    shutil.copytree(REPO / "proto", dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dst


def test_committed_stubs_are_fresh():
    """`python proto/generate.py --check` from the repository root exits 0: the committed stubs match the .proto."""
    r = run_generate(REPO / "proto" / "generate.py", "--check")
    assert r.returncode == 0, f"stubs are stale:\n{r.stdout}\n{r.stderr}"
    assert "stale" not in r.stderr


def test_check_fails_on_a_modified_stub(proto_copy):
    """--check exits 1 and names the file when a generated stub differs from what protoc generates; regenerating fixes it."""
    assert run_generate(proto_copy / "generate.py", "--check").returncode == 0  # the copy itself is fresh
    with open(proto_copy / STUB, "a") as f:
        f.write("# edited by hand\n")

    r = run_generate(proto_copy / "generate.py", "--check")
    assert r.returncode == 1, r.stderr
    assert f"stale: proto/{STUB.as_posix()}" in r.stderr

    regen = run_generate(proto_copy / "generate.py")
    assert regen.returncode == 0, regen.stderr
    assert run_generate(proto_copy / "generate.py", "--check").returncode == 0
    assert (proto_copy / STUB).read_bytes() == (REPO / "proto" / STUB).read_bytes()


def test_check_fails_on_a_missing_stub(proto_copy):
    """--check exits 1 when a generated file (the gRPC service stub) is missing."""
    (proto_copy / "featurebank/v1/featurebank_pb2_grpc.py").unlink()
    r = run_generate(proto_copy / "generate.py", "--check")
    assert r.returncode == 1
    assert "stale: proto/featurebank/v1/featurebank_pb2_grpc.py" in r.stderr


def test_check_fails_when_the_proto_changes(proto_copy):
    """--check exits 1 when the .proto changed but the stubs were not regenerated."""
    proto = proto_copy / "featurebank/v1/featurebank.proto"
    proto.write_text(proto.read_text() + "\nmessage AddedLater {\n  string note = 1;\n}\n")
    r = run_generate(proto_copy / "generate.py", "--check")
    assert r.returncode == 1
    assert "stale: proto/featurebank/v1/featurebank_pb2.py" in r.stderr
