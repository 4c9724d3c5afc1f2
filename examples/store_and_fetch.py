"""Store a real file across both servers and fetch it back, with the Python API.

Run it with a config (from `splitstore init`) and both servers running:

    splitstore init --dir /tmp/ss && splitstore serve --config /tmp/ss/splitstore.toml &
    python examples/store_and_fetch.py --config /tmp/ss/splitstore.toml [FILE]

Without FILE it stores this script itself.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from splitstore import Client, SplitStoreError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", nargs="?", default=__file__)
    parser.add_argument("--config", help="splitstore.toml (default: found as the CLI does)")
    args = parser.parse_args()
    source = Path(args.file)
    try:
        with Client(args.config) as client:
            info = client.store(source, f"examples/{source.name}")
            print(f"stored {info.name}: {info.size} bytes in {info.chunks} chunks")
            for server, count in info.chunks_per_server.items():
                print(f"  {count} chunks ({info.bytes_per_server[server]} bytes) on {server}")
            with tempfile.TemporaryDirectory() as tmp:
                restored = client.fetch(info.name, Path(tmp) / source.name)
                same = filecmp.cmp(source, restored, shallow=False)
                print(f"fetched into {restored}: {'identical' if same else 'DIFFERENT'}")
            print(f"verify: {client.verify(info.name).sha256}")
            return 0 if same else 1
    except SplitStoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
