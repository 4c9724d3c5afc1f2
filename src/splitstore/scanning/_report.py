"""A scan's outcome: the verdict, the reasons behind it, and which engines gave it.

A report is what ``splitstore scan`` prints, what ``put`` and ``get`` act on, and (in a
bounded form) what the manifest of a stored version records, so that ``stat`` and a later
``get`` can say how the file looked when it was stored.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ._engine import Finding
from ._policy import ACTIONS, Action, Verdict, verdict_of

__all__ = ["MAX_RECORD_BYTES", "Reason", "ScanReport"]

#: The most a report may take in a manifest; beyond it, findings are dropped (and counted).
MAX_RECORD_BYTES = 12 * 1024
_MAX_DETAIL = 300
_VERDICTS = ("clean", "suspicious", "malicious")


@dataclass(frozen=True)
class Reason:
    """A finding, and what the policy made of it."""

    finding: Finding
    action: Action

    def describe(self) -> str:
        f = self.finding
        where = []
        if f.member:
            where.append(f"in {f.member}")
        if f.offset is not None:
            where.append(f"at byte {f.offset}")
        place = f" {' '.join(where)}" if where else ""
        detail = f": {f.detail}" if f.detail else ""
        return f"{f.category} ({f.engine} {f.rule}{place}){detail}"


@dataclass(frozen=True)
class ScanReport:
    name: str
    verdict: Verdict
    reasons: tuple[Reason, ...]
    #: Each engine that ran, as its ``describe()`` says (version, rules hash).
    engines: Mapping[str, Mapping[str, str]]
    size: int
    #: SHA-256 of the bytes scanned (ties the verdict to the stored content); on a
    #: ``get``, the manifest's, which the fetch's tags or its own hash check.
    sha256: str
    seconds: float = 0.0
    #: Reasons left out of a recorded report to keep the manifest bounded.
    omitted: int = 0
    scanned_at: float = field(default=0.0, compare=False)

    @classmethod
    def build(
        cls,
        name: str,
        reasons: list[Reason],
        engines: Mapping[str, Mapping[str, str]],
        size: int,
        sha256: str,
        seconds: float,
        scanned_at: float,
    ) -> ScanReport:
        # Strongest first, so a summary leads with what decided the verdict.
        rank = {a: i for i, a in enumerate(ACTIONS)}
        ordered = sorted(reasons, key=lambda r: rank[r.action])
        verdict = verdict_of([r.action for r in reasons])
        return cls(
            name, verdict, tuple(ordered), engines, size, sha256, round(seconds, 6), 0, scanned_at
        )

    @property
    def blocking(self) -> tuple[Reason, ...]:
        return tuple(r for r in self.reasons if r.action == "block")

    @property
    def warnings(self) -> tuple[Reason, ...]:
        return tuple(r for r in self.reasons if r.action == "warn")

    def summary(self) -> str:
        """One line for a person: the verdict and what decided it."""
        shown = [r for r in self.reasons if r.action != "allow"] or list(self.reasons)
        if not shown:
            return f"{self.verdict} ({', '.join(self.engines) or 'no engines'})"
        more = len(shown) - 1 + self.omitted
        tail = f" (and {more} more)" if more else ""
        return f"{self.verdict}: {shown[0].describe()}{tail}"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "verdict": self.verdict,
            "size": self.size,
            "sha256": self.sha256,
            "seconds": round(self.seconds, 6),
            "scanned_at": self.scanned_at,
            "engines": {k: dict(v) for k, v in self.engines.items()},
            "findings": [{**r.finding.to_json(), "action": r.action} for r in self.reasons],
            "omitted": self.omitted,
        }

    @classmethod
    def from_json(cls, doc: Any) -> ScanReport:
        """Read a recorded report; raises ValueError/TypeError/KeyError when malformed."""
        try:
            return cls._from_json(doc)
        except OverflowError as exc:  # int() of a JSON 1e999 (infinity)
            raise ValueError(f"number out of range in scan record ({exc})") from None

    @classmethod
    def _from_json(cls, doc: Any) -> ScanReport:
        if not isinstance(doc, dict):
            raise TypeError("scan record is not an object")
        verdict = doc["verdict"]
        if verdict not in _VERDICTS:
            raise ValueError(f"unknown verdict {verdict!r}")
        reasons = []
        for item in doc["findings"]:
            if not isinstance(item, dict) or item.get("action") not in ACTIONS:
                raise ValueError("bad finding in scan record")
            reasons.append(Reason(Finding.from_json(item), item["action"]))
        engines = doc["engines"]
        if not isinstance(engines, dict) or not all(
            isinstance(v, dict) and all(isinstance(x, str) for x in v.values())
            for v in engines.values()
        ):
            raise TypeError("bad engines in scan record")
        return cls(
            name=str(doc["name"]),
            verdict=verdict,
            reasons=tuple(reasons),
            engines=engines,
            size=_count(doc["size"], "size"),
            sha256=str(doc["sha256"]),
            seconds=_moment(doc.get("seconds", 0.0), "seconds"),
            omitted=_count(doc.get("omitted", 0), "omitted"),
            scanned_at=_moment(doc.get("scanned_at", 0.0), "scanned_at"),
        )

    def bounded(self) -> ScanReport:
        """This report cut to fit in a manifest: details shortened, then reasons dropped
        from the weakest end (the count is kept) until it fits in MAX_RECORD_BYTES."""
        reasons = [Reason(_short(r.finding), r.action) for r in self.reasons]
        omitted = self.omitted
        while True:
            candidate = ScanReport(
                self.name,
                self.verdict,
                tuple(reasons),
                self.engines,
                self.size,
                self.sha256,
                self.seconds,
                omitted,
                self.scanned_at,
            )
            record = candidate.to_json()
            del record["name"]  # the manifest holds the name once, and bounds it itself
            size = len(json.dumps(record, ensure_ascii=False).encode())
            if size <= MAX_RECORD_BYTES or not reasons:
                return candidate
            drop = max(1, len(reasons) // 4)
            reasons = reasons[:-drop]
            omitted += drop


def _count(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"scan record: {key} must be a whole number >= 0")
    return value


def _moment(value: Any, key: str) -> float:
    # Shown as a date (time.localtime) and written as JSON: finite, and before year 10000.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"scan record: {key} must be a number")
    if not 0 <= value < _MAX_TIME:
        raise ValueError(f"scan record: {key} is out of range")
    return float(value)


_MAX_TIME = 253402300800  # 10000-01-01T00:00:00Z


def _short(f: Finding) -> Finding:
    if len(f.detail) <= _MAX_DETAIL and (f.member is None or len(f.member) <= _MAX_DETAIL):
        return f
    member = (
        f.member
        if f.member is None or len(f.member) <= _MAX_DETAIL
        else ("..." + f.member[-_MAX_DETAIL:])
    )
    return Finding(f.engine, f.category, f.rule, f.detail[:_MAX_DETAIL], f.offset, member)
