"""The command line's side of the malicious-file checks: ``splitstore scan``, and the
warnings ``put``, ``get`` and ``stat`` print about a file's scan."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TextIO

from ._config import Config, find_config, load_config
from ._errors import ConfigError, SplitStoreError
from .scanning import Reason, Scanner, ScanReport, ScanSettings

__all__ = [
    "EXIT_ERROR",
    "EXIT_FOUND",
    "cmd_scan",
    "print_reasons",
    "stored_scan_line",
    "warn_about",
]

# `scan`'s own exit codes, as virus scanners use them: 0 clean, 1 found, 2 error.
EXIT_FOUND, EXIT_ERROR = 1, 2


def cmd_scan(args: argparse.Namespace) -> int:
    scanner = Scanner(_settings(args.config))
    results: list[dict[str, object]] = []
    found = failed = False
    for file in args.files:
        try:
            report = scanner.scan_path(file)
        except Exception as exc:
            # Any failure is "error" (2), never "found" (1) or clean: a bug included.
            message = str(exc) if isinstance(exc, SplitStoreError) else f"internal error: {exc!r}"
            failed = True
            results.append({"name": file, "error": message})
            print(f"splitstore: error: {message}", file=sys.stderr)
            continue
        found = found or report.verdict != "clean"
        results.append({**report.to_json(), "name": file})
        if not args.json:
            print(f"{file}: {report.verdict}")
            print_reasons(report, sys.stdout, every=args.verbose or report.verdict != "clean")
    if args.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
    return EXIT_ERROR if failed else EXIT_FOUND if found else 0


def _settings(explicit: str | None) -> ScanSettings:
    """The config's [scan] section when there is a config; else the defaults (scanning
    needs no servers, so it must work before ``init``)."""
    try:
        path = find_config(explicit)
    except ConfigError:
        return ScanSettings()
    if explicit is None and not path.exists():
        return ScanSettings()
    config: Config = load_config(path)
    return config.scan


def print_reasons(report: ScanReport, out: TextIO, *, every: bool = True) -> None:
    """One indented line per reason (those the policy allows only with ``every``)."""
    for reason in report.reasons:
        if every or reason.action != "allow":
            print(f"  {_tag(reason)} {reason.describe()}", file=out)
    if report.omitted:
        print(f"  ({report.omitted} more findings not recorded)", file=out)


def _tag(reason: Reason) -> str:
    return {"block": "[block]", "warn": "[warn] ", "allow": "[info] "}[reason.action]


def warn_about(report: ScanReport, name: str, *, overridden: bool = False) -> None:
    """Tell the user on stderr what a put or get is going ahead with despite its scan."""
    if report.verdict == "clean":
        return
    note = " (going ahead: --allow-unsafe)" if overridden else ""
    print(f"splitstore: warning: {name!r} is {report.summary()}{note}", file=sys.stderr)
    for reason in report.reasons[1:]:
        if reason.action != "allow":
            print(f"splitstore: warning:   also {reason.describe()}", file=sys.stderr)


def stored_scan_line(report: ScanReport | None) -> str:
    """How the file looked when it was stored, in one line."""
    if report is None:
        return "not scanned when stored"
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(report.scanned_at))
    engines = ", ".join(
        f"{name} {info.get('version', '?')}"
        + (f" rules {info['rules'][:12]}" if "rules" in info else "")
        for name, info in report.engines.items()
    )
    line = f"{report.verdict} when stored ({when}; {engines})"
    shown = [r for r in report.reasons if r.action != "allow"]
    return f"{line}: {shown[0].describe()}" if shown else line
