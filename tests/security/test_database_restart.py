"""Logins while the database is down (docs/security.md row 35, the part tests/faults/test_database_restart.py
does not cover: that test sends mail through outages and counts it; this one looks at what a client is
told when it logs in): a temporary failure, never "bad credentials".

The embedded SQLite database lives in the server process and cannot restart apart from it; this runs
`caducee serve` on a private PostgreSQL cluster (initdb in a temporary folder, its own port), the
multi-node backend, and stops that cluster with `pg_ctl stop -m immediate` (a crash: no checkpoint, every
connection cut).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mailserver.testing import (
    DEFAULT_PORTS,
    LISTENERS,
    ServerProcess,
    caducee_command,
    free_port,
    wait_for,
)
from tests.security.clients import IMAP, SMTP, message

pytestmark = pytest.mark.blackbox

TEMPORARY = "451 4.3.0"


@dataclass
class Cluster:
    data: Path
    port: int

    def _pg_ctl(self, *args: str) -> None:
        pg_ctl = shutil.which("pg_ctl")
        assert pg_ctl is not None
        cmd = [pg_ctl, "-D", str(self.data), *args]
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        self._pg_ctl("start", "-w", "-l", str(self.data.parent / "postgres.log"), "-o",
                     f"-p {self.port} -k {self.data.parent} -c listen_addresses=127.0.0.1 -c fsync=off")

    def crash(self) -> None:
        self._pg_ctl("stop", "-m", "immediate")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    initdb = shutil.which("initdb")
    if initdb is None or shutil.which("pg_ctl") is None:
        pytest.fail("this test needs the PostgreSQL server binaries (Debian package postgresql)")
    base = Path(tempfile.mkdtemp(prefix="caducee-pg-"))
    base.chmod(0o755)
    cmd = [initdb, "-D", str(base / "data"), "-A", "trust", "-U", "postgres", "--no-sync"]
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    pg = Cluster(base / "data", free_port())
    pg.start()
    try:
        yield pg
    finally:
        try:
            pg.crash()
        except subprocess.CalledProcessError:
            pass  # already stopped
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def on_postgres(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """`caducee init --demo` and `caducee serve` on the cluster."""
    from caducee.config import sample

    state = tmp_path_factory.mktemp("pg-state")
    ports = {name: free_port() for name in LISTENERS}
    text = sample("caducee.localhost", "localhost")
    for name, port in ports.items():
        text = text.replace(f'{name} = "127.0.0.1:{DEFAULT_PORTS[name]}"', f'{name} = "127.0.0.1:{port}"')
    (state / "caducee.toml").write_text(text.replace('url = "sqlite:///caducee.db"', f'url = "{cluster.url}"'),
                                        encoding="utf-8")
    subprocess.run(caducee_command("init", "--state", str(state), "--demo"), check=True, stdout=subprocess.DEVNULL)
    with ServerProcess(state, ports) as server:
        yield server


def test_logins_during_a_database_outage_are_temporary_failures(cluster: Cluster, on_postgres: ServerProcess) -> None:
    """The certificate is fine but the directory cannot be read: SMTP answers `451 4.3.0` to AUTH (not
    `535 5.7.8`, which a client shows as "wrong certificate" and may not retry) and IMAP `NO [UNAVAILABLE]`
    (not `NO [AUTHENTICATIONFAILED]`); a session opened before the outage gets 451 at RCPT and at the final
    dot. A certificate whose principal logged in a moment ago is answered from memory (mailserver.auth):
    its login succeeds and its message gets 451 at RCPT. When the database is back, the certificates log
    in again."""
    server = on_postgres
    alice, bob, sophie = (server.identity("PER", i) for i in range(3))
    tag = f"pg-{time.monotonic_ns()}"
    open_session = SMTP.connect(server, "submissions", alice)
    open_session.login()
    assert open_session.cmd(f"MAIL FROM:<{alice['address']}>").startswith("250")
    assert open_session.cmd(f"RCPT TO:<{bob['address']}>").startswith("250")
    cluster.crash()
    try:
        assert open_session.cmd(f"RCPT TO:<{sophie['address']}>").startswith(TEMPORARY)
        assert open_session.cmd("DATA").startswith("354")
        assert open_session.cmd(message(alice["address"], bob["address"], tag) + b".").startswith(TEMPORARY)
        with SMTP.connect(server, "submissions", sophie) as fresh:  # not seen before: the directory is read
            assert fresh.cmd("EHLO client.test").startswith("250")
            assert fresh.cmd("AUTH EXTERNAL =").startswith(TEMPORARY)
        with SMTP.connect(server, "submissions", alice) as known:  # seen a moment ago: from memory
            assert known.cmd("EHLO client.test").startswith("250")
            assert known.cmd("AUTH EXTERNAL =").startswith("235")
            assert known.cmd(f"MAIL FROM:<{alice['address']}>").startswith("250")
            assert known.cmd(f"RCPT TO:<{sophie['address']}>").startswith(TEMPORARY)
        with IMAP.connect(server, "imaps", bob) as imap:
            reply = imap.command(b"A", b"AUTHENTICATE EXTERNAL =")[-1]
            assert reply.startswith(b"A NO [UNAVAILABLE]"), reply
    finally:
        cluster.start()
        open_session.quit()

    def logs_in() -> bool:
        with SMTP.connect(server, "submissions", sophie) as again:
            again.cmd("EHLO client.test")
            return again.cmd("AUTH EXTERNAL =").startswith("235")

    wait_for(logs_in, timeout=20, interval=0.5)
    with IMAP.connect(server, "imaps", bob, authenticate=True) as imap:
        assert imap.command(b"N", b"NOOP")[-1].startswith(b"N OK")
