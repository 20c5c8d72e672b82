"""Process wiring: one asyncio loop runs every listener; Twisted (IMAP) runs on it via its asyncio
reactor (DESIGN.md §2). `serve` returns when SIGTERM or SIGINT has stopped everything cleanly."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from caducee import database
from caducee.config import Config

if TYPE_CHECKING:  # the modules themselves are imported when a node starts
    import ssl

    import sqlalchemy as sa

    from crypto.validation import CertificateValidator
    from directory.store import DirectoryStore
    from mailserver.audit import AuditTrail
    from mailserver.auth import CertificateAuthenticator
    from mailserver.blobs import BlobStore
    from mailserver.db import Writer
    from mailserver.queue import Queue
    from mailserver.relay_server import RelayHandler
    from mailserver.smtp_server import SubmissionHandler
    from mailserver.trust import TrustStore

log = logging.getLogger("caducee")


class SafeFormatter(logging.Formatter):
    """Tracebacks without exception messages nor source lines: an exception's text may carry message or
    patient data (a header value, an address, an INS), so the log gets the type and where it was raised.

    The time is formatted once per second (logging's `formatTime` calls localtime and strftime for every
    line; a busy listener logs a line or two per message)."""

    _second: int = -1
    _stamp: str = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._stamp = time.strftime(self.default_time_format, self.converter(second))
            self._second = second
        return (self.default_msec_format or "%s,%03d") % (self._stamp, record.msecs)

    def formatException(self, ei: Any) -> str:  # noqa: N802 - logging's API
        import traceback

        exc_type, _exc, tb = ei
        frames = " < ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}:{f.name}"
                            for f in reversed(traceback.extract_tb(tb)))
        return f"  exception={getattr(exc_type, '__name__', 'unknown')} where={frames}"


def setup_logging(level: str, *, process: str | None = None) -> None:
    """Log lines on stderr; `process` names an acceptor process in each of its lines."""
    # No line names its thread or process: skip looking them up for every record (logging's "Optimization").
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    where = f"[{process}] " if process else ""
    handler.setFormatter(SafeFormatter(f"%(asctime)s %(levelname)s {where}%(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiosmtpd logs every command line at INFO (with addresses): keep it at WARNING.
    logging.getLogger("mail.log").setLevel(logging.WARNING)


def install_reactor() -> asyncio.AbstractEventLoop:
    """Install Twisted's asyncio reactor on a fresh loop (must happen before the reactor is imported)."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    if "twisted.internet.reactor" not in sys.modules:
        from twisted.internet import asyncioreactor

        asyncioreactor.install(loop)
    return loop


@dataclass
class Node:
    """Everything one running node holds, in start order."""

    cfg: Config
    parts: dict[str, Any] = field(default_factory=dict)
    smtp_servers: list[asyncio.base_events.Server] = field(default_factory=list)
    relay_servers: list[asyncio.base_events.Server] = field(default_factory=list)
    twisted_ports: list[Any] = field(default_factory=list)
    addresses: dict[str, str] = field(default_factory=dict)


@dataclass
class SmtpSide:
    """What accepting SMTP needs, built alike by the node and by its acceptor processes."""

    read_engine: sa.Engine
    writer: Writer
    blobs: BlobStore
    directory: DirectoryStore
    validator: CertificateValidator
    authenticator: CertificateAuthenticator
    audit: AuditTrail
    queue: Queue
    trust: TrustStore
    tls: ssl.SSLContext
    handler: SubmissionHandler
    relay_handler: RelayHandler


