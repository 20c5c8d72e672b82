"""`caducee trust …`: the whitelist of operator domains (ListeBlancheMSSante, REFERENCE.md §1).

    caducee trust import FILE [--sha256 HEX | --checksum-file F]
    caducee trust list [--json]
    caducee trust add DOMAIN --dn DN [--description TEXT]
    caducee trust remove DOMAIN
    caducee trust refresh
    caducee trust status

Every command takes `--state DIR`. A refused change prints every problem, one per line, on stderr and
exits with status 2; the list in force is then unchanged.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from caducee import config as config_mod

EXIT_REFUSED = 2
ARCHIVE_SUBDIR = "trust"  # DIR/trust/ keeps the last accepted XML


def _actor() -> str:
    """Who runs the command, for the audit trail."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"cli:{user}"[:64]


@contextmanager
def _store(cfg: config_mod.Config) -> Iterator[Any]:
    from mailserver.db import Writer, make_engine
    from mailserver.trust import TrustStore

    engine = make_engine(cfg.database_url)
    writer = Writer(make_engine(cfg.database_url, writer=True), name="cli-trust-writer")
    try:
        yield TrustStore(engine, writer, archive_dir=cfg.state_dir / ARCHIVE_SUBDIR)
    finally:
        writer.stop()
        writer.engine.dispose()
        engine.dispose()


def _refused(command: str, what: str, problems: list[str]) -> int:
    print(f"caducee trust {command}: {what}:", file=sys.stderr)
    for problem in problems:
        print(f"  - {problem}", file=sys.stderr)
    return EXIT_REFUSED


def _count(n: int, singular: str, plural: str | None = None) -> str:
    return f"{n} {singular if n == 1 else plural or singular + 's'}"


def _summary(result: Any, source: str) -> str:
    from mailserver.trust import ImportResult

    assert isinstance(result, ImportResult)
    line = (f"imported {_count(result.domains, 'domain')} ({_count(result.operators, 'operator certificate')}) "
            f"from {source}, sha256 {result.sha256}; {_count(result.local, 'local entry', 'local entries')} kept")
    if result.overridden:
        line += f" ({len(result.overridden)} overriding the national entry: {', '.join(result.overridden)})"
    return line


def cmd_import(args: argparse.Namespace) -> int:
    from mailserver.trust import TrustListError, fetch_source

    cfg = config_mod.load(args.state)
    location = str(args.file)
    try:
        data = fetch_source(location)
        checksum: str | None = args.sha256
        if args.checksum_file is not None:
            raw = fetch_source(str(args.checksum_file), max_size=64 * 1024)
            try:
                checksum = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise TrustListError([f"{args.checksum_file}: the checksum file is not text"]) from None
        source = location if location.lower().startswith("https://") else str(Path(location).resolve())
        with _store(cfg) as store:
            result = store.import_list(data, source=source, expected_sha256=checksum, actor=_actor())
    except TrustListError as exc:
        return _refused("import", f"{location} refused, the list in force is unchanged", exc.problems)
    print(_summary(result, location))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.state)
    with _store(cfg) as store:
        entries = store.entries()
    for e in entries:
        if args.json:
            print(json.dumps({"domain": e.domain, "operator_dn": e.operator_dn, "description": e.description,
                              "source": e.source.value, "updated_at": e.updated_at.isoformat()},
                             ensure_ascii=False))
        else:
            print(f"{e.domain:<45} {e.source.value:<8} {e.operator_dn}"
                  + (f"  ({e.description})" if e.description else ""))
    return 0


def cmd_add(args: argparse.Namespace) -> int:
    from mailserver.trust import TrustListError

    cfg = config_mod.load(args.state)
    try:
        with _store(cfg) as store:
            entry = store.add(args.domain, args.dn, args.description, actor=_actor())
    except TrustListError as exc:
        return _refused("add", f"{args.domain} refused", exc.problems)
    print(f"added local entry {entry.domain} -> {entry.operator_dn}")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    from mailserver.trust import TrustSource

    cfg = config_mod.load(args.state)
    with _store(cfg) as store:
        entry = store.remove(args.domain, actor=_actor())
    if entry is None:
        return _refused("remove", "nothing removed", [f"no entry for {args.domain}"])
    note = "; it returns with the next import" if entry.source is TrustSource.NATIONAL else ""
    print(f"removed {entry.source.value} entry {entry.domain}{note}")
    return 0


