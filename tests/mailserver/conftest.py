from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from caducee import database
from mailserver.db import Writer, make_engine


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'test.db'}"
    database.upgrade(url)
    return url


@pytest.fixture
def engines(db_url: str) -> Iterator[tuple[sa.Engine, Writer]]:
    read = make_engine(db_url)
    writer = Writer(make_engine(db_url, writer=True))
    writer.start()
    yield read, writer
    writer.stop()
    writer.engine.dispose()
    read.dispose()