def build_smtp_side(cfg: Config) -> SmtpSide:
    from crypto.tls import server_context
    from crypto.validation import CertificateValidator
    from directory.store import DirectoryStore
    from mailserver.audit import AuditTrail
    from mailserver.auth import CertificateAuthenticator
    from mailserver.blobs import BlobStore
    from mailserver.db import Writer, make_engine
    from mailserver.queue import Queue
    from mailserver.relay_server import RelayHandler, RelaySettings
    from mailserver.smtp_server import SubmissionHandler, SubmissionSettings
    from mailserver.trust import TrustStore

    read_engine = make_engine(cfg.database_url)
    writer = Writer(make_engine(cfg.database_url, writer=True))
    writer.start()
    blobs = BlobStore(cfg.path(cfg.storage.blobs), engine=read_engine, inline_max=cfg.storage.inline_max)
    directory = DirectoryStore(read_engine)
    validator = CertificateValidator.from_files(cfg.path(cfg.tls.trust_anchors),
                                                [cfg.path(p) for p in cfg.tls.crls])
    authenticator = CertificateAuthenticator(validator, directory)
    audit = AuditTrail(writer)
    queue = Queue(writer, blobs)
    trust = TrustStore(read_engine, writer, archive_dir=cfg.state_dir / "trust")
    local_domains = frozenset(cfg.server.domains)
    tls = server_context(cfg.path(cfg.tls.certificate), cfg.path(cfg.tls.key))
    handler = SubmissionHandler(SubmissionSettings(
        hostname=cfg.server.hostname, local_domains=local_domains, max_message_size=cfg.limits.max_message_size,
        max_recipients=cfg.limits.max_recipients, timeout=cfg.limits.smtp_timeout,
    ), authenticator, directory, queue, audit, trust)
    relay_handler = RelayHandler(
        RelaySettings(hostname=cfg.server.hostname, local_domains=local_domains,
                      max_message_size=cfg.limits.max_message_size, max_recipients=cfg.limits.max_recipients,
                      max_hops=cfg.relay.max_hops, timeout=cfg.limits.smtp_timeout),
        validator, trust, directory, queue, audit)
    return SmtpSide(read_engine, writer, blobs, directory, validator, authenticator, audit, queue, trust, tls,
                    handler, relay_handler)


async def listen_smtp(side: SmtpSide, kind: str, *, host: str = "", port: int = 0,
                      sock: Any = None) -> asyncio.base_events.Server:
    """One SMTP listener: `kind` is relay, submission or submissions (implicit TLS); on host:port, or on
    a socket already listening (an acceptor process's, inherited from the node)."""
    from mailserver.relay_server import make_relay_factory
    from mailserver.smtp_server import make_protocol_factory

    loop = asyncio.get_running_loop()
    implicit = kind == "submissions"
    factory = (make_relay_factory(side.relay_handler, side.tls) if kind == "relay"
               else make_protocol_factory(side.handler, side.tls, implicit_tls=implicit))
    where: dict[str, Any] = {"sock": sock} if sock is not None else {"host": host, "port": port,
                                                                      "reuse_address": True}
    return await loop.create_server(factory, ssl=side.tls if implicit else None, **where)


