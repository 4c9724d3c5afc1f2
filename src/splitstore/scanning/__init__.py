"""Malicious-file checks, run in the client before a file is sent and before a fetched
file is delivered (the servers only ever see ciphertext). See docs/scanning.md.

The engines (``_signatures``, ``_yara``, ``_filetype``, ``_archives``, ``_clamd``) load
their libraries only when a ``Scanner`` is built, so importing splitstore stays cheap.
"""

from ._engine import CATEGORIES, Engine, EngineSession, Finding
from ._policy import ACTIONS, DEFAULT_ACTIONS, Policy, Verdict
from ._report import Reason, ScanReport
from ._scanner import Scanner, ScanSettings, ScanStream

__all__ = [
    "ACTIONS",
    "CATEGORIES",
    "DEFAULT_ACTIONS",
    "Engine",
    "EngineSession",
    "Finding",
    "Policy",
    "Reason",
    "ScanReport",
    "ScanSettings",
    "ScanStream",
    "Scanner",
    "Verdict",
]
