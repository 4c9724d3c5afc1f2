"""The ``splitstore`` command line: one clear line on stderr and a non-zero exit on failure.

Exit codes (also in the README): 0 ok, 1 other failure, 2 bad usage or config,
3 not stored, 4 stored data damaged, 5 server unavailable or failing, 6 token or
certificate refused, 7 blocked by the malicious-file checks, 130 interrupted
(``scan`` exits as scanners do: 0 clean, 1 something found, 2 error).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import math
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._cli_many import get_many, put_many
from ._cli_output import configure_logging, show_warning
from ._cli_output import print_json as _print_json
from ._cli_output import size_text as _size
from ._cli_scan import cmd_scan, print_reasons, stored_scan_line, warn_about
from ._client import AsyncClient, FileInfo
from ._config import ENCRYPTION_MODES, ENCRYPTION_OFF, ENCRYPTION_ON, load_config
from ._errors import LocalFileError, SplitStoreError, UsageError
from ._service import ServerLimits
from ._version import __version__
from .scanning import ScanReport

if TYPE_CHECKING:
    from ._progress import TransferProgress

__all__ = ["main"]

EXIT_OK, EXIT_FAILURE, EXIT_INTERRUPTED = 0, 1, 130

Command = Callable[[argparse.Namespace], int]


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:  # run as the program, so this process is ours to set up
        _one_blas_thread()
        _two_malloc_arenas()
    parser = _build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = show_warning
            code: int = args.handler(args)
        return code
    except SplitStoreError as exc:
        _fail(str(exc), args.verbose)
        return exc.exit_code
    except KeyboardInterrupt:
        print("splitstore: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Whoever read our output stopped early (`splitstore ls | head -1`): no message,
        # unless asked for details.
        _silence_stdout()
        if args.verbose:
            _fail("the output was closed early (broken pipe)", True)
        return EXIT_FAILURE
    except Exception as exc:  # a bug: say so in one line, details with -v
        hint = "" if args.verbose else " (run with -v for details)"
        _fail(f"internal error: {type(exc).__name__}: {exc}{hint}", args.verbose)
        return EXIT_FAILURE


def _one_blas_thread() -> None:
    """numpy (only ever used to reshape bytes) starts OpenBLAS's threads on import, and
    they spin for a while: up to about 0.1 s of CPU in a command that stores or fetches,
    a fifth of a small `put`.
    A user's own setting is kept. (The library leaves its host process's BLAS alone.)"""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _two_malloc_arenas() -> None:
    """glibc gives threads that allocate at once arenas of their own, up to eight per
    core, and each keeps what it freed: a store's or fetch's worker threads (reading,
    sealing, hashing, writing) then leave the process larger than its buffers need. Two
    arenas took a scanned 256 MiB `put` from peaks of 125-130 MiB to 118-122, in the same
    time. Before any thread starts, and only where the C library is glibc (the same as
    MALLOC_ARENA_MAX=2, which a user's own setting overrides)."""
    if sys.platform != "linux" or "MALLOC_ARENA_MAX" in os.environ:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(_M_ARENA_MAX, 2)


_M_ARENA_MAX = -8  # glibc's malloc.h


def _fail(message: str, verbose: bool) -> None:
    if verbose:
        traceback.print_exc()
    print(f"splitstore: error: {message}", file=sys.stderr)


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush does not fail again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


# -- client commands ------------------------------------------------------------------


def _with_client(
    args: argparse.Namespace, job: Callable[[AsyncClient], Coroutine[Any, Any, int]]
) -> int:
    config = load_config(args.config)

    async def run() -> int:
        async with AsyncClient(config) as client:
            return await job(client)

    return asyncio.run(run())


def _progress(args: argparse.Namespace, description: str) -> TransferProgress:
    # Imported here: rich costs ~0.1 s of start-up that ls, stat and rm do not need.
    from ._progress import TransferProgress

    return TransferProgress(description, enabled=False if args.quiet else None)


def _cmd_put(args: argparse.Namespace) -> int:
    if len(args.files) > 1:
        return put_many(args, _with_client)
    source = Path(args.files[0])
    # Local mistakes first, before any connection (and "put ." names the real problem).
    if source.is_dir():
        raise LocalFileError(f"{source} is a directory, not a file")
    if not source.exists():
        raise LocalFileError(f"{source} does not exist")

    async def job(client: AsyncClient) -> int:
        name = args.name if args.name is not None else source.name
        with _progress(args, f"storing {name}") as bar:
            started = time.monotonic()
            info = await client.store(
                source, args.name, progress=bar.update, allow_unsafe=args.allow_unsafe
            )
            seconds = time.monotonic() - started
        if info.scan is not None:
            warn_about(info.scan, info.name, overridden=info.scan.verdict == "malicious")
        if args.json:
            _print_json(info.to_json())
        elif not args.quiet:
            print(
                f"stored {info.name!r}: {_size(info.size)} as {info.chunks} chunks "
                f"of {info.chunk_size} bytes, in {seconds:.2f} s"
            )
            rows = [
                (
                    f"{info.chunks_per_server.get(s.kind, 0):,}",
                    _size(info.bytes_per_server.get(s.kind, 0)),
                    s.label,
                )
                for s in client.config.servers
            ]
            wc, wb = (max(len(r[i]) for r in rows) for i in (0, 1))
            for chunks, size, label in rows:
                print(f"  {chunks:>{wc}} chunks  {size:>{wb}}  -> {label}")
        return EXIT_OK

    return _with_client(args, job)


def _cmd_get(args: argparse.Namespace) -> int:
    if len(args.names) > 1:
        return get_many(args, _with_client)
    args.name = args.names[0]

    async def job(client: AsyncClient) -> int:
        stored_scan: list[str] = []

        def on_scan(report: ScanReport, at_store: ScanReport | None) -> None:
            warn_about(report, args.name, overridden=report.verdict == "malicious")
            stored_scan.append(stored_scan_line(at_store))

        with _progress(args, f"fetching {args.name}") as bar:
            path = await client.fetch(
                args.name,
                args.output,
                force=args.force,
                progress=bar.update,
                allow_unsafe=args.allow_unsafe,
                on_scan=on_scan,
            )
        if not args.quiet:
            print(f"fetched {args.name!r} into {path} (every hash checked)")
            for line in stored_scan:
                print(f"  scan: {line}")
        return EXIT_OK

    return _with_client(args, job)


def _cmd_ls(args: argparse.Namespace) -> int:
    async def job(client: AsyncClient) -> int:
        infos = await client.list()
        if args.json:
            _print_json([i.to_json() for i in infos])
            return EXIT_OK
        sys.stdout.writelines(_ls_lines(infos, [s.kind for s in client.config.servers]))
        return EXIT_OK

    return _with_client(args, job)


def _ls_lines(infos: list[FileInfo], kinds: list[str]) -> Iterator[str]:
    """One line per file: size, time stored, name, and where it is missing if anywhere."""
    sizes = [_size(info.size) for info in infos]
    width = max((len(s) for s in sizes), default=0)
    every = tuple(kinds)
    # Files stored together share their second: format each second once, not each line.
    seconds: dict[int, str] = {}
    for info, size in zip(infos, sizes, strict=True):
        second = int(info.stored_at)
        when = seconds.get(second)
        if when is None:
            when = seconds[second] = time.strftime("%Y-%m-%d %H:%M", time.localtime(second))
        partial = ""
        if info.committed_on != every and set(info.committed_on) != set(every):
            partial = f"  (incomplete: only on {', '.join(info.committed_on) or 'no server'})"
        yield f"{size:>{width}}  {when}  {info.name}{partial}\n"


def _cmd_rm(args: argparse.Namespace) -> int:
    async def job(client: AsyncClient) -> int:
        await client.delete(args.name)
        if not args.quiet:
            print(f"deleted {args.name!r} from both servers")
        return EXIT_OK

    return _with_client(args, job)


def _cmd_stat(args: argparse.Namespace) -> int:
    async def job(client: AsyncClient) -> int:
        info = await client.stat(args.name)
        if args.json:
            _print_json(info.to_json())
        else:
            _print_info(info, client)
        return EXIT_OK

    return _with_client(args, job)


def _cmd_verify(args: argparse.Namespace) -> int:
    async def job(client: AsyncClient) -> int:
        with _progress(args, f"verifying {args.name}") as bar:
            try:
                info = await client.verify(args.name, progress=bar.update)
            except SplitStoreError as exc:
                if not args.json:
                    raise
                server = getattr(exc, "server", None)
                _print_json({"name": args.name, "ok": False, "error": str(exc), "server": server})
                return exc.exit_code
        if args.json:
            _print_json({"name": info.name, "ok": True, "size": info.size, "sha256": info.sha256})
        elif not args.quiet:
            print(
                f"{info.name!r} is intact on both servers "
                f"({_size(info.size)}, sha256 {info.sha256})"
            )
        return EXIT_OK

    return _with_client(args, job)


def _print_info(info: FileInfo, client: AsyncClient) -> None:
    stored = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(info.stored_at))
    servers = client.config.servers
    chunks = [f"{info.chunks_per_server.get(s.kind, 0):,}" for s in servers]
    sizes = [f"{info.bytes_per_server.get(s.kind, 0):,}" for s in servers]
    wc, wb = max(map(len, chunks)), max(map(len, sizes))
    print(f"name:       {info.name}")
    print(f"size:       {info.size:,} bytes ({_size(info.size)})")
    print(f"chunks:     {info.chunks:,} of {info.chunk_size:,} bytes")
    for server, c, b in zip(servers, chunks, sizes, strict=True):
        label = f"on {server.kind}:"
        print(f"  {label:<9} {c:>{wc}} chunks, {b:>{wb}} bytes  ({server.label})")
    print(f"stored:     {stored}")
    print(f"sha256:     {info.sha256}")
    print(f"version:    {info.version_id}")
    print(f"committed:  {', '.join(info.committed_on) or 'nowhere'}")
    sealed = "AES-256-GCM, sealed manifest" if info.encrypted else "none (servers can read it)"
    print(f"encryption: {sealed}")
    print(f"scan:       {stored_scan_line(info.scan)}")
    if info.scan is not None:
        print_reasons(info.scan, sys.stdout, every=True)