async def start(cfg: Config) -> Node:
    from twisted.internet import reactor

    from caducee.acceptors import AcceptorPool
    from crypto.tls import twisted_server_context_factory
    from mailserver.delivery import LocalDelivery
    from mailserver.imap_server import build_imap_factory
    from mailserver.receipts import ReadReceipts
    from mailserver.reports import ReportSettings, ReportWorker
    from mailserver.smtp_client import NextHop, RemoteDelivery, RemoteSettings
    from mailserver.store import SqlMailStore
    from mailserver.trust import TrustRefresher

    node = Node(cfg)
    await asyncio.to_thread(database.upgrade, cfg.database_url)
    side = build_smtp_side(cfg)
    read_engine, writer, blobs, queue, trust = side.read_engine, side.writer, side.blobs, side.queue, side.trust
    store = SqlMailStore(read_engine, writer, blobs)
    local_domains = frozenset(cfg.server.domains)
    delivery = LocalDelivery(queue, store, local_domains)
    cert, key = cfg.path(cfg.tls.certificate), cfg.path(cfg.tls.key)
    remote = RemoteDelivery(queue, blobs, trust, side.validator, RemoteSettings(
        hostname=cfg.server.hostname, local_domains=local_domains, certificate=cert, key=key,
        ca_bundle=cfg.path(cfg.tls.trust_anchors),
        next_hops={d: NextHop(h.host, h.port) for d, h in cfg.relay.next_hops.items()},
        connect_timeout=cfg.relay.connect_timeout, retry_initial=cfg.relay.retry_initial,
        retry_max=cfg.relay.retry_max, max_lifetime=cfg.relay.max_lifetime, lease=cfg.relay.lease),
        read_engine=read_engine)
    reports = ReportWorker(queue, blobs, ReportSettings(
        hostname=cfg.server.hostname, postmaster=f"mailer-daemon@{cfg.server.domains[0]}",
        delay_warning=cfg.relay.delay_warning, max_lifetime=cfg.relay.max_lifetime))
    refresher = TrustRefresher(trust, cfg.trust, cfg.state_dir) if cfg.trust.source else None
    receipts = ReadReceipts(store, queue, hostname=cfg.server.hostname)
    node.parts.update(read_engine=read_engine, writer=writer, queue=queue, store=store, delivery=delivery,
                      remote=remote, reports=reports, refresher=refresher, trust=trust, receipts=receipts,
                      audit=side.audit, directory=side.directory, authenticator=side.authenticator,
                      smtp_handler=side.handler, relay_handler=side.relay_handler)
    delivery.start()
    remote.start()
    reports.start()
    if refresher is not None:
        refresher.start()

    sockets: dict[str, Any] = {}
    for kind, where in (("relay", cfg.listen.relay), ("submission", cfg.listen.submission),
                        ("submissions", cfg.listen.submissions)):
        if where is None:
            continue
        server = await listen_smtp(side, kind, host=where.host, port=where.port)
        (node.relay_servers if kind == "relay" else node.smtp_servers).append(server)
        sockets[kind] = server.sockets[0]
        host, port = server.sockets[0].getsockname()[:2]
        node.addresses[kind] = f"{host}:{port}"
    if sockets and cfg.smtp_process_count > 1:
        pool = AcceptorPool(cfg, sockets, cfg.smtp_process_count - 1, queue)
        node.parts["acceptors"] = pool
        await pool.start()

    imap_tls = twisted_server_context_factory(cert, key)
    imap_auth = _imap_authenticator(side.authenticator)
    for name, where, implicit in (("imap", cfg.listen.imap, False), ("imaps", cfg.listen.imaps, True)):
        if where is None:
            continue
        factory = build_imap_factory(store, imap_auth, side.audit, imap_tls, implicit_tls=implicit,
                                     max_append_size=cfg.limits.imap_max_append_size,
                                     hostname=cfg.server.hostname)
        if implicit:
            port = reactor.listenSSL(where.port, factory, imap_tls, interface=where.host)
        else:
            port = reactor.listenTCP(where.port, factory, interface=where.host)
        node.twisted_ports.append(port)
        addr = port.getHost()
        node.addresses[name] = f"{addr.host}:{addr.port}"
    _start_ldaps(node, reactor, cfg, read_engine)
    _start_admin(node, reactor, cfg, side.authenticator, read_engine)

    for name, address in node.addresses.items():
        log.info("event=listening protocol=%s address=%s", name, address)
    return node


def _imap_authenticator(authenticator: Any) -> Any:
    from mailserver.auth import LoginRefused
    from mailserver.imap_server import ImapLogin

    async def authenticate(cert_der: bytes | None, authzid: str) -> ImapLogin | None:
        try:
            identity = (authenticator.from_memory(cert_der, authzid)
                        or await asyncio.to_thread(authenticator.authenticate, cert_der, authzid))
        except LoginRefused as exc:
            log.info("event=login_failed protocol=imap reason=%s", exc.reason)
            return None
        mailbox = identity.mailbox_for(authzid)
        if mailbox is None:
            return None
        return ImapLogin(mailbox_id=mailbox.id, address=mailbox.address,
                         principal=identity.principal.national_id)

    return authenticate


