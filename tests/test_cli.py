"""The ``splitstore`` command line: output, exit codes, one-line errors, config discovery,
``serve`` as a real process, ``demo``, and the progress bar."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from rich.console import Console

from splitstore import _progress
from splitstore._cli import main
from splitstore._cli_output import print_json
from splitstore._client import AsyncClient, FileInfo
from splitstore._progress import TransferProgress
from splitstore._setup import free_loopback_port as free_port
from splitstore._setup import init_setup
from splitstore._version import __version__

from .conftest import LiveServers

COMMANDS = ["init", "serve", "put", "get", "ls", "rm", "stat", "verify", "demo", "tenant"]


@pytest.fixture(autouse=True)
def clean_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No config from the person running the tests: no $SPLITSTORE_CONFIG, an empty
    XDG_CONFIG_HOME, and a working folder without splitstore.toml."""
    monkeypatch.delenv("SPLITSTORE_CONFIG", raising=False)
    (tmp_path / "xdg").mkdir()
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error(err: str, *fragments: str) -> str:
    """``err`` is exactly one "splitstore: error:" line, holding every fragment."""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("splitstore: error: "), err
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def write_file(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


def client_config(
    servers: LiveServers, dest: Path, *, token: Path | None = None, ca: Path | None = None
) -> Path:
    """A client-only config with absolute paths, so it works from any folder."""
    https, tcp = servers.config.servers
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(
        f"token_file = {json.dumps(str(token or servers.paths.token))}\n"
        f"ca_file = {json.dumps(str(ca or servers.paths.ca_cert))}\n"
        + (f"key_file = {json.dumps(str(servers.paths.key))}\n" if servers.config.encrypted else "")
        + f'[[servers]]\nkind = "https"\nhost = "127.0.0.1"\nport = {https.port}\n'
        f'[[servers]]\nkind = "tcp"\nhost = "127.0.0.1"\nport = {tcp.port}\n'
    )
    return dest


@pytest.fixture
def cfg(servers: LiveServers) -> str:
    return str(servers.config_path)


# -- client commands --------------------------------------------------------------------


def test_put_then_get(
    servers: LiveServers, cfg: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_file(tmp_path / "in.bin", 5000)
    code, out, err = run(capsys, "--config", cfg, "put", tmp_path / "in.bin")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].startswith("stored 'in.bin': 4.9 KiB as 5 chunks of 1024 bytes, in ")
    # one line per server, in config order, with its chunks and bytes, columns aligned
    assert len(lines) == 3
    assert re.fullmatch(r"  3 chunks  2\.9 KiB  -> https server at 127\.0\.0\.1:\d+", lines[1])
    assert re.fullmatch(r"  2 chunks  2\.0 KiB  -> tcp server at 127\.0\.0\.1:\d+", lines[2])

    out_path = tmp_path / "out.bin"
    code, out, err = run(capsys, "--config", cfg, "get", "in.bin", "-o", out_path)
    assert (code, err) == (0, "")
    first, scan = out.splitlines()
    assert first == f"fetched 'in.bin' into {out_path} (every hash checked)"
    assert scan.startswith("  scan: clean when stored (")  # what the scan found at put
    assert out_path.read_bytes() == data

    # an existing output is kept unless --force
    out_path.write_bytes(b"mine")
    code, out, err = run(capsys, "--config", cfg, "get", "in.bin", "-o", out_path)
    assert (code, out) == (2, "")
    one_error(err, str(out_path), "already exists", "--force")
    assert out_path.read_bytes() == b"mine"
    code, _, err = run(capsys, "--config", cfg, "get", "in.bin", "-o", out_path, "--force")
    assert (code, err) == (0, "")
    assert out_path.read_bytes() == data


def test_put_and_get_of_several_files(
    servers: LiveServers, cfg: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = [tmp_path / f"n{i}.txt" for i in range(12)]
    data = [write_file(f, 3000 + i) for i, f in enumerate(files)]
    code, out, err = run(capsys, "--config", cfg, "put", *files)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    wanted = [f"stored {f.name!r}: {(3000 + i) / 1024:.1f} KiB" for i, f in enumerate(files)]
    assert sorted(lines[:-1]) == sorted(wanted)  # in the order they end
    assert re.fullmatch(r"stored 12 of 12 files \(35\.2 KiB\) in [\d.]+ s, .*", lines[-1])

    out_dir = tmp_path / "restored"
    out_dir.mkdir()
    names = [f.name for f in files]
    code, out, err = run(capsys, "--config", cfg, "get", *names, "-o", out_dir)
    assert (code, err) == (0, "")
    assert out.splitlines()[-1].startswith("fetched 12 of 12 files in ")
    assert [(out_dir / n).read_bytes() for n in names] == data

    # One bad file of several: the others go through, each failure gets its own line.
    code, out, err = run(capsys, "--config", cfg, "put", files[0], tmp_path / "nope", files[1])
    assert code == 2
    errors = err.splitlines()
    assert len(errors) == 2
    assert "nope" in errors[0]
    assert errors[1] == "splitstore: error: 1 of 3 files were not stored (each is named above)"
    assert out.splitlines()[-1].startswith("stored 2 of 3 files")
    code, out, err = run(capsys, "--config", cfg, "get", "n0.txt", "never", "-o", out_dir)
    assert code == 2  # n0.txt exists already there: refused without --force
    assert len(err.splitlines()) == 3
    code, out, err = run(
        capsys, "--config", cfg, "get", "n0.txt", "never", "-o", out_dir, "--force"
    )
    assert code == 3  # not found
    assert "never" in err.splitlines()[0]

    code, out, err = run(capsys, "--config", cfg, "put", *files[:2], "--name", "x")
    assert code == 2
    one_error(err, "--name", "single FILE")
    code, out, err = run(capsys, "--config", cfg, "get", "n0.txt", "n1.txt", "-o", files[0])
    assert code == 2
    one_error(err, "not a folder")

    code, out, err = run(capsys, "--config", cfg, "put", *files[:2], tmp_path / "nope", "--json")
    doc = json.loads(out)
    assert [d.get("name") for d in doc[:2]] == ["n0.txt", "n1.txt"]
    assert doc[2]["file"].endswith("nope")
    assert "error" in doc[2]


def test_get_into_current_folder(
    servers: LiveServers, cfg: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_file(tmp_path / "in.bin", 100)
    assert run(capsys, "--config", cfg, "put", tmp_path / "in.bin", "--name", "a/b.txt")[0] == 0
    code, out, err = run(capsys, "--config", cfg, "get", "a/b.txt")
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == "fetched 'a/b.txt' into b.txt (every hash checked)"
    assert Path("b.txt").read_bytes() == data


def test_put_json_and_name(
    servers: LiveServers, cfg: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_file(tmp_path / "in.bin", 3000)
    code, out, err = run(
        capsys, "--config", cfg, "put", tmp_path / "in.bin", "--name", "dir/a b ü.bin", "--json"
    )
    assert (code, err) == (0, "")
    doc = json.loads(out)
    assert doc["name"] == "dir/a b ü.bin"
    assert doc["size"] == 3000
    assert doc["chunk_size"] == 1024
    assert doc["chunks"] == 3
    assert doc["chunks_per_server"] == {"https": 2, "tcp": 1}
    assert doc["bytes_per_server"] == {"https": 1024 + 952 + 16, "tcp": 1024}  # + GCM tag
    assert doc["sha256"] == hashlib.sha256(data).hexdigest()
    assert doc["committed_on"] == ["https", "tcp"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", doc["stored_at"])
    assert doc["encrypted"] is True
    # Every field of FileInfo is in the JSON, and nothing else.
    assert set(doc) == {f.name for f in dataclasses.fields(FileInfo)}


def test_ls(
    servers: LiveServers, cfg: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, "--config", cfg, "ls") == (0, "", "")
    code, out, _ = run(capsys, "--config", cfg, "ls", "--json")
    assert (code, json.loads(out)) == (0, [])

    sizes = {"empty": 0, "small": 5, "medium name.txt": 3000, "big": 2 * 1024 * 1024 + 1}
    for name, size in sizes.items():
        write_file(tmp_path / "f", size)
        assert run(capsys, "--config", cfg, "put", tmp_path / "f", "--name", name, "-q")[0] == 0

    code, out, err = run(capsys, "--config", cfg, "ls")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert [line.split("  ")[-1] for line in lines] == sorted(sizes)
    assert [line.split()[0:2] for line in lines] == [
        ["2.0", "MiB"],
        ["0", "B"],
        ["2.9", "KiB"],
        ["5", "B"],
    ]
    # right-aligned sizes, then the date and name in the same columns on every line
    date = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d")
    starts = {m.start() for line in lines if (m := date.search(line))}
    assert starts == {len("2.0 MiB  ")}

    code, out, _ = run(capsys, "--config", cfg, "ls", "--json")
    listed = json.loads(out)
    assert code == 0
    assert [d["name"] for d in listed] == sorted(sizes)
    assert {d["name"]: d["size"] for d in listed} == sizes

    # a file whose store reached only one server is flagged
    shutil.rmtree(servers.object_dir("tcp", "small"))
    code, out, _ = run(capsys, "--config", cfg, "ls")
    assert code == 0
    assert out.splitlines()[3].endswith("  small  (incomplete: only on https)")
    assert "incomplete" not in "".join(out.splitlines()[:3])


def test_rm(
    servers: LiveServers, cfg: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_file(tmp_path / "x", 10)
    assert run(capsys, "--config", cfg, "put", tmp_path / "x")[0] == 0
    assert run(capsys, "--config", cfg, "rm", "x") == (0, "deleted 'x' from both servers\n", "")
    assert run(capsys, "--config", cfg, "ls") == (0, "", "")
    code, out, err = run(capsys, "--config", cfg, "rm", "x")
    assert (code, out) == (3, "")
    one_error(err, "no file named 'x' is stored")


def test_stat(
    servers: LiveServers, cfg: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_file(tmp_path / "x", 3000)
    digest = hashlib.sha256(data).hexdigest()
    assert run(capsys, "--config", cfg, "put", tmp_path / "x", "--name", "doc")[0] == 0

    code, out, err = run(capsys, "--config", cfg, "stat", "doc")
    assert (code, err) == (0, "")
    fields = dict(line.split(":", 1) for line in out.splitlines() if not line.startswith(" "))
    fields = {k: v.strip() for k, v in fields.items()}
    assert fields["name"] == "doc"
    assert fields["size"] == "3,000 bytes (2.9 KiB)"
    assert fields["chunks"] == "3 of 1,024 bytes"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d.*", fields["stored"])
    assert fields["sha256"] == digest
    assert fields["committed"] == "https, tcp"
    per_server = [line for line in out.splitlines() if line.startswith(" ")]
    assert len(per_server) == 2
    assert re.fullmatch(
        r"  on https: +2 chunks, 1,992 bytes  \(https server at 127\.0\.0\.1:\d+\)", per_server[0]
    )
    assert re.fullmatch(
        r"  on tcp: +1 chunks, 1,024 bytes  \(tcp server at 127\.0\.0\.1:\d+\)", per_server[1]
    )
    assert per_server[0].index("chunks") == per_server[1].index("chunks")

    code, out, err = run(capsys, "--config", cfg, "stat", "doc", "--json")
    assert (code, err) == (0, "")
    doc = json.loads(out)
    assert (doc["name"], doc["size"], doc["chunks"], doc["sha256"]) == ("doc", 3000, 3, digest)
    assert doc["chunks_per_server"] == {"https": 2, "tcp": 1}
    assert doc["bytes_per_server"] == {"https": 1992, "tcp": 1024}
    assert "stored_at" in doc


def test_verify_intact_and_damaged(
    servers: LiveServers, cfg: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_file(tmp_path / "x", 10_000)
    digest = hashlib.sha256(data).hexdigest()
    assert run(capsys, "--config", cfg, "put", tmp_path / "x")[0] == 0

    code, out, err = run(capsys, "--config", cfg, "verify", "x")
    assert (code, err) == (0, "")
    assert out == f"'x' is intact on both servers (9.8 KiB, sha256 {digest})\n"
    code, out, _ = run(capsys, "--config", cfg, "verify", "x", "--json")
    assert code == 0
    assert json.loads(out) == {"name": "x", "ok": True, "size": 10_000, "sha256": digest}

    stripe = servers.stripe_path("tcp", "x")
    damaged = bytearray(stripe.read_bytes())
    damaged[100] ^= 0xFF
    stripe.write_bytes(bytes(damaged))

    code, out, err = run(capsys, "--config", cfg, "verify", "x")
    assert (code, out) == (4, "")
    one_error(err, "tcp server", "damaged")
    code, out, err = run(capsys, "--config", cfg, "verify", "x", "--json")
    assert (code, err) == (4, "")
    doc = json.loads(out)
    assert doc["ok"] is False
    assert doc["name"] == "x"
    assert "tcp server" in doc["server"]
    assert "damaged" in doc["error"]

    code, out, err = run(capsys, "--config", cfg, "get", "x", "-o", tmp_path / "out")
    assert (code, out) == (4, "")
    one_error(err, "damaged", "nothing was written")
    assert not (tmp_path / "out").exists()


def test_quiet_commands_print_nothing(
    servers: LiveServers, cfg: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_file(tmp_path / "x", 2000)
    assert run(capsys, "-q", "--config", cfg, "put", tmp_path / "x") == (0, "", "")
    assert run(capsys, "-q", "--config", cfg, "get", "x", "-o", tmp_path / "o") == (0, "", "")
    assert run(capsys, "-q", "--config", cfg, "verify", "x") == (0, "", "")
    assert run(capsys, "-q", "--config", cfg, "rm", "x") == (0, "", "")


# -- failures: one line on stderr, the documented exit code -----------------------------


def test_put_missing_file_and_directory(
    servers: LiveServers, cfg: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "--config", cfg, "put", tmp_path / "nothere")
    assert (code, out) == (2, "")
    one_error(err, "nothere", "does not exist")
    for folder in (tmp_path, Path("."), Path("/")):
        code, out, err = run(capsys, "--config", cfg, "put", folder)
        assert (code, out) == (2, "")
        one_error(err, "is a directory")


@pytest.mark.parametrize(
    "argv",
    [["get", "nope"], ["stat", "nope"], ["verify", "nope"], ["rm", "nope"]],
    ids=lambda a: a[0],
)
def test_unstored_name(
    servers: LiveServers, cfg: str, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    code, out, err = run(capsys, "--config", cfg, *argv)
    assert (code, out) == (3, "")
    one_error(err, "no file named 'nope' is stored")
    assert not Path("nope").exists()


def test_missing_config(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "ls")
    assert (code, out) == (2, "")
    one_error(err, "no config found", "splitstore init")


def test_config_file_that_does_not_exist(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "--config", tmp_path / "missing.toml", "ls")
    assert code == 2
    one_error(err, "missing.toml", "does not exist")


@pytest.mark.parametrize(
    "argv", [["ls"], ["put", "file"], ["get", "x"], ["verify", "x"]], ids=lambda a: a[0]
)
def test_server_down(
    servers: LiveServers,
    cfg: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
) -> None:
    Path("file").write_bytes(b"abc")
    servers.stop()
    code, out, err = run(capsys, "--config", cfg, *argv)
    assert (code, out) == (5, "")
    one_error(err, "cannot connect", "server at 127.0.0.1:")


def test_one_server_down(
    servers: LiveServers, cfg: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_file(tmp_path / "x", 3000)
    assert run(capsys, "--config", cfg, "put", tmp_path / "x")[0] == 0
    servers.stop("tcp")
    for argv in (["get", "x", "-o", tmp_path / "out"], ["put", tmp_path / "x"], ["ls"]):
        code, out, err = run(capsys, "--config", cfg, *argv)
        assert (code, out) == (5, "")
        one_error(err, "tcp server")
    assert not (tmp_path / "out").exists()
    code, out, err = run(capsys, "--config", cfg, "verify", "x", "--json")
    assert (code, err) == (5, "")
    assert json.loads(out)["ok"] is False


def test_wrong_token(
    servers: LiveServers, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "wrong-token").write_text("not-the-token\n")
    config = client_config(servers, tmp_path / "c.toml", token=tmp_path / "wrong-token")
    write_file(tmp_path / "x", 10)
    for argv in (["ls"], ["put", tmp_path / "x"], ["stat", "x"]):
        code, out, err = run(capsys, "--config", config, *argv)
        assert (code, out) == (6, "")
        one_error(err, "refused the access token")


def test_untrusted_certificate(
    servers: LiveServers, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = init_setup(tmp_path / "other", https_port=free_port(), tcp_port=free_port())
    config = client_config(servers, tmp_path / "c.toml", ca=other.ca_cert)
    code, out, err = run(capsys, "--config", config, "ls")
    assert (code, out) == (6, "")
    one_error(err)


def test_internal_error_is_one_line_unless_verbose(
    servers: LiveServers,
    cfg: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    async def boom(self: AsyncClient) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(AsyncClient, "list", boom)
    code, out, err = run(capsys, "--config", cfg, "ls")
    assert (code, out) == (1, "")
    one_error(err, "internal error: RuntimeError: boom", "-v")
    code, out, err = run(capsys, "--config", cfg, "ls", "-v")
    assert code == 1
    assert "Traceback" in err
    assert err.splitlines()[-1].startswith("splitstore: error: internal error: RuntimeError")


class ClosedPipe(io.StringIO):
    """stdout piped into a reader that has gone away, like ``splitstore ls | head -1``."""

    def write(self, s: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")


def test_output_pipe_closed_early(
    servers: LiveServers,
    cfg: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    write_file(tmp_path / "x", 10)
    assert run(capsys, "--config", cfg, "put", tmp_path / "x", "-q")[0] == 0
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["--config", cfg, "ls"]) == 1
    assert capsys.readouterr().err == ""
    assert main(["--config", cfg, "ls", "-v"]) == 1
    assert "broken pipe" in capsys.readouterr().err.splitlines()[-1]


# -- config discovery and option placement ----------------------------------------------


def broken_config(path: Path) -> str:
    """A config file that exists but is not TOML, so using it fails with its own name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("this is [not toml\n")
    return str(path)


@pytest.mark.parametrize("where", ["option", "env", "cwd", "xdg"])
def test_config_discovery(
    servers: LiveServers,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    where: str,
) -> None:
    """Each place is used when the ones before it are empty, ahead of the ones after it."""
    write_file(tmp_path / "x", 10)
    servers.client().store(tmp_path / "x", "found-it")
    good = client_config(servers, tmp_path / "good" / "c.toml")
    xdg_file = tmp_path / "xdg" / "splitstore" / "config.toml"
    places = ["option", "env", "cwd", "xdg"]
    argv: list[str] = []
    for place in places[places.index(where) :]:
        use_good = place == where
        if place == "option":
            argv = ["--config", str(good)]
        elif place == "env":
            value = str(good) if use_good else broken_config(tmp_path / "env.toml")
            monkeypatch.setenv("SPLITSTORE_CONFIG", value)
        elif place == "cwd":
            target = Path("splitstore.toml")
            if use_good:
                target.write_text(good.read_text())
            else:
                broken_config(target)
        elif use_good:
            xdg_file.parent.mkdir(parents=True)
            xdg_file.write_text(good.read_text())
        else:
            broken_config(xdg_file)
    code, out, err = run(capsys, *argv, "ls")
    assert (code, err) == (0, "")
    assert out.rstrip().endswith("found-it")


def test_config_discovery_uses_home_config_without_xdg(
    servers: LiveServers,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    client_config(servers, tmp_path / "home" / ".config" / "splitstore" / "config.toml")
    assert run(capsys, "ls") == (0, "", "")


@pytest.mark.parametrize(
    "argv",
    [
        ["-q", "--config", "{cfg}", "put", "{file}"],
        ["put", "{file}", "-q", "--config", "{cfg}"],
        ["-q", "put", "{file}", "--config", "{cfg}"],
        ["--config", "{cfg}", "put", "-q", "{file}"],
    ],
)
def test_options_before_and_after_the_command(
    servers: LiveServers,
    cfg: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
) -> None:
    write_file(tmp_path / "x", 10)
    values = {"cfg": cfg, "file": str(tmp_path / "x")}
    assert run(capsys, *(a.format(**values) for a in argv)) == (0, "", "")
    code, out, _ = run(capsys, "ls", "--config", cfg)
    assert code == 0
    assert out.rstrip().endswith("  x")


def test_verbose_after_the_command(
    servers: LiveServers, cfg: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "--config", cfg, "stat", "nope", "-v")
    assert code == 3
    assert "Traceback" in err  # -v after the command is honoured too


# -- init, --version, --help ------------------------------------------------------------


def test_init(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    setup = tmp_path / "setup"
    code, out, err = run(capsys, "init", "--dir", setup, "--https-port", "9443")
    assert (code, err) == (0, "")
    for part in ("splitstore.toml", "token", "tls/ca.pem", "tls/server.pem", "server_files/tcp"):
        assert (setup / part).exists(), part
    assert str(setup / "splitstore.toml") in out
    assert "splitstore serve --config" in out
    assert "port = 9443" in (setup / "splitstore.toml").read_text()

    token = (setup / "token").read_text()
    code, out, err = run(capsys, "init", "--dir", setup)
    assert (code, out) == (2, "")
    one_error(err, "already holds a splitstore setup", "--force")
    assert (setup / "token").read_text() == token

    code, _, err = run(capsys, "init", "--dir", setup, "--force", "-q")
    assert (code, err) == (0, "")
    assert (setup / "token").read_text() != token


def test_init_bad_ports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(
        capsys, "init", "--dir", tmp_path, "--https-port", "7000", "--tcp-port", "7000"
    )
    assert code == 2
    one_error(err, "different ports")


def test_init_with_a_short_passphrase_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPLITSTORE_PASSPHRASE", "short")
    code, _, err = run(capsys, "init", "--dir", tmp_path / "setup", "--passphrase")
    assert code == 2
    one_error(err, "at least 8 characters")
    assert not (tmp_path / "setup").exists()


def test_init_force_with_a_passphrase_never_leaves_the_old_key_unprotected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """init keeps an existing key (stored files need it): asked for a passphrase too, it
    says so rather than ignore it and leave the key as it was without a word."""
    setup = tmp_path / "setup"
    assert run(capsys, "init", "--dir", setup, "-q")[0] == 0
    key = (setup / "key").read_text()
    monkeypatch.setenv("SPLITSTORE_PASSPHRASE", "correct horse battery")
    code, _, err = run(capsys, "init", "--dir", setup, "--force", "--passphrase")
    assert code == 2
    one_error(err, "already has a master key", "leave --passphrase out")
    assert (setup / "key").read_text() == key


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "tcp", "--port", "70000", "--data-dir", "d", "--no-tls", "--token-file", "t"],
        ["serve", "--idle-timeout", "nan"],
        ["serve", "--idle-timeout", "inf"],
        ["demo", "--size-mb", "inf"],
        ["demo", "--size-mb", "nan"],
    ],
)
def test_out_of_range_numbers_are_one_clear_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
) -> None:
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    code, _, err = run(capsys, *argv)
    assert code == 2
    one_error(err, "must be")
    assert list((tmp_path / "here").iterdir()) == []  # nothing was made


def test_serve_with_a_config_refuses_a_host_it_would_ignore(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With a config, the servers listen on its hosts: --host was dropped without a word."""
    code, _, err = run(capsys, "serve", "--host", "0.0.0.0")
    assert code == 2
    one_error(err, "--host only applies to one server alone")


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"splitstore {__version__}\n"


def test_top_level_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert re.search(rf"^    {command} +\S", out, re.MULTILINE), command
    assert "exit codes:" in out


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help_has_an_example(capsys: pytest.CaptureFixture[str], command: str) -> None:
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: splitstore {command} ")
    example = out.split("\nexample:\n", 1)[1]
    assert f"  splitstore {command}" in example


def test_bad_usage_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in ([], ["frobnicate"], ["put"], ["get", "x", "--bogus"]):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert err.splitlines()[-1].startswith("splitstore")
        assert "Traceback" not in err


def test_serve_options_need_a_server_kind(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "serve", "--port", "7444", "--no-tls")
    assert code == 2
    one_error(err, "--port, --no-tls", "serve tcp")
    code, _, err = run(capsys, "serve", "tcp", "--port", "7444")
    assert code == 2
    one_error(err, "needs --data-dir")


# -- serve as a real process ------------------------------------------------------------


def wait_for_ports(proc: subprocess.Popen[str], *ports: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    waiting = set(ports)
    while waiting:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"serve exited with {proc.returncode}:\n{out}\n{err}")
        for port in list(waiting):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    waiting.discard(port)
            except OSError:
                pass
        if waiting:
            if time.monotonic() > deadline:
                pytest.fail(f"ports {sorted(waiting)} never accepted a connection")
            time.sleep(0.05)


Spawn = Callable[..., "subprocess.Popen[str]"]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str | Path) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "splitstore", *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def stop(proc: subprocess.Popen[str]) -> tuple[str, str]:
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, (out, err)
    assert "shutting down" in out
    return out, err


def roundtrip_through_cli(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_file(tmp_path / "payload", 200_000)
    assert run(capsys, "--config", config, "put", tmp_path / "payload")[0] == 0
    code, _, err = run(capsys, "--config", config, "get", "payload", "-o", tmp_path / "back")
    assert (code, err) == (0, "")
    assert (tmp_path / "back").read_bytes() == data


def make_setup(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, int, int]:
    https_port, tcp_port = free_port(), free_port()
    code, _, _ = run(
        capsys,
        "init",
        "--dir",
        tmp_path / "setup",
        "--https-port",
        str(https_port),
        "--tcp-port",
        str(tcp_port),
    )
    assert code == 0
    return tmp_path / "setup", https_port, tcp_port


def test_serve_config(spawn: Spawn, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    setup, https_port, tcp_port = make_setup(tmp_path, capsys)
    proc = spawn("serve", "--config", setup / "splitstore.toml")
    wait_for_ports(proc, https_port, tcp_port)
    roundtrip_through_cli(setup / "splitstore.toml", tmp_path, capsys)
    out, err = stop(proc)
    assert f"https server listening on https://127.0.0.1:{https_port}" in out
    assert f"tcp server listening on tcp+tls://127.0.0.1:{tcp_port}" in out
    assert err == ""


def _children(pid: int) -> list[int]:
    """The server processes of a ``serve`` (not multiprocessing's resource tracker)."""
    found = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return [c for c in found if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def _serving(
    spawn: Spawn, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[Path, subprocess.Popen[str], int, int]:
    """``serve --config`` of a new setup, once both servers listen."""
    setup, https_port, tcp_port = make_setup(tmp_path, capsys)
    proc = spawn("serve", "--config", setup / "splitstore.toml")
    wait_for_ports(proc, https_port, tcp_port)
    return setup, proc, https_port, tcp_port


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_serve_config_runs_each_server_in_its_own_process(
    spawn: Spawn, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """So that the two servers use two cores; Ctrl-C (to the whole group) stops both."""
    setup, proc, _, _ = _serving(spawn, tmp_path, capsys)
    children = _children(proc.pid)
    assert len(children) == 2
    roundtrip_through_cli(setup / "splitstore.toml", tmp_path, capsys)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out.splitlines()[-1] == "shutting down"
    assert err == ""
    for child in children:
        assert (
            not Path(f"/proc/{child}").exists()
            or "zombie" in Path(f"/proc/{child}/status").read_text()
        )


def test_serve_config_stops_cleanly_when_the_whole_group_is_signalled(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """As systemd stops a service: SIGTERM to the supervisor and its servers at once."""
    setup, https_port, tcp_port = make_setup(tmp_path, capsys)
    proc = subprocess.Popen(
        [sys.executable, "-m", "splitstore", "serve", "--config", str(setup / "splitstore.toml")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a group of its own, so that this test can signal it
    )
    try:
        wait_for_ports(proc, https_port, tcp_port)
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert (proc.returncode, err) == (0, "")
    assert out.splitlines()[-1] == "shutting down"


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_serve_config_stops_if_one_server_dies(
    spawn: Spawn, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, proc, https_port, _ = _serving(spawn, tmp_path, capsys)
    _, tcp_child = _children(proc.pid)
    os.kill(tcp_child, signal.SIGKILL)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    one_error(err, "the tcp server stopped by itself (exit status -9)", "the other was stopped")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", https_port), timeout=1).close()


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_serve_config_servers_die_with_their_supervisor(
    spawn: Spawn, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, proc, https_port, tcp_port = _serving(spawn, tmp_path, capsys)
    proc.kill()
    proc.wait(10)
    deadline = time.monotonic() + 20
    for port in (https_port, tcp_port):
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except OSError:
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"a server on port {port} outlived its supervisor")


def test_serve_each_server_alone(
    spawn: Spawn, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    setup, https_port, tcp_port = make_setup(tmp_path, capsys)
    common = [
        "--cert",
        setup / "tls/server.pem",
        "--key",
        setup / "tls/server-key.pem",
        "--token-file",
        setup / "token",
    ]
    https = spawn(
        "serve", "https", "--data-dir", setup / "server_files/https", "--port", https_port, *common
    )
    tcp = spawn(
        "serve", "tcp", "--data-dir", setup / "server_files/tcp", "--port", tcp_port, *common
    )
    wait_for_ports(https, https_port)
    wait_for_ports(tcp, tcp_port)
    roundtrip_through_cli(setup / "splitstore.toml", tmp_path, capsys)
    for proc, kind in ((https, "https"), (tcp, "tcp")):
        out, err = stop(proc)
        assert out.startswith(f"{kind} server listening on ")
        assert err == ""


def test_serve_on_a_port_in_use(
    spawn: Spawn, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    setup, _, tcp_port = make_setup(tmp_path, capsys)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", tcp_port))
        taken.listen()
        proc = spawn("serve", "--config", setup / "splitstore.toml")
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert "https server listening" in out  # the first server started, then was closed
    assert "shutting down" not in out
    one_error(err, "tcp server cannot listen on", f"127.0.0.1:{tcp_port}")


def test_serve_tcp_without_tls_warns(
    spawn: Spawn, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    setup, _, tcp_port = make_setup(tmp_path, capsys)
    proc = spawn(
        "serve",
        "tcp",
        "--no-tls",
        "--port",
        tcp_port,
        "--data-dir",
        tmp_path / "plain",
        "--token-file",
        setup / "token",
    )
    wait_for_ports(proc, tcp_port)
    # a client still connected when the server stops is dropped without a fuss
    with socket.create_connection(("127.0.0.1", tcp_port)) as connected:
        connected.sendall(b"x")
        out, err = stop(proc)
    assert f"listening on tcp://127.0.0.1:{tcp_port}" in out
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("splitstore: warning: ")
    assert "without TLS" in lines[0]


# -- demo -------------------------------------------------------------------------------


def test_demo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # a relative --workdir, as a person would type it
    code, out, err = run(capsys, "demo", "--workdir", "demo", "--size-mb", "0.5")
    assert (code, err) == (0, "")
    counts = re.findall(r"the (https|tcp) server: ([\d,]+) chunks", out)
    assert [kind for kind, _ in counts] == ["https", "tcp"]
    # 512 KiB encrypt to 8 sealed segments, 128 bytes more: 513 chunks
    assert sum(int(n.replace(",", "")) for _, n in counts) == 513
    assert "neither holds a 32-byte run of the file, nor its name" in out
    assert "identical" in out
    workdir = tmp_path / "cwd" / "demo"
    assert (workdir / "splitstore.toml").is_file()
    assert (workdir / "token").is_file()
    assert (workdir / "sample.bin").stat().st_size == 512 * 1024


def test_demo_without_encryption_shows_raw_chunks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "demo", "--size-mb", "0.5", "--encryption", "none")
    assert (code, err) == (0, "")
    assert "encryption OFF" in out
    counts = re.findall(r"the (https|tcp) server: ([\d,]+) chunks", out)
    assert sum(int(n.replace(",", "")) for _, n in counts) == 512
    assert "the https stripe is chunks 1, 3, 5" in out


# -- progress bar -----------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def terminal_console(buf: io.StringIO, clock: FakeClock | None = None) -> Console:
    return Console(file=buf, force_terminal=True, width=120, color_system=None, get_time=clock)


def test_progress_bar_shows_rate_and_time_left(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(_progress, "time", types.SimpleNamespace(monotonic=clock))
    buf = io.StringIO()
    total = 10_000_000
    with TransferProgress("storing big.bin", console=terminal_console(buf, clock)) as bar:
        bar.update(1_000_000, total)  # too soon: no bar yet
        assert buf.getvalue() == ""
        for step in range(2, 6):
            clock.now += _progress.SHOW_AFTER_SECONDS
            bar.update(step * 1_000_000, total)
    drawn = buf.getvalue()
    assert "storing big.bin" in drawn
    assert "5.0/10.0 MB" in drawn
    assert re.search(r"\d\.\d MB/s", drawn)  # the rate
    assert re.search(r"0:00:\d\d", drawn)  # the time left


def test_progress_bar_not_drawn_for_a_quick_transfer(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(_progress, "time", types.SimpleNamespace(monotonic=clock))
    buf = io.StringIO()
    with TransferProgress("x", console=terminal_console(buf, clock)) as bar:
        bar.update(5, 10)
        clock.now += _progress.SHOW_AFTER_SECONDS * 4
        bar.update(10, 10)  # done by the time it would show
    assert buf.getvalue() == ""


def test_progress_bar_off_when_not_a_terminal() -> None:
    buf = io.StringIO()
    progress = TransferProgress("x", console=Console(file=buf))
    assert progress._enabled is False
    assert TransferProgress("x")._enabled is False  # pytest's stderr is not a terminal


def test_progress_in_the_cli(
    servers: LiveServers,
    cfg: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Not drawn when stderr is not a terminal; drawn when it is, unless --quiet."""
    monkeypatch.setattr(_progress, "SHOW_AFTER_SECONDS", 0.0)
    write_file(tmp_path / "big", 10 * 1024 * 1024)
    code, _, err = run(capsys, "--config", cfg, "put", tmp_path / "big")
    assert (code, err) == (0, "")

    buf = io.StringIO()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.setattr(_progress, "Console", lambda stderr: terminal_console(buf))
    code, _, _ = run(capsys, "--config", cfg, "put", tmp_path / "big")
    assert code == 0
    assert "storing big" in buf.getvalue()
    code, _, _ = run(capsys, "--config", cfg, "get", "big", "-o", tmp_path / "out")
    assert code == 0
    assert "fetching big" in buf.getvalue()

    buf.truncate(0)
    buf.seek(0)
    for argv in (
        ["put", tmp_path / "big"],
        ["get", "big", "-o", tmp_path / "o2"],
        ["verify", "big"],
    ):
        assert run(capsys, "--config", cfg, *argv, "--quiet")[0] == 0
    assert buf.getvalue() == ""


def test_commands_that_move_no_data_do_not_import_numpy_or_rich() -> None:
    """Start-up of ls, stat and rm stays lean: both are imported only to move data."""
    check = (
        "import sys, splitstore._cli; "
        "print(sorted(m for m in ('numpy', 'rich') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "doc",
    [
        {"name": "dir/a b ü.bin", "size": 3, "scan": None, "nested": [{"seconds": 0.25}, []]},
        {"path": "undecodable \udcff name"},  # orjson refuses lone surrogates: stdlib then
    ],
)
def test_json_output_is_the_stdlib_layout(doc: object, monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    print_json(doc)
    assert out.getvalue() == json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def test_json_output_keeps_small_floats_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    print_json({"seconds": 1e-05})  # written 0.00001, not 1e-05: the same number
    assert json.loads(out.getvalue()) == {"seconds": 1e-05}


@pytest.mark.parametrize("users", [None, "4"], ids=["unset", "user's own"])
def test_the_program_runs_numpy_with_one_blas_thread(tmp_path: Path, users: str | None) -> None:
    """Run as the program, the CLI keeps OpenBLAS to one thread (its spinning threads cost
    a small command a fifth of its CPU), unless the user set the count."""
    f = tmp_path / "x.txt"
    f.write_text("hello\n")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    if users is not None:
        env["OPENBLAS_NUM_THREADS"] = users
    probe = (
        "import os, sys\n"
        "from splitstore._cli import main\n"
        f"sys.argv = ['splitstore', 'scan', '-q', {str(f)!r}]\n"
        "code = main()\n"
        "print(code, os.environ.get('OPENBLAS_NUM_THREADS'))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.stdout.split()[-2:] == ["0", users or "1"], done.stderr


def test_main_called_by_a_host_leaves_its_environment(tmp_path: Path) -> None:
    before = os.environ.get("OPENBLAS_NUM_THREADS")
    f = tmp_path / "x.txt"
    f.write_text("hello\n")
    assert main(["scan", "-q", str(f)]) == 0
    assert os.environ.get("OPENBLAS_NUM_THREADS") == before