# -- setup and servers ----------------------------------------------------------------


def _cmd_init(args: argparse.Namespace) -> int:
    from ._keys import ask_new_passphrase, check_passphrase
    from ._setup import init_setup

    if args.passphrase and args.encryption == ENCRYPTION_OFF:
        raise UsageError("--passphrase makes a master key; it cannot go with --encryption none")
    passphrase = None
    if args.passphrase:
        passphrase = ask_new_passphrase()
        check_passphrase(passphrase)  # before any of the setup is written
    paths = init_setup(
        Path(args.dir),
        https_port=args.https_port,
        tcp_port=args.tcp_port,
        host=args.host,
        force=args.force,
        encryption=args.encryption,
        passphrase=passphrase,
    )
    if not args.quiet:
        print(f"wrote a splitstore setup in {paths.root}:")
        print(f"  config       {paths.config}")
        print(f"  token        {paths.token}  (keep it private)")
        if args.encryption == ENCRYPTION_OFF:
            print("  encryption   OFF: the servers can read what is stored (for inspection only)")
        else:
            print(
                f"  key          {paths.key}  (back it up: 'splitstore key export'; "
                "without it nothing stored can be read)"
            )
        print(f"  tenants      {paths.tenants}  (tenant 'default' holds this token)")
        print(f"  CA           {paths.ca_cert}")
        print(f"  data         {paths.https_data}, {paths.tcp_data}")
        print(f"next: splitstore serve --config {paths.config}   (in another terminal)")
    return EXIT_OK