def _start_ldaps(node: Node, reactor: Any, cfg: Config, read_engine: Any) -> None:
    """The read-only directory over LDAPS (directory.ldap_server), answered from the read engine."""
    if cfg.listen.ldaps is None:
        return
    from directory.ldap_server import LdapDirectory, listen_ldaps

    directory = LdapDirectory(read_engine, cfg.ldap_base, organisation=cfg.server.organisation,
                              size_limit=cfg.directory.ldap_size_limit, time_limit=cfg.directory.ldap_time_limit)
    port = listen_ldaps(reactor, directory, cfg.path(cfg.tls.certificate), cfg.path(cfg.tls.key),
                        cfg.listen.ldaps.host, cfg.listen.ldaps.port)
    node.twisted_ports.append(port)
    addr = port.getHost()
    node.addresses["ldaps"] = f"{addr.host}:{addr.port}"


def _start_admin(node: Node, reactor: Any, cfg: Config, authenticator: Any, read_engine: Any) -> None:
    """The admin HTTPS listener (caducee.http_api): directory search as JSON and FHIR, client certificate."""
    if cfg.listen.admin is None:
        return
    from caducee import http_api

    port = http_api.start(reactor, cfg.listen.admin, cfg, authenticator, read_engine)
    node.twisted_ports.append(port)
    addr = port.getHost()
    node.addresses["admin"] = f"{addr.host}:{addr.port}"


async def stop(node: Node) -> None:
    from mailserver.smtp_protocol import shutdown

    log.info("event=stopping")
    acceptors = node.parts.get("acceptors")
    if acceptors is not None:
        acceptors.terminate()  # they stop listening and finish their sessions beside this process
    for port in node.twisted_ports:
        await _from_deferred(port.stopListening())
    await asyncio.gather(shutdown(node.parts["smtp_handler"], node.smtp_servers),
                         shutdown(node.parts["relay_handler"], node.relay_servers))
    if acceptors is not None:
        await acceptors.wait()
    if node.parts.get("refresher") is not None:
        await node.parts["refresher"].stop()
    await node.parts["receipts"].drain()
    await node.parts["delivery"].stop()
    await node.parts["remote"].stop()
    await node.parts["reports"].stop()
    writer = node.parts["writer"]
    await asyncio.to_thread(writer.stop)
    node.parts["read_engine"].dispose()
    log.info("event=stopped accepted=%d relayed_in=%d delivered=%d relayed_out=%d reports=%d db_jobs=%d "
             "db_commits=%d", node.parts["smtp_handler"].accepted, node.parts["relay_handler"].accepted,
             node.parts["delivery"].delivered, node.parts["remote"].relayed, node.parts["reports"].sent,
             writer.jobs, writer.batches)


async def _from_deferred(d: Any) -> Any:
    if d is None:
        return None
    return await d.asFuture(asyncio.get_running_loop())


def serve(cfg: Config) -> int:
    """Run the node until SIGTERM/SIGINT. Returns the process exit status."""
    setup_logging(cfg.log.level)
    loop = install_reactor()
    from twisted.internet import defer, reactor

    state: dict[str, Any] = {"status": 0}

    async def main() -> None:
        try:
            state["node"] = await start(cfg)
        except Exception as exc:  # noqa: BLE001 - report a start failure plainly, then stop
            log.error("event=start_failed error=%s detail=%s", type(exc).__name__, exc)
            state["status"] = 1
            reactor.stop()
            return
        # What start-up allocated (modules, configuration, schema objects) lives as long as the process:
        # out of the collector's generations, so that collections under load walk only what sessions make.
        gc.collect()
        gc.freeze()
        log.info("event=ready")

    def graceful() -> Any:
        node = state.get("node")
        if node is None:
            return None
        return defer.Deferred.fromFuture(asyncio.ensure_future(stop(node)))

    reactor.addSystemEventTrigger("before", "shutdown", graceful)
    reactor.callWhenRunning(lambda: asyncio.ensure_future(main()))
    reactor.run(installSignalHandlers=True)
    loop.close()
    return int(state["status"])
