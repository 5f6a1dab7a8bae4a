"""Regenerate the committed wire code in fedcommon/wire/ from proto/ (also used by the drift test)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"


def generate(out_dir: Path) -> list[Path]:
    """Run protoc (grpcio-tools) on every .proto under proto/, writing into out_dir."""
    import grpc_tools
    from grpc_tools import protoc  # test-extra dependency; only needed to regenerate

    include = Path(grpc_tools.__file__).parent / "_proto"
    sources = sorted(PROTO_ROOT.rglob("*.proto"))
    for src in sources:
        rc = protoc.main(
            [
                "protoc",
                f"-I{PROTO_ROOT}",
                f"-I{include}",
                f"--python_out={out_dir}",
                f"--grpc_python_out={out_dir}",
                str(src.relative_to(PROTO_ROOT)),
            ]
        )
        if rc != 0:
            raise SystemExit(f"protoc failed on {src} (exit {rc})")
    return sources


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: the repository)")
    args = parser.parse_args()
    sources = generate(args.out)
    print(f"generated wire code for {len(sources)} proto file(s) under {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
