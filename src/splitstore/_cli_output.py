"""How the command-line tool prints: sizes, JSON, warnings and logs."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, TextIO

import orjson

__all__ = ["configure_logging", "print_json", "show_warning", "size_text"]


def print_json(doc: Any) -> None:
    # orjson: the stdlib's encoder runs in pure Python once it indents (ls --json of 10,000).
    try:
        text = orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode()
    except TypeError:  # what orjson refuses, such as an undecodable local file name
        text = json.dumps(doc, indent=2, ensure_ascii=False)
    sys.stdout.write(text + "\n")


def size_text(n: int) -> str:
    """A byte count as a person reads it: 512 B, 4.0 KiB, 1.5 GiB."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """Warnings as one plain line, like errors (not Python's file:line form)."""
    print(f"splitstore: warning: {message}", file=file or sys.stderr)


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    if not verbose:
        # aiohttp logs every malformed request with a traceback; garbage from the network
        # is expected and answered with 400, so keep it out of the server's output.
        logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
