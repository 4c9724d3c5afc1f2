"""The benchmark suite runs end to end (tiny sizes, no restic or rclone) and writes JSON.

Nothing here is timed: only that every figure is there and positive.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SPLITSTORE_OPS = [
    "store_encrypted",
    "fetch_encrypted",
    "store_plain",
    "fetch_plain",
    "store_scanned",
    "fetch_scanned",
    "scan",
    "small_store",
    "small_fetch",
    "ls_fill",
    "ls",
]


def test_quick_benchmark_writes_complete_results(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)}
    args = ["--quick", "--size-mb", "2", "--runs", "1", "--small-files", "5", "--ls-names", "9"]
    args += ["--fp-files", "20"]
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", *args, "--skip-reference", "--json", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "store / loopback TLS copy" in result.stdout
    doc = json.loads(out.read_text())
    assert set(doc) == {"meta", "operations", "ratios", "false_positives", "notes"}
    assert doc["false_positives"]["files"] == 20
    assert doc["false_positives"]["flagged"] == []
    assert doc["meta"]["size_bytes"] == 2 * 1024 * 1024
    ops = doc["operations"]
    assert set(ops) == {*SPLITSTORE_OPS, "tls_copy"}  # restic and rclone left out
    for key in [*SPLITSTORE_OPS, "tls_copy"]:
        op = ops[key]
        for figure in ("median", "min", "max"):
            assert op["rate"][figure] > 0, key
            assert op["seconds"][figure] > 0, key
        assert len(op["runs"]) >= 1, key
    for key in SPLITSTORE_OPS:
        assert ops[key]["client_peak_mib"] > 0, key
        assert ops[key]["server_peak_mib"] > 0, key
    ratios = {r["name"]: r for r in doc["ratios"]}
    assert ops["ls"]["amount"] == 9  # the large file, 5 small ones, and 3 more
    for name in ("store: encryption on / off", "store / loopback TLS copy"):
        assert ratios[name]["value"] > 0
    assert ratios["store / restic backup"]["value"] is None
    # Everything it made is gone: only our results file is left in its temp folder.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
