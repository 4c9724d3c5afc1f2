"""The results as tables on the terminal, and as a JSON file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ._budget import STEP_LABELS

__all__ = ["print_report", "write_json"]

# Rows of the two tables, in order; operations that were not measured are left out.
TRANSFERS = [
    "store_encrypted",
    "fetch_encrypted",
    "store_plain",
    "fetch_plain",
    "store_scanned",
    "fetch_scanned",
    "scan",
    "tls_copy",
    "restic_backup",
    "restic_restore",
    "rclone_copy_to",
    "rclone_copy_back",
]
MANY = [
    "small_store",
    "small_fetch",
    "small_store_one",
    "small_fetch_one",
    "ls_fill",
    "ls",
    "ls_command",
]


def print_report(results: dict[str, Any], console: Console | None = None) -> None:
    if console is None:
        console = Console()
        if not console.is_terminal:
            console.width = 120  # rich's default of 80 columns would fold the tables
    meta, ops = results["meta"], results["operations"]
    size = meta["size_bytes"] / 2**20
    runs = meta["runs"]

    for title, rate, keys, with_unit in (
        (f"One {size:g} MiB file: median of {runs} runs", "MB/s", TRANSFERS, False),
        (f"Many files: median of {runs} runs", "rate", MANY, True),
    ):
        table = Table(title=title)
        table.add_column("operation", no_wrap=True)
        for column in (rate, "min-max", "seconds"):
            table.add_column(column, justify="right", no_wrap=True)
        _memory_columns(table)
        for key in keys:
            if key in ops:
                table.add_row(*_row(ops[key], with_unit=with_unit))
        console.print(table)

    table = Table(title="Ratios of median rates (targets for information)")
    for column in ("ratio", "value", "round by round", "target", "meets it"):
        table.add_column(column, justify="left" if column == "ratio" else "right")
    for r in results["ratios"]:
        value = "not measured" if r["value"] is None else f"{r['value']:.2f}x"
        rounds = r.get("rounds") or []
        spread = f"{min(rounds):.2f}-{max(rounds):.2f}x" if len(rounds) > 1 else ""
        target = "" if r["target"] is None else f">= {r['target']:g}x"
        meets = {True: "yes", False: "NO", None: ""}[r["meets"]]
        table.add_row(r["name"], value, spread, target, meets)
    console.print(table)

    table = Table(
        title="The issue's other targets, judged at this run's sizes (the targets are for "
        "a full run: 1,000 small files, 10,000 names)"
    )
    for column in ("target", "value", "limit", "meets it"):
        table.add_column(column, justify="left" if column == "target" else "right")
    for t in results["targets"]:
        value = "not measured" if t["value"] is None else f"{t['value']:,.2f}"
        limit = f"{'>=' if t['kind'] == 'min' else '<'} {t['target']:g}"
        table.add_row(t["name"], value, limit, {True: "yes", False: "NO", None: ""}[t["meets"]])
    console.print(table)
    if results["cpu_budget"]:
        _print_budget(results["cpu_budget"], console)

    about = [f"splitstore {meta['commit'] or meta['splitstore']}", f"{meta['cpus']} CPUs"]
    about += [f"Python {meta['python']}", meta["openssl"], meta["tls"]]
    console.print(", ".join([*about, *meta["tools"].values()]), highlight=False)
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in meta["phase_seconds"].items())
    console.print(f"time: {meta['seconds']:.0f} s in all ({phases})", highlight=False)
    fp = results.get("false_positives")
    if fp:
        console.print(
            f"false positives at the default policy: {len(fp['flagged'])} of {fp['files']:,} "
            f"ordinary files ({fp['bytes'] / 1e6:,.0f} MB in {fp['seconds']:.0f} s)",
            highlight=False,
        )
        for item in fp["flagged"][:20]:
            console.print(f"  {item['path']}: {item['why']}", highlight=False)
    for note in results["notes"]:
        console.print(f"- {note}", highlight=False)


def _print_budget(budget: dict[str, Any], console: Console) -> None:
    """Each essential step's rate on one core, and what a GiB costs in all of them."""
    mb = budget["step_mb_s"]
    table = Table(title="CPU budget: the steps a store and a fetch cannot skip, each alone")
    table.add_column("step", no_wrap=True)
    for column in ("MB/s, one core", "store s/GiB", "fetch s/GiB"):
        table.add_column(column, justify="right")
    for name, label in STEP_LABELS.items():
        per_gib = 2**30 / (mb[name] * 1e6)
        uses = [budget[op]["steps"].count(name) for op in ("store", "fetch")]
        cells = [f"{n * per_gib:.2f}" if n else "-" for n in uses]
        table.add_row(label, f"{mb[name]:,.0f}", *cells)
    store, fetch = budget["store"], budget["fetch"]
    table.add_row("all of them", "", *(f"{op['cpu_seconds_per_gib']:.2f}" for op in (store, fetch)))
    measured = [op.get("measured_cpu_seconds_per_gib") for op in (store, fetch)]
    table.add_row(
        "used by the encrypted runs (client + servers, fsync and all)",
        "",
        *(_num(m, "{:.2f}") for m in measured),
    )
    cores = budget["cores"]
    table.add_row(
        f"ceiling on {cores} cores if only these ran, spread perfectly: MB/s",
        "",
        *(f"{op['ceiling_mb_s']:,.0f}" for op in (store, fetch)),
    )
    console.print(table)


def _memory_columns(table: Table) -> None:
    for column in ("client MiB", "client CPU", "server MiB", "server CPU"):
        table.add_column(column, justify="right")


def _row(op: dict[str, Any], *, with_unit: bool = False) -> list[str]:
    rate, secs = op["rate"], op["seconds"]
    unit = f" {op['unit']}" if with_unit else ""
    return [
        op["label"],
        f"{rate['median']:,.0f}{unit}" if rate["median"] >= 10 else f"{rate['median']:.2f}{unit}",
        f"{rate['min']:,.0f}-{rate['max']:,.0f}",
        f"{secs['median']:.2f}",
        _num(op["client_peak_mib"], "{:.0f}"),
        _num(op["client_cpu_seconds"], "{:.2f}"),
        _num(op["server_peak_mib"], "{:.0f}"),
        _num(op["server_cpu_seconds"], "{:.2f}"),
    ]


def _num(value: float | None, form: str) -> str:
    return "-" if value is None else form.format(value)


def write_json(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
