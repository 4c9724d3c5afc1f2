"""What a finding means for a file: the policy maps each category to block, warn or allow.

Engines only report; the policy decides. ``block`` makes a file malicious (``put`` refuses to
send it, ``get`` refuses to deliver it), ``warn`` makes it suspicious (reported, not stopped),
``allow`` keeps the finding on record but leaves the file clean. A scan that could not be
completed is a ``not-scanned`` finding, which warns by default: an incomplete scan is never
taken for a clean one unless the user says so.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .._errors import ConfigError
from ._engine import CATEGORIES, Finding

__all__ = ["ACTIONS", "DEFAULT_ACTIONS", "Action", "Policy", "Verdict", "verdict_of"]

Action = Literal["block", "warn", "allow"]
Verdict = Literal["clean", "suspicious", "malicious"]
ACTIONS: tuple[Action, ...] = ("block", "warn", "allow")

#: The default policy. Known malware and test signatures block; what is only a sign of
#: danger warns; a plain program is worth recording but is what backups are full of.
DEFAULT_ACTIONS: dict[str, Action] = {
    "known-bad": "block",
    "test-signature": "block",
    "malware": "block",
    "blocked-type": "block",
    "archive-bomb": "block",
    "executable": "allow",
    "disguised-executable": "warn",
    "macro": "warn",
    "script-dropper": "warn",
    "type-mismatch": "warn",
    "archive-nesting": "warn",
    "archive-path": "warn",
    "archive-link": "warn",
    "archive-encrypted": "warn",
    "archive-malformed": "warn",
    "custom-rule": "warn",
    "not-scanned": "warn",
}
assert set(DEFAULT_ACTIONS) == set(CATEGORIES), "every category needs a default action"

# A MIME type pattern: type/subtype, where either may be a glob ("video/*").
_MIME_PATTERN = re.compile(r"^[a-z0-9*][a-z0-9.+*-]*/[a-z0-9*][a-z0-9.+*-]*$")


@dataclass(frozen=True)
class Policy:
    actions: Mapping[str, Action] = field(default_factory=lambda: dict(DEFAULT_ACTIONS))
    #: MIME types (globs allowed) blocked outright, whatever else is found.
    blocked_types: tuple[str, ...] = ()

    def action(self, finding: Finding) -> Action:
        return self.actions.get(finding.category, "warn")

    def blocks_type(self, mime: str) -> bool:
        return any(fnmatch.fnmatchcase(mime, pattern) for pattern in self.blocked_types)

    @classmethod
    def parse(cls, raw: Any, where: str) -> Policy:
        """Read a ``[scan.policy]`` table: ``category = "block" | "warn" | "allow"``, and
        ``blocked_types = ["application/x-dosexec", "video/*"]``."""
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where}: [scan.policy] must be a table")
        actions = dict(DEFAULT_ACTIONS)
        blocked: tuple[str, ...] = ()
        for key, value in raw.items():
            if key == "blocked_types":
                blocked = _mime_patterns(value, where)
            elif key in CATEGORIES:
                if value not in ACTIONS:
                    raise ConfigError(
                        f"{where}: scan.policy.{key} must be one of "
                        + ", ".join(f'"{a}"' for a in ACTIONS)
                    )
                actions[key] = value
            else:
                known = ", ".join(sorted(CATEGORIES))
                raise ConfigError(
                    f"{where}: scan.policy has no category {key!r} (known: {known}, blocked_types)"
                )
        return cls(actions=actions, blocked_types=blocked)


def verdict_of(actions: list[Action]) -> Verdict:
    if "block" in actions:
        return "malicious"
    if "warn" in actions:
        return "suspicious"
    return "clean"


def _mime_patterns(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: scan.policy.blocked_types must be a list of MIME types")
    for pattern in value:
        if not _MIME_PATTERN.match(pattern):
            raise ConfigError(
                f"{where}: scan.policy.blocked_types: {pattern!r} is not a MIME type such as "
                '"application/x-dosexec" or "video/*"'
            )
    return tuple(value)
