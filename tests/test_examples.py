"""The example program runs against real servers, so it cannot rot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .conftest import LiveServers

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "store_and_fetch.py"


def test_store_and_fetch_example(servers: LiveServers, tmp_path: Path) -> None:
    sample = tmp_path / "photo.jpg"
    sample.write_bytes(bytes(range(256)) * 1000)
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), str(sample), "--config", str(servers.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    # 256,000 bytes encrypt to 256,064 (a 16-byte tag per 64 KiB segment): 251 chunks
    assert "stored examples/photo.jpg: 256000 bytes in 251 chunks" in result.stdout
    assert "identical" in result.stdout


def test_example_reports_errors_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--config", str(tmp_path / "missing.toml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "does not exist" in result.stderr
