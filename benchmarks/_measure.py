"""One measured run of anything, client operations run in a child, and their summaries."""

from __future__ import annotations

import json
import os
import statistics
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ._proc import Finished, run_measured
from ._servers import ServerProcess
from ._stats import MIB, Spread, rate

__all__ = ["ClientRunner", "Run", "summarise"]

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Run:
    """One run: its time, and the peak memory and CPU time of client and servers."""

    seconds: float
    #: None when the client is not a process of its own (the TLS copy runs in this one).
    client_peak: int | None
    client_cpu: float
    server_peak: int | None = None
    server_cpu: float | None = None
    #: Whatever else the operation reported (bytes written, names listed, ...).
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of_tool(cls, finished: Finished) -> Run:
        """A run of an external command: the whole process is the operation."""
        return cls(finished.seconds, finished.peak_bytes or None, finished.cpu_seconds)


class ClientRunner:
    """Runs ``benchmarks._runner`` operations against a ServerProcess, one child each."""

    def __init__(self, work: Path) -> None:
        self.out = work / "runner-result.json"
        self.log = work / "runner.log"
        path = os.environ.get("PYTHONPATH")
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), path]))}

    def run(
        self, servers: ServerProcess, op: str, *args: str | Path, config: Path | None = None
    ) -> Run:
        """Run ``op`` with ``servers``' config (or ``config``, another one of that setup)."""
        self.out.unlink(missing_ok=True)
        config = config or servers.config
        cmd = [sys.executable, "-m", "benchmarks._runner", str(self.out), op, str(config)]
        servers.mark()
        run_measured([*cmd, *map(str, args)], log=self.log, env=self.env, sample_peak=False)
        server_peak, server_cpu = servers.usage()
        doc = json.loads(self.out.read_text())
        seconds, peak, cpu = doc.pop("seconds"), doc.pop("peak_bytes"), doc.pop("cpu_seconds")
        return Run(seconds, peak, cpu, server_peak, server_cpu, doc)


def summarise(
    label: str, runs: Sequence[Run], amount: float, unit: str, seconds: Sequence[float] = ()
) -> dict[str, Any]:
    """What the report and the JSON show of an operation: ``amount`` per second (in
    ``unit``) as median, min and max over the runs, and peaks and CPU times.

    ``seconds`` overrides the runs' own times (for an operation that is part of a run).
    """
    times = list(seconds) or [r.seconds for r in runs]
    servers = [r for r in runs if r.server_peak is not None]
    peaks = [r.client_peak for r in runs if r.client_peak is not None]
    return {
        "label": label,
        "unit": unit,
        "amount": amount,
        "rate": rate(amount, times).to_json(),
        "seconds": Spread.of(times).to_json(),
        "client_peak_mib": max(peaks) / MIB if peaks else None,
        "client_cpu_seconds": statistics.median(r.client_cpu for r in runs),
        "server_peak_mib": max(r.server_peak or 0 for r in servers) / MIB if servers else None,
        "server_cpu_seconds": (
            statistics.median(r.server_cpu or 0.0 for r in servers) if servers else None
        ),
        "runs": [asdict(r) for r in runs],
    }
