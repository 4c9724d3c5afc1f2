"""The benchmark suite runs end to end (tiny sizes, no restic or rclone) and writes JSON.

Nothing here is timed: only that every figure is there and positive.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from benchmarks._budget import STEP_LABELS
from benchmarks._reference import Tools
from benchmarks._suite import Options, _Suite

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


TINY = ["--quick", "--size-mb", "2", "--small-files", "5", "--ls-names", "15", "--fp-files", "20"]


def run_benchmarks(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> tuple[str, dict[str, Any]]:
    """The suite's output and its JSON results."""
    out = tmp_path / "results.json"
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", *TINY, *args, "--json", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout, json.loads(out.read_text())


def test_quick_benchmark_writes_complete_results(tmp_path: Path) -> None:
    stdout, doc = run_benchmarks(tmp_path, "--runs", "1", "--skip-reference")
    assert "store / loopback TLS copy" in stdout
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
    assert ops["ls"]["amount"] == 15  # 2 large files, 5 small ones each way, and 3 more
    assert ops["ls_command"]["amount"] == 15
    for name in ("store: encryption on / off", "store / loopback TLS copy"):
        assert ratios[name]["value"] > 0
    assert ratios["store / restic backup"]["value"] is None
    assert ratios["store / loopback TLS copy"]["target"] == 0.5
    targets = {t["of"]: t for t in doc["targets"]}
    assert targets["small_store"]["value"] == ops["small_store"]["rate"]["median"]
    assert targets["ls"]["value"] == ops["ls"]["seconds"]["median"]
    assert all(t["meets"] in (True, False) for t in doc["targets"])
    assert "CPU budget" in stdout
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


# Stand-ins for the reference tools, found first on PATH. They copy files as a local
# repository or remote would (encrypting nothing). restic's second round fails, after
# its first has succeeded.
RESTIC = """#!/bin/sh
if [ "$1" = version ]; then echo "restic (a stand-in)"; exit 0; fi
repo="$2"
case "$repo" in *repo1) echo "stand-in restic: the repository is damaged" >&2; exit 1 ;; esac
case "$3" in
init) mkdir -p "$repo" ;;
backup) cp "$4" "$repo/data" && realpath "$4" > "$repo/path" ;;
restore) src=$(cat "$repo/path"); mkdir -p "$6$(dirname "$src")" && cp "$repo/data" "$6$src" ;;
*) exit 2 ;;
esac
"""
RCLONE = """#!/bin/sh
case "$1" in
version) echo "rclone (a stand-in)" ;;
obscure) echo "obscured" ;;
copy)
    store="$RCLONE_CONFIG_BENCHCRYPT_REMOTE"
    case "$2" in
    benchcrypt:*) mkdir -p "$3" && cp "$store/${2#benchcrypt:}" "$3/" ;;
    *) mkdir -p "$store/${3#benchcrypt:}" && cp "$2" "$store/${3#benchcrypt:}/" ;;
    esac ;;
*) exit 2 ;;
esac
"""


def stand_ins(folder: Path, **scripts: str) -> str:
    """A PATH that finds ``scripts`` (name: text) first."""
    folder.mkdir()
    for name, script in scripts.items():
        (folder / name).write_text(script)
        (folder / name).chmod(0o755)
    return f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"


def test_reference_tools_run_in_each_round_and_one_failing_midway_is_left_out(
    tmp_path: Path,
) -> None:
    path = stand_ins(tmp_path / "bin", restic=RESTIC, rclone=RCLONE)
    # COLUMNS: wide enough that the report's tables are not wrapped.
    env = {"PATH": path, "COLUMNS": "200"}
    stdout, doc = run_benchmarks(tmp_path, "--runs", "3", env=env)

    # Round by round, the setups taking turns at going first, then the references;
    # restic's second round failed, and it ran no third.
    lines = stdout.splitlines()

    def first(text: str) -> int:
        return next(i for i, line in enumerate(lines) if text in line)

    steps = [
        *("run 1/3, encrypted", "run 1/3, plain", "run 1/3, scanned"),
        *("run 1/3, loopback TLS copy", "run 1/3, restic backup", "run 1/3, rclone copy to"),
        *("run 2/3, plain", "run 2/3, scanned", "run 2/3, encrypted"),
        *("run 2/3, loopback TLS copy", "  restic (round 2) failed:", "run 2/3, rclone copy to"),
        *("run 3/3, scanned", "run 3/3, encrypted", "run 3/3, plain"),
        *("run 3/3, loopback TLS copy", "run 3/3, rclone copy to"),
    ]
    order = [first(step) for step in steps]
    assert order == sorted(order)
    assert not any("run 3/3, restic" in line for line in lines)

    # Said once as it happened (the notes at the end say it again), left out whole.
    assert stdout.count("  restic (round 2) failed:") == 1
    assert [note for note in doc["notes"] if note.startswith("restic (round 2) failed")]
    ops = doc["operations"]
    assert "restic_backup" not in ops
    assert "restic_restore" not in ops
    for key in ("rclone_copy_to", "rclone_copy_back", "tls_copy", "store_plain"):
        assert len(ops[key]["runs"]) == 3, key
    ratios = {r["name"]: r for r in doc["ratios"]}
    assert ratios["fetch / rclone copy back"]["value"] > 0
    assert ratios["store / restic backup"]["value"] is None
    assert ratios["store / restic backup"]["rounds"] == []
    # Each round's own ratio, from the runs of that round, and its spread in the report.
    fetched, back = (ops[key]["runs"] for key in ("fetch_encrypted", "rclone_copy_back"))
    expected = [b["seconds"] / f["seconds"] for f, b in zip(fetched, back, strict=True)]
    assert ratios["fetch / rclone copy back"]["rounds"] == pytest.approx(expected)
    assert any("round by round" in line for line in lines)
    row = lines[first("fetch / rclone copy back")]
    assert f"{min(expected):.2f}-{max(expected):.2f}x" in row
    assert set(doc["meta"]["phase_seconds"]) >= {"large file", "tls copy", "restic", "rclone"}


def test_a_reference_tool_that_cannot_start_is_left_out(tmp_path: Path) -> None:
    broken = "#!/bin/sh\necho 'stand-in rclone: broken' >&2\nexit 1\n"
    folder = tmp_path / "bin"
    stand_ins(folder, rclone=broken)
    options = Options(
        size=1, runs=1, small_files=1, ls_names=1, references=True, quick=True, fp_files=1
    )
    suite = _Suite(
        options, tmp_path, Tools(paths={"restic": None, "rclone": str(folder / "rclone")})
    )
    assert suite._start_references() == {}
    assert [note for note in suite.notes if note.startswith("rclone failed")]
