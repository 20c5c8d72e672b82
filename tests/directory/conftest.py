"""Fixtures of the directory tests: a node's state folder with the demo directory, and private slapd servers
(directory/testing_slapd.py) whose certificates come from that node's dev PKI."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import directory.ldap_client  # noqa: F401 - imports ldap3 first, under a filter of pyasn1's deprecation warnings
from directory.testing_slapd import LDAPSEARCH, SLAPADD, SLAPD, SLAPTEST, Slapd, SlapdTls

LDAP_TOOLS = (SLAPD, SLAPADD, SLAPTEST, LDAPSEARCH)


@pytest.fixture(scope="session")
def ldap_tools() -> None:
    missing = [tool for tool in LDAP_TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"the LDAP tests need {', '.join(missing)}: apt-get install slapd ldap-utils "
                    "(make test-tools installs them)")


@pytest.fixture(scope="session")
def demo_state_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`caducee init --demo` once per session; tests work on copies (`node_state`)."""
    from caducee.state import init_state

    state = tmp_path_factory.mktemp("node-template") / "state"
    init_state(state, demo=True, say=lambda _text: None)
    return state


@pytest.fixture
def node_state(demo_state_template: Path, tmp_path: Path) -> Path:
    """A fresh copy of a demo node's state folder (configuration, PKI, database with the demo directory)."""
    state = tmp_path / "state"
    shutil.copytree(demo_state_template, state)
    return state


@pytest.fixture
def slapd_factory(tmp_path: Path, ldap_tools: None) -> Iterator[Callable[..., Slapd]]:
    """Start private slapd servers (stopped, and checked to stop cleanly, at the end of the test).

    `slapd_factory(base, state=DIR)` gives the server a certificate from that state folder's dev PKI;
    other keyword arguments go to :meth:`Slapd.create`.
    """
    from crypto.pki import DevPKI

    started: list[Slapd] = []

    def start(base: str, *, state: Path | None = None, tls: bool = True, **kwargs: Any) -> Slapd:
        workdir = tmp_path / f"slapd{len(started)}"
        certificate = None
        if tls:
            pki = DevPKI.create_or_load((state or tmp_path / "slapd-pki") / "pki")
            certificate = SlapdTls.issue(pki, workdir / "tls")
        server = Slapd.create(workdir, base=base, tls=certificate, **kwargs)
        started.append(server)
        return server.start()

    yield start
    failures = []
    for server in reversed(started):
        status = server.stop()
        if status != 0:
            failures.append(f"slapd in {server.workdir} exited with {status}")
    assert not failures, failures


@pytest.fixture
def slapd(slapd_factory: Callable[..., Slapd], node_state: Path) -> Slapd:
    """A slapd whose suffix is the demo node's base DN, certified by the node's PKI."""
    from caducee import config as config_mod

    return slapd_factory(config_mod.load(node_state).ldap_base, state=node_state)