def cmd_refresh(args: argparse.Namespace) -> int:
    from mailserver.trust import TrustListError, refresh

    cfg = config_mod.load(args.state)
    if not cfg.trust.source:
        return _refused("refresh", "nothing to refresh", [
            f"no whitelist source configured: set [trust] source in {config_mod.config_path(args.state)} "
            "(a path or an https URL), or use `caducee trust import FILE`"
        ])
    try:
        with _store(cfg) as store:
            result = refresh(store, cfg.trust, cfg.state_dir, actor=_actor())
            last = store.last_import()
    except TrustListError as exc:
        return _refused("refresh", f"{cfg.trust.source} refused, the list in force is unchanged", exc.problems)
    if result is None:
        digest = last.sha256 if last is not None else "?"
        print(f"unchanged: {cfg.trust.source} is the list in force (sha256 {digest})")
    else:
        print(_summary(result, cfg.trust.source))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from mailserver.trust import TrustSource

    cfg = config_mod.load(args.state)
    with _store(cfg) as store:
        last = store.last_import()
        counts = store.counts()
    national, local = counts[TrustSource.NATIONAL], counts[TrustSource.LOCAL]
    if last is None:
        print(f"no whitelist imported; {_count(local, 'local entry', 'local entries')} in force")
        return 0
    generated = last.generated_at.isoformat() if last.generated_at else "unknown"
    print(f"last import {last.imported_at.isoformat(timespec='seconds')} from {last.source}, "
          f"sha256 {last.sha256}, {last.domains} domains (list generated {generated}); "
          f"in force: {national} national, {_count(local, 'local entry', 'local entries')}")
    return 0


def register(sub: Any, state_parent: argparse.ArgumentParser) -> None:
    """Add this command group to the `caducee` parser."""
    trust = sub.add_parser(
        "trust", help="the whitelist of operator domains (trust space)",
        description="The operator domains of the trust space and the certificate DN of each operator "
                    "(ListeBlancheMSSante). Imports replace the national entries; local entries stay.",
    ).add_subparsers(dest="trust_command", metavar="ACTION", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], int], help_: str, description: str) -> Any:
        p = trust.add_parser(name, parents=[state_parent], help=help_, description=description)
        p.set_defaults(func=func)
        return p

    p = add("import", cmd_import, "import a ListeBlancheMSSante XML file",
            "Validate the whole file, then replace the national entries with it in one transaction. "
            "Any problem refuses the file and keeps the list in force. Local entries are kept and win "
            "over a national entry for the same domain.")
    p.add_argument("file", metavar="FILE", help="the XML file (or an https URL)")
    check = p.add_mutually_exclusive_group()
    check.add_argument("--sha256", metavar="HEX", help="expected SHA-256 of the file, in hex")
    check.add_argument("--checksum-file", type=Path, metavar="F",
                       help="published checksum file (sha256sum or bare hex format)")

    p = add("list", cmd_list, "print the entries in force",
            "Print every domain in force with its source (national or local) and operator DN.")
    p.add_argument("--json", action="store_true", help="one JSON object per line")

    p = add("add", cmd_add, "add or replace a local entry",
            "Add a local entry: it survives imports and overrides a national entry for the same domain.")
    p.add_argument("domain", metavar="DOMAIN", help="the operator domain, e.g. operateur.mssante.fr")
    p.add_argument("--dn", required=True, metavar="DN",
                   help="subject DN of the operator certificate, e.g. 'CN=mss.example.fr,O=Example,C=FR'")
    p.add_argument("--description", metavar="TEXT", help="free text shown by `trust list`")

    p = add("remove", cmd_remove, "remove an entry",
            "Remove the entry for DOMAIN. A national entry comes back with the next import.")
    p.add_argument("domain", metavar="DOMAIN", help="the domain to remove")

    add("refresh", cmd_refresh, "fetch and import the configured list now",
        "Fetch [trust] source (and check [trust] checksum) from the configuration and import it, "
        "unless it is the list in force. A list older than the one in force is refused.")

    add("status", cmd_status, "show the last import and the entries in force",
        "When the list in force was imported, from where, its SHA-256 and how many entries are in force.")
