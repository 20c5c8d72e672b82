"""One real `caducee serve` process for the black-box tests, driven by real clients."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator

import pytest

from mailserver.testing import ServerProcess

TOOLS = ("curl", "swaks", "openssl")


@pytest.fixture(scope="session")
def tools() -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(f"black-box tests need {', '.join(missing)} (make test installs them)")


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, tools: None) -> Iterator[ServerProcess]:
    srv = ServerProcess.create(tmp_path_factory.mktemp("state"))
    srv.start()
    yield srv
    status = srv.stop()
    assert status == 0, "caducee serve did not stop cleanly on SIGTERM:\n" + "\n".join(srv.log[-20:])
    assert any("event=stopped" in line for line in srv.log)


def run(cmd: list[str], *, input: bytes | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, input=input.decode() if input else None, capture_output=True, text=True,
                          timeout=timeout)
