"""``python -m benchmarks``: run the benchmark suite, print the tables, save JSON."""

from __future__ import annotations

import argparse
import datetime as dt
import signal
import sys
import tempfile
from pathlib import Path
from types import FrameType

from ._proc import ToolFailed
from ._report import print_report, write_json
from ._stats import MIB
from ._suite import Options, run_suite

FULL = {"size_mb": 1024, "small_files": 1000, "ls_names": 10_000, "fp_files": 3000}
QUICK = {"size_mb": 64, "small_files": 200, "ls_names": 1000, "fp_files": 500}


def parse(argv: list[str]) -> tuple[Options, Path]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measure splitstore against a loopback TLS copy, restic and rclone. "
        "Sets up its own servers in a temporary folder and removes them at the end.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes: done in under two minutes"
    )
    parser.add_argument(
        "--size-mb", type=int, help="the large file, in MiB (default 1024; quick 64)"
    )
    parser.add_argument("--runs", type=int, default=3, help="runs of each measurement (default 3)")
    parser.add_argument("--small-files", type=int, help="4 KiB files (default 1000; quick 200)")
    parser.add_argument(
        "--ls-names",
        type=int,
        help="names to list, the files stored before included (default 10000; quick 1000)",
    )
    parser.add_argument(
        "--fp-files",
        type=int,
        help="ordinary files scanned to count false positives (default 3000; quick 500)",
    )
    parser.add_argument(
        "--skip-reference",
        action="store_true",
        help="leave out restic and rclone (and do not try to install them)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        metavar="PATH",
        help="where to write the results (default: a new file in $TMPDIR/splitstore-bench)",
    )
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL

    def pick(name: str) -> int:
        value: int | None = getattr(args, name)
        chosen = preset[name] if value is None else value
        if chosen < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
        return chosen

    if args.runs < 1:
        parser.error("--runs must be at least 1")
    options = Options(
        size=pick("size_mb") * MIB,
        runs=args.runs,
        small_files=pick("small_files"),
        ls_names=pick("ls_names"),
        references=not args.skip_reference,
        quick=args.quick,
        fp_files=pick("fp_files"),
    )
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    default = Path(tempfile.gettempdir()) / "splitstore-bench" / f"results-{stamp}.json"
    return options, args.json or default


def _stop(signum: int, frame: FrameType | None) -> None:
    """Unwind as Ctrl-C does (servers stopped, folders removed), once: a second signal
    would cut that clean-up short, so from now on they are ignored."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    print("benchmarks: stopping the servers and removing temporary files", flush=True)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def main(argv: list[str]) -> int:
    options, json_path = parse(argv)
    signal.signal(signal.SIGTERM, _stop)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # ignored under nohup: keep it so
        signal.signal(signal.SIGINT, _stop)
    try:
        results = run_suite(options)
    except KeyboardInterrupt:
        print("benchmarks: interrupted; the servers are stopped and temporary files removed")
        return 130
    except ToolFailed as exc:
        print(f"benchmarks: failed: {exc}", file=sys.stderr)
        return 1
    print_report(results)
    write_json(results, json_path)
    print(f"results written to {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
