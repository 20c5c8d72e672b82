"""Fixtures of the fuzzing properties: the Twisted reactor thread for the IMAP driver, once per session."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.fuzz.harness import ensure_reactor, stop_reactor


@pytest.fixture(scope="session")
def twisted_reactor() -> Iterator[Any]:
    """The asyncio-based reactor, running in a thread (shared with the IMAP tests if they started it)."""
    reactor, _ = ensure_reactor()
    yield reactor
    stop_reactor()
