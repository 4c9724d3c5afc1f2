"""Coverage-guided fuzzing (atheris / libFuzzer) of what parses bytes from the network.

Three targets, chosen by the input's first byte:

- the TCP frame decoder, fed in reads of fuzzer-chosen sizes and answered like the server
  answers (the same checks as the hypothesis fuzz tests: only ProtocolViolation may come
  out, and at most one incomplete frame is ever buffered);
- manifest parsing: anything malformed must be an IntegrityError;
- opening a sealed manifest envelope with a key: IntegrityError, WrongKeyError, or a
  manifest, never anything else.

Run it (a short bounded run is part of the test suite, tests/test_atheris.py):

    .venv/bin/python fuzz/atheris_fuzz.py -atheris_runs=200000
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Only our own code is instrumented: instrumenting every loaded module takes minutes.
with atheris.instrument_imports(include=["splitstore"]):
    from splitstore._errors import IntegrityError, WrongKeyError
    from splitstore._keyring import Keyring
    from splitstore._manifest import Manifest
    from splitstore._protocol import ProtocolViolation
from tests.test_fuzz import PREFACE, feed_like_the_server, json_frame

HELLO_FRAME = json_frame(2, {"token": "t"})
KEYRING = Keyring(b"\x07" * 32)
OID = "ab" * 32


def one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    target, rest = data[0] % 4, data[1:]
    if target in (0, 1):
        # Half the inputs start past the preface and hello, so the fuzzer reaches requests.
        stream = PREFACE + HELLO_FRAME + rest[1:] if target == 1 else rest[1:]
        sizes = [1 + rest[0] % 64, 4096, 1 + rest[0] // 4]
        try:
            feed_like_the_server(stream, sizes)
        except ProtocolViolation:
            raise AssertionError("a ProtocolViolation escaped the server's handling") from None
    elif target == 2:
        with contextlib.suppress(IntegrityError):
            Manifest.from_bytes(rest)
    else:
        with contextlib.suppress(IntegrityError, WrongKeyError):
            KEYRING.open(OID, b"SSM\x02" + rest, "fuzzed server")


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
