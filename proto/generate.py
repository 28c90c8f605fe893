"""Regenerate the Python stubs (and .pyi) from proto/featurebank/v1/*.proto; --check fails if stale.

python proto/generate.py          # rewrite proto/featurebank/v1/*_pb2*.py{,i}
python proto/generate.py --check  # exit 1 if the committed stubs differ from fresh ones
"""

from __future__ import annotations

import argparse
import filecmp
import pathlib
import sys
import tempfile

PROTO_ROOT = pathlib.Path(__file__).resolve().parent
PROTOS = sorted(PROTO_ROOT.glob("featurebank/v1/*.proto"))


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Run protoc (from grpcio-tools) into out_dir; return the generated files relative to it."""
    import grpc_tools
    from grpc_tools import protoc

    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p.relative_to(PROTO_ROOT)) for p in PROTOS],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(p.relative_to(out_dir) for p in out_dir.rglob("*_pb2*.py*"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = pathlib.Path(tmp)
        files = generate(tmp_path)
        stale = [
            f
            for f in files
            if not (PROTO_ROOT / f).exists() or not filecmp.cmp(tmp_path / f, PROTO_ROOT / f, shallow=False)
        ]
        if args.check:
            for f in stale:
                print(f"stale: proto/{f} (run: python proto/generate.py)", file=sys.stderr)
            return 1 if stale else 0
        for f in files:
            (PROTO_ROOT / f).write_bytes((tmp_path / f).read_bytes())
            print(f"wrote proto/{f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
