"""What the atheris targets share: the repository on sys.path, quiet logs, and how a finding is raised.

The drivers and the checks are those of the Hypothesis properties (tests/fuzz/harness.py), so a finding
here is a failing property there: reproduce it with the saved input, then add a regression test.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# aiosmtpd logs every unknown command at WARNING: millions of lines in a run. Errors stay on (the IMAP
# driver collects them as findings).
logging.disable(logging.WARNING)


class Finding(AssertionError):
    """A property failed: libFuzzer saves the input as crash-<sha1> and stops."""


def check(problems: list[str], context: bytes = b"") -> None:
    if problems:
        detail = "\n".join(f"  - {p}" for p in problems[:10])
        tail = f"\n  server output (last 600 bytes): {context[-600:]!r}" if context else ""
        raise Finding(f"{len(problems)} problem(s):\n{detail}{tail}")


def main(test_one_input: Callable[[bytes], None]) -> None:
    import atheris

    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
