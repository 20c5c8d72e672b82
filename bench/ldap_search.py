"""Searches per second of the LDAPS listener (directory.ldap_server) against a directory of N people.

    .venv/bin/python bench/ldap_search.py --lines 180000 --threads 10 --seconds 15

Generates the activity file of bench/directory_import.py (about 1.8 lines per practitioner), imports it into
a fresh SQLite database, gives every practitioner one PER mailbox (direct inserts), then runs the listener
in a child process (its own interpreter: the clients must not share its GIL) and drives it with ldap3
clients in threads, one TLS connection each, for: exact `mail` searches (random addresses), `sn` prefix
searches (3 letters, client size limit 10) and `cn` prefix searches. Prints searches/s per kind and the
query plans of one search of each kind (no SCAN of practitioners or mailboxes expected).
REFERENCE.md §7: OpenLDAP slapd with 100,000 entries answered 1,500–1,600 exact `mail` searches/s to an
ldap3 client in 10 threads (the Python client was the limit).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.directory_import import generate
from caducee import database
from directory.importers import import_file
from directory.schema import mailboxes, practitioners, principals
from mailserver.db import make_engine

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import ldap3

BASE = "dc=bench,dc=test"


def build(folder: Path, lines: int) -> str:
    url = f"sqlite:///{folder / 'directory.db'}"
    source = folder / "activite.txt"
    generate(source, lines, seed=7)
    database.upgrade(url)
    engine = make_engine(url)
    started = time.perf_counter()
    import_file(engine, source)
    now = dt.datetime.now(dt.UTC)
    with engine.begin() as conn:
        conn.execute(sa.insert(mailboxes).from_select(
            ["address", "mailbox_type", "owner_id", "created_at", "source", "hosted"],
            sa.select("praticien." + practitioners.c.principal_id.cast(sa.String) + "@bench.mssante.fr",
                      sa.literal("PER"), practitioners.c.principal_id, sa.literal(now), sa.literal("national"),
                      sa.literal(False))))
        people = conn.execute(sa.select(sa.func.count()).select_from(principals)
                              .where(principals.c.kind == "person")).scalar_one()
        boxes = conn.execute(sa.select(sa.func.count()).select_from(mailboxes)).scalar_one()
    print(f"directory: {people:,} people, {boxes:,} mailboxes ({time.perf_counter() - started:.0f} s to build)")
    engine.dispose()
    return url


def serve(url: str, folder: Path) -> None:
    """Child process: the listener on 127.0.0.1:0; prints the port, runs until stdin closes."""
    import asyncio

    from twisted.internet import asyncioreactor

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    asyncioreactor.install(loop)
    from twisted.internet import reactor

    from directory.ldap_server import LdapDirectory, listen_ldaps

    cache_ttl = float(os.environ.get("CADUCEE_BENCH_LDAP_CACHE_TTL", "60"))  # 0: without the entry cache
    directory = LdapDirectory(make_engine(url), BASE, size_limit=500, time_limit=10, cache_ttl=cache_ttl)
    port = listen_ldaps(reactor, directory, folder / "server.pem", folder / "server.key", "127.0.0.1", 0)
    print(port.getHost().port, flush=True)
    threading.Thread(target=lambda: (sys.stdin.read(), reactor.callFromThread(reactor.stop)), daemon=True).start()
    reactor.run(installSignalHandlers=False)


def certificates(folder: Path) -> None:
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(folder / "server.key"), "-out", str(folder / "server.pem"), "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=DNS:localhost", "-days", "1"],
                   check=True, capture_output=True)


def drive(port: int, ca: Path, filters: list[str], threads: int, seconds: float, size_limit: int) -> float:
    done = [0] * threads
    errors: list[str] = []
    stop = time.monotonic() + seconds

    def client(i: int) -> None:
        tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=str(ca))
        conn = ldap3.Connection(ldap3.Server("localhost", port, use_ssl=True, tls=tls, get_info=ldap3.NONE),
                                auto_bind=ldap3.AUTO_BIND_NO_TLS, raise_exceptions=False)
        rng = random.Random(i)
        while time.monotonic() < stop:
            conn.search(BASE, rng.choice(filters), attributes=["cn", "mail"], size_limit=size_limit)
            if conn.result["result"] not in (0, 4):
                errors.append(str(conn.result))
            done[i] += 1
        conn.unbind()

    workers = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    started = time.monotonic()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        raise RuntimeError(errors[:3])
    return sum(done) / (time.monotonic() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=180_000)
    parser.add_argument("--threads", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve[0], Path(args.serve[1]))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        url = build(folder, args.lines)
        certificates(folder)
        engine = make_engine(url)
        with engine.connect() as conn:
            addresses = [r[0] for r in conn.execute(sa.select(mailboxes.c.address).order_by(sa.func.random())
                                                    .limit(5000))]
            sample = conn.execute(sa.select(practitioners.c.last_name, practitioners.c.first_names)
                                  .order_by(sa.func.random()).limit(2000)).all()
            names, firsts = [r[0] for r in sample], [r[1] for r in sample]
        from directory.ldap_server import LdapDirectory, _Ber, decode_filter
        from tests.directory.test_ldap_server import ber_filter

        directory = LdapDirectory(engine, BASE)
        with engine.connect() as conn:
            directory.refresh_word_indexes(conn)
        for kind, text in (("mailboxes", f"(mail={addresses[0]})"), ("people", f"(sn={names[0][:3]}*)"),
                           ("mailboxes", f"(cn={firsts[0][:3]}*)")):
            statement = directory.candidates(kind, decode_filter(_Ber(ber_filter(text))))
            with engine.connect() as conn:
                sql = statement.compile(conn, compile_kwargs={"literal_binds": True})
                plan = [r[-1] for r in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}")]
            print(f"plan {kind} {text.split('=')[0]}): {' | '.join(plan)}")
        engine.dispose()
        child = subprocess.Popen([sys.executable, __file__, "--serve", url, str(folder)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None
            port = int(child.stdout.readline())
            ca = folder / "server.pem"
            runs: list[tuple[str, list[str], int]] = [
                ("exact mail", [f"(mail={a})" for a in addresses], 0),
                ("sn prefix (3 letters, size limit 10)", [f"(sn={n[:3]}*)" for n in names], 10),
                ("cn prefix (first name + 1 letter, size limit 10)",
                 [f"(cn={f.split()[0]} {n[:1]}*)" for f, n in zip(firsts, names, strict=False)], 10),
            ]
            for label, filters, limit in runs:
                rate = drive(port, ca, filters, args.threads, args.seconds, limit)
                print(f"{label:<50} {rate:8,.0f} searches/s  ({args.threads} ldap3 threads)")
        finally:
            assert child.stdin is not None
            child.stdin.close()
            child.wait(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
