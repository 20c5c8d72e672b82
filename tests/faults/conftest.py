"""Fixtures of the fault tests: the fault-injection shim, built once per run, its control file, and the
reaping of every server a test started (a failed assertion must not leave a node running)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.harness import FaultControl, FaultServer, build_shim


@pytest.fixture(autouse=True)
def reap_servers() -> Iterator[None]:
    FaultServer.started.clear()
    yield
    for server in FaultServer.started:
        server.kill()  # a no-op for a node that stopped or died already
    FaultServer.started.clear()


@pytest.fixture(scope="session")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_shim(tmp_path_factory.mktemp("shim"))


@pytest.fixture
def control(tmp_path: Path) -> FaultControl:
    ctl = FaultControl(tmp_path / "fault.ctl")
    ctl.clear()
    return ctl
