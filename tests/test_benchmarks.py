"""The benchmark suite runs end to end (tiny sizes, no restic or rclone) and writes JSON.

Nothing here is timed: only that every figure is there and positive.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from benchmarks._budget import STEP_LABELS

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
    "small_store_one",
    "small_fetch_one",
    "ls_fill",
    "ls",
    "ls_command",
]


def test_quick_benchmark_writes_complete_results(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)}
    args = ["--quick", "--size-mb", "2", "--runs", "1", "--small-files", "5", "--ls-names", "15"]
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
    assert set(doc) == {
        "meta",
        "operations",
        "ratios",
        "targets",
        "cpu_budget",
        "false_positives",
        "notes",
    }
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
    assert ops["ls"]["amount"] == 15  # the large file, 5 small ones each way, and 4 more
    assert ops["ls_command"]["amount"] == 15
    for name in ("store: encryption on / off", "store / loopback TLS copy"):
        assert ratios[name]["value"] > 0
    assert ratios["store / restic backup"]["value"] is None
    assert ratios["store / loopback TLS copy"]["target"] == 0.5
    targets = {t["of"]: t for t in doc["targets"]}
    assert targets["small_store"]["value"] == ops["small_store"]["rate"]["median"]
    assert targets["ls"]["value"] == ops["ls"]["seconds"]["median"]
    assert all(t["meets"] in (True, False) for t in doc["targets"])
    assert "CPU budget" in result.stdout
    budget = doc["cpu_budget"]
    assert set(budget["step_mb_s"]) == set(STEP_LABELS)
    assert all(rate > 0 for rate in budget["step_mb_s"].values())
    for op in ("store", "fetch"):
        # The sum of its steps, and what the runs used, which cannot be less (with a
        # margin for a step timed in a quieter moment than the runs).
        entry = budget[op]
        expected = sum(2**30 / (budget["step_mb_s"][s] * 1e6) for s in entry["steps"])
        assert entry["cpu_seconds_per_gib"] == pytest.approx(expected)
        assert entry["measured_cpu_seconds_per_gib"] > 0
        assert entry["ceiling_mb_s"] > 0
    # Everything it made is gone: only our results file is left in its temp folder.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