def _cmd_serve(args: argparse.Namespace) -> int:
    from ._serve import ServerSpec, config_specs, run_until_stopped

    if not 0 < args.idle_timeout < math.inf:  # nan and inf included
        raise UsageError("--idle-timeout must be a number of seconds above 0")
    limits = ServerLimits(idle_timeout=args.idle_timeout)
    if args.kind is None:
        alone = [
            option
            for option, value in [
                ("--port", args.port),
                ("--data-dir", args.data_dir),
                ("--cert", args.cert),
                ("--key", args.key),
                ("--token-file", args.token_file),
                ("--tenants-file", args.tenants_file),
                ("--no-tls", args.no_tls or None),
                ("--host", args.host),  # with a config, its own host is where they listen
            ]
            if value is not None
        ]
        if alone:
            raise UsageError(
                f"{', '.join(alone)} only {'apply' if len(alone) > 1 else 'applies'} to one "
                "server alone: "
                "say which ('serve tcp ...' or 'serve https ...')"
            )
        specs = config_specs(load_config(args.config))
    else:
        if args.data_dir is None or args.port is None:
            raise UsageError(f"'serve {args.kind}' needs --data-dir and --port")
        if not 0 <= args.port <= 65535:
            raise UsageError("--port must be from 0 (any free port) to 65535")
        if args.token_file is None and args.tenants_file is None:
            raise UsageError(f"'serve {args.kind}' needs --tenants-file or --token-file")
        tls = not args.no_tls
        if tls and (args.cert is None or args.key is None):
            raise UsageError(f"'serve {args.kind}' needs --cert and --key (or --no-tls for tcp)")
        specs = [
            ServerSpec(
                kind=args.kind,
                host=args.host or "127.0.0.1",
                port=args.port,
                data_dir=Path(args.data_dir),
                token_file=Path(args.token_file) if args.token_file else None,
                tls=tls,
                cert_file=Path(args.cert) if args.cert else None,
                key_file=Path(args.key) if args.key else None,
                tenants_file=Path(args.tenants_file) if args.tenants_file else None,
            )
        ]
    if len(specs) > 1:  # each server on a core of its own
        from ._serve_processes import run_in_processes

        run_in_processes(specs, limits, announce=not args.quiet, verbose=args.verbose)
    else:
        asyncio.run(run_until_stopped(specs, limits, announce=not args.quiet))
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    if not 0 <= args.size_mb < math.inf:  # nan and inf included
        raise UsageError("--size-mb must be a number of MiB, 0 or more")
    workdir = Path(args.workdir).resolve() if args.workdir else None
    return run_demo(workdir, size_mb=args.size_mb, encryption=args.encryption)


