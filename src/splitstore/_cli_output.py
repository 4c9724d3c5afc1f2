"""How the command-line tool prints sizes and JSON."""

from __future__ import annotations

import json
import sys
from typing import Any

import orjson

__all__ = ["print_json", "size_text"]


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