def _cmd_key(args: argparse.Namespace) -> int:
    from . import _keys

    config = load_config(args.config)
    if config.key_file is None:
        raise UsageError(f"{config.path or 'the config'} has encryption off: there is no key")
    if args.action == "export":
        text = _keys.export_key(config.key_file)
        if args.output in (None, "-"):
            sys.stdout.write(text)
        else:
            _keys.write_secret_file(Path(args.output), text, force=args.force)
            if not args.quiet:
                print(f"exported the master key to {args.output} (keep it private and safe)")
    elif args.action == "import":
        raw = sys.stdin.read(_keys.MAX_KEY_FILE_BYTES + 1) if args.file == "-" else None
        kid = _keys.import_key(
            config.key_file, Path(args.file) if raw is None else None, raw, force=args.force
        )
        if not args.quiet:
            print(f"imported master key {kid} into {config.key_file}")
    else:
        kf = _keys.read_key_file(config.key_file)
        kind = "passphrase (scrypt)" if kf.kind == "scrypt" else "random key"
        print(f"key file:  {config.key_file}")
        print(f"key id:    {kf.key_id}")
        print(f"kind:      {kind}")
    return EXIT_OK


def _cmd_tenant(args: argparse.Namespace) -> int:
    from . import _tenant_admin as admin

    config = load_config(args.config)
    if args.action == "add":
        quota = admin.parse_size(args.quota) if args.quota is not None else None
        added = admin.add_setup_tenant(config, args.name, quota_bytes=quota, force=args.force)
        if not args.quiet:
            size = added.quota_bytes
            limit = f"a quota of {_size(size)} per server" if size else "no quota"
            print(f"added tenant {added.name!r} ({limit}); the running servers accept it now:")
            print(f"  config       {added.config}")
            print(f"  token        {added.token}  (keep it private)")
            if added.key is not None:
                kept = "kept the existing key; " if added.key_kept else ""
                print(
                    f"  key          {added.key}  ({kept}back it up: without it nothing "
                    "this tenant stores can be read)"
                )
            for inherited in added.inherited:
                print(f"  note: it sees the files left in {inherited}")
            print(f"next: splitstore --config {added.config} put FILE")
    elif args.action == "revoke":
        holding = admin.revoke_setup_tenant(config, args.name)
        if not args.quiet:
            print(f"revoked tenant {args.name!r}: the servers refuse its token from now on")
            if holding:
                print("its stored files are kept; to remove them, delete on each server:")
                for folder in holding:
                    print(f"  {folder}")
    else:
        rows = admin.list_setup_tenants(config)
        kinds = [s.kind for s in config.servers]
        table = [("tenant", "quota", *kinds)] + [
            (
                r.name,
                _size(r.quota_bytes) if r.quota_bytes else "none",
                *(_size(r.stored[k]) if k in r.stored else "?" for k in kinds),
            )
            for r in rows
        ]
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        for row in table:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return EXIT_OK


# -- parser ---------------------------------------------------------------------------


def _build_parser() -> argparse.ArgumentParser:
    common = _common_options(suppress=False)
    # Options repeated after the command must not reset those given before it.
    sub_common = _common_options(suppress=True)

    parser = argparse.ArgumentParser(
        prog="splitstore",
        description="Store files split across an HTTPS server and a TCP server.",
        epilog="exit codes: 0 ok, 1 failure, 2 usage/config, 3 not stored, 4 data damaged, "
        "5 server unavailable, 6 token or certificate refused, 7 blocked by the malicious-file "
        "checks, 130 interrupted",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"splitstore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def action(
        actions: Any, name: str, help: str, description: str, example: str
    ) -> argparse.ArgumentParser:
        """One ACTION of a command that has several (key, tenant)."""
        parser: argparse.ArgumentParser = actions.add_parser(
            name,
            parents=[sub_common],
            help=help,
            description=description,
            epilog=f"example:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        return parser

    def command(name: str, handler: Command, help: str, example: str) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help,
            description=help,
            parents=[sub_common],
            epilog=f"example:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(handler=handler)
        return p

    p = command(
        "init",
        _cmd_init,
        "write a ready local setup (config, CA, certificate, token)",
        "splitstore init --dir ~/splitstore",
    )
    p.add_argument("--dir", default=".", help="folder to write the setup into (default: .)")
    p.add_argument("--force", action="store_true", help="overwrite an existing setup (keeps data)")
    p.add_argument("--host", default="127.0.0.1", help="address the servers listen on")
    p.add_argument("--https-port", type=int, default=7443, help="(default: 7443)")
    p.add_argument("--tcp-port", type=int, default=7444, help="(default: 7444)")
    p.add_argument(
        "--encryption",
        choices=ENCRYPTION_MODES,
        default=ENCRYPTION_ON,
        help="end-to-end encryption of stored files (default: on); 'none' stores the raw "
        "chunks, readable by the servers, for inspection and teaching",
    )
    p.add_argument(
        "--passphrase",
        action="store_true",
        help="derive the master key from a passphrase (scrypt) instead of a random key: "
        "asked at the terminal, or read from $SPLITSTORE_PASSPHRASE",
    )

    p = command(
        "serve",
        _cmd_serve,
        "run both servers of a config, or one server alone",
        "splitstore serve --config splitstore.toml\n"
        "  splitstore serve tcp --data-dir server_files/tcp --port 7444 \\\n"
        "      --cert tls/server.pem --key tls/server-key.pem --token-file token",
    )
    p.add_argument(
        "kind",
        nargs="?",
        choices=["https", "tcp"],
        help="run only this server, set up by the options below instead of a config",
    )
    p.add_argument(
        "--host", help="one server: address to listen on (default 127.0.0.1; 0.0.0.0: all)"
    )
    p.add_argument("--port", type=int, help="one server: port to listen on")
    p.add_argument("--data-dir", metavar="DIR", help="one server: folder to store data in")
    p.add_argument("--cert", metavar="PEM", help="one server: TLS certificate")
    p.add_argument("--key", metavar="PEM", help="one server: the certificate's private key")
    p.add_argument("--token-file", metavar="PATH", help="one server: file holding the token")
    p.add_argument(
        "--tenants-file",
        metavar="PATH",
        help="one server: the tenants file (instead of --token-file)",
    )
    p.add_argument("--no-tls", action="store_true", help="tcp only: plain TCP (insecure)")
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=60.0,
        help="seconds before an idle or stalled client is dropped (default: 60)",
    )

    p = command(
        "put",
        _cmd_put,
        "store a file, or several (small ones share requests)",
        "splitstore put holiday.mp4 --name videos/holiday.mp4\n  splitstore put notes/*.txt",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="the local files to store")
    p.add_argument(
        "--name", help="name to store a single FILE under (default: each file's base name)"
    )
    p.add_argument("--json", action="store_true", help="print what was stored as JSON")
    _allow_unsafe(p, "store a file the malicious-file checks block (after a warning)")

    p = command(
        "get",
        _cmd_get,
        "fetch a stored file, or several",
        "splitstore get holiday.mp4 -o restored.mp4\n  splitstore get a.txt b.txt -o restored/",
    )
    p.add_argument("names", nargs="+", metavar="NAME", help="the stored names")
    p.add_argument(
        "-o",
        "--output",
        help="file or folder to write (default: ./BASENAME); with several names, a folder",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    _allow_unsafe(p, "deliver a file the malicious-file checks block (after a warning)")

    p = command(
        "scan",
        cmd_scan,
        "check local files for malware, as put and get do (exit 0 clean, 1 found, 2 error)",
        "splitstore scan download.zip report.pdf --json",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="the files to scan")
    p.add_argument("--json", action="store_true", help="print the verdicts as JSON")

    p = command("ls", _cmd_ls, "list stored files", "splitstore ls --json")
    p.add_argument("--json", action="store_true", help="print the list as JSON")

    p = command(
        "rm", _cmd_rm, "delete a stored file from both servers", "splitstore rm holiday.mp4"
    )
    p.add_argument("name", help="the stored name")

    p = command("stat", _cmd_stat, "show how a file is stored", "splitstore stat holiday.mp4")
    p.add_argument("name", help="the stored name")
    p.add_argument("--json", action="store_true", help="print the details as JSON")

    p = command(
        "verify",
        _cmd_verify,
        "check both servers still hold intact, complete data",
        "splitstore verify holiday.mp4",
    )
    p.add_argument("name", help="the stored name")
    p.add_argument("--json", action="store_true", help="print the outcome as JSON")

    p = command(
        "demo",
        _cmd_demo,
        "store and fetch a sample file through two local servers",
        "splitstore demo --workdir /tmp/splitstore-demo",
    )
    p.add_argument("--workdir", help="keep the demo's setup here (default: a temporary folder)")
    p.add_argument(
        "--size-mb", type=float, default=4.0, help="size of the sample file (default: 4)"
    )
    p.add_argument(
        "--encryption",
        choices=ENCRYPTION_MODES,
        default=ENCRYPTION_ON,
        help="'none' shows the raw chunks on the servers instead of ciphertext",
    )

    p = command(
        "key",
        _cmd_key,
        "back up, restore or show the master key that encrypts stored files",
        "splitstore key export -o splitstore-key.backup\n"
        "  splitstore key import splitstore-key.backup   (on another machine)",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = action(
        actions,
        "export",
        "write the master key to stdout or a file, to back it up or move it",
        "Write the master key (the raw key, even for a passphrase key file) "
        "to stdout or a file made readable only by you. Anyone with it can read every file "
        "this setup stores: keep the copy offline.",
        "splitstore key export -o /media/usb/splitstore-key.backup",
    )
    a.add_argument("-o", "--output", metavar="FILE", help="write here (default: stdout)")
    a.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    a = action(
        actions,
        "import",
        "install an exported key as this config's key_file",
        "Install a key written by 'key export' (or a key file) as this "
        "config's key_file. Refuses to replace a different key without --force.",
        "splitstore key import splitstore-key.backup",
    )
    a.add_argument("file", help="the exported key ('-' for stdin)")
    a.add_argument(
        "--force", action="store_true", help="replace a different key (files it sealed are lost)"
    )
    action(
        actions,
        "show",
        "show the key file, its key id and kind (never the key)",
        "Show where the master key is, its public key id and kind.",
        "splitstore key show",
    )

    p = command(
        "tenant",
        _cmd_tenant,
        "add, revoke or list the users (tenants) of a setup's servers",
        "splitstore tenant add alice --quota 10G\n"
        "  splitstore --config alice.toml put report.pdf\n"
        "  splitstore tenant revoke alice",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = action(
        actions,
        "add",
        "issue a token, key and client config (NAME.toml) for a new tenant",
        "Issue a token, master key and client config for a new tenant, beside "
        "the setup's config. Running servers accept it at once.",
        "splitstore tenant add alice --quota 10G",
    )
    a.add_argument("name", help="1 to 63 of a-z, 0-9, '-', '_'")
    a.add_argument(
        "--quota",
        metavar="SIZE",
        help="most bytes it may store on each server, e.g. 500M or 10G (K, M, G, T are "
        "powers of 1024; default: no limit)",
    )
    a.add_argument(
        "--force",
        action="store_true",
        help="replace the token and files of an existing tenant (its key is kept)",
    )
    a = action(
        actions,
        "revoke",
        "take a tenant's token back (its stored files stay on the servers)",
        "Remove a tenant: the servers refuse its token from its next request on. "
        "Its stored files stay on disk until you delete them.",
        "splitstore tenant revoke alice",
    )
    a.add_argument("name", help="the tenant's name")
    action(
        actions,
        "list",
        "show each tenant's quota and what it stores",
        "Show each tenant's quota and the bytes it stores on each server "
        "(where the data folders are on this machine).",
        "splitstore tenant list",
    )
    return parser


def _common_options(*, suppress: bool) -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    default: Any = argparse.SUPPRESS if suppress else None
    flag: Any = argparse.SUPPRESS if suppress else False
    common.add_argument(
        "--config",
        metavar="PATH",
        default=default,
        help="config file (default: $SPLITSTORE_CONFIG, ./splitstore.toml, "
        "~/.config/splitstore/config.toml)",
    )
    common.add_argument(
        "-v", "--verbose", action="store_true", default=flag, help="debug logs and tracebacks"
    )
    common.add_argument(
        "-q", "--quiet", action="store_true", default=flag, help="no progress bar, less output"
    )
    return common


def _allow_unsafe(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--allow-unsafe", action="store_true", help=help)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
