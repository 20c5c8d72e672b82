"""The HTTPS API of the admin listener: the directory search as JSON and as FHIR R4 (twisted.web on the
node's reactor, DESIGN.md §5 "Admin HTTP API", dev port 8025).

    GET /api/v1/health                                   {"status": "ok"}; the only call without a certificate
    GET /api/v1/directory/search?name=&rpps=&…&limit=    {"results": […], "count": n, "limit": n}
    GET /fhir/metadata                                   CapabilityStatement
    GET /fhir/Practitioner?…  /fhir/PractitionerRole?…  /fhir/Organization?…    Bundle (searchset)
    GET /fhir/Practitioner/{id}  (and the two others)    the resource

Only GET (405 with `Allow: GET` otherwise). Every call but the health check needs a TLS client
certificate that validates (chain to the trust anchors, validity, clientAuth, not revoked in its CA's CRL:
`crypto.validation` through the node's `CertificateAuthenticator`) and names an active principal of the
directory of the certificate's kind: 401 without a valid certificate, 403 when its holder is unknown. The
TLS layer (`crypto.tls`, TLS 1.2+) accepts any certificate so that the answer is an HTTP status with a
JSON body rather than a TLS alert.

This module parses requests and parameters and writes responses; the search is `directory.search`, the
FHIR mapping `directory.fhir`. Blocking work (certificate validation, database) runs in the reactor's
thread pool. Errors never carry exception text: a 500 gives an opaque reference that the log repeats
with the exception type and where it was raised. One log line per request: method, path without the
query string, status, principal.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import sys
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import sqlalchemy as sa

from directory import fhir
from directory.identifiers import (
    PERSON_RPPS_PREFIX,
    STRUCTURE_FINESS_PREFIX,
    STRUCTURE_SIRET_PREFIX,
    PrincipalKind,
)
from directory.importers.text import normalise
from directory.model import MailboxType, Principal
from directory.search import (
    DEFAULT_LIMIT,
    SearchError,
    SearchQuery,
    search,
    to_jsonable,
)

log = logging.getLogger(__name__)

HEALTH_PATH: Final = "/api/v1/health"
SEARCH_PATH: Final = "/api/v1/directory/search"
FHIR_PREFIX: Final = "/fhir"
JSON_TYPE: Final = "application/json; charset=utf-8"
FHIR_TYPE: Final = f"{fhir.FHIR_JSON}; charset=utf-8"
SEARCH_PARAMETERS: Final = ("name", "rpps", "national_id", "profession", "specialty", "postcode", "city",
                            "mailbox", "mailbox_type", "limit")
MAX_TARGET: Final = 8192  # bytes of request target; Twisted's header limits bound the rest


# -- outcomes ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = JSON_TYPE
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Handled:
    """A response and what the request log line says about it."""

    response: Response
    principal: str = "-"
    reason: str = ""


class Refused(Exception):
    """The client certificate does not open the API: `status` 401 or 403, `reason` for the log only."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class BadRequest(Exception):
    """A request the API cannot answer: `message` is for the client (it names parameters, never data
    of the server); `issue` is the FHIR issue type."""

    def __init__(self, message: str, *, status: int = 400, issue: str = "invalid",
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.issue = issue
        self.extra = extra or {}


_REFUSAL_TEXT: Final = {
    401: "a valid, unrevoked client certificate is required",
    403: "the holder of this certificate may not use the directory API",
}


def _json(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _error(status: int, code: str, message: str, **extra: Any) -> Response:
    return Response(status, _json({"error": code, "message": message, **extra}))


def _outcome(status: int, issue: str, message: str) -> Response:
    return Response(status, _json(fhir.operation_outcome(issue, message)), FHIR_TYPE)


# -- authentication ---------------------------------------------------------------------------------------

class CertificateAuthoriser:
    """Who a client certificate is: validated by the node's validator, mapped through the directory to an
    active principal of the certificate's kind (person: 8 + RPPS; organisation: structure id). Unlike a
    mail login, no mailbox is needed: any known principal may search the directory. Blocking."""

    def __init__(self, authenticator: Any) -> None:
        self.validator = authenticator.validator
        self.directory = authenticator.directory

    def __call__(self, cert_der: bytes | None) -> Principal:
        from crypto.validation import CertificateKind, CertificateRejected

        if not cert_der:
            raise Refused(401, "no_client_certificate")
        try:
            cert = self.validator.validate(cert_der)
        except CertificateRejected as exc:
            raise Refused(401, f"certificate_{exc.reason.value}") from None
        principal: Principal | None = self.directory.principal_by_national_id(cert.national_id)
        if principal is None:
            raise Refused(403, "unknown_principal")
        expected = PrincipalKind.PERSON if cert.kind is CertificateKind.PERSON else PrincipalKind.ORGANISATION
        if principal.kind is not expected:
            raise Refused(403, "principal_kind_mismatch")
        return principal


# -- request target ---------------------------------------------------------------------------------------

def split_target(target: bytes) -> tuple[str, list[tuple[str, str]]]:
    """The decoded path and the query parameters (in order, blanks kept) of a request target."""
    if len(target) > MAX_TARGET:
        raise BadRequest("request target too long", status=414, issue="too-long")
    try:
        text = target.decode("ascii")
        raw_path, _, raw_query = text.partition("?")
        path = urllib.parse.unquote(raw_path, errors="strict")
        params = urllib.parse.parse_qsl(raw_query, keep_blank_values=True, strict_parsing=False,
                                        encoding="utf-8", errors="strict")
    except (UnicodeDecodeError, UnicodeEncodeError, ValueError):
        raise BadRequest("the request target is not valid percent-encoded UTF-8") from None
    return path, params


def log_path(target: bytes) -> str:
    """The path of a request target for the log: no query string, printable ASCII, at most 200 chars."""
    path = target.split(b"?", 1)[0][:200].decode("ascii", errors="replace")
    return re.sub(r"[^\x21-\x7e]", "?", path) or "/"


def _single(params: Sequence[tuple[str, str]], repeatable: frozenset[str] = frozenset()) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for name, value in params:
        values.setdefault(name, []).append(value)
    repeated = sorted(n for n, v in values.items() if len(v) > 1 and n not in repeatable)
    if repeated:
        raise BadRequest(f"parameter(s) given more than once: {', '.join(repeated)}")
    return values


# -- the JSON search ---------------------------------------------------------------------------------------

def _mailbox_type(value: str) -> MailboxType:
    try:
        return MailboxType(value.strip().upper())
    except ValueError:
        raise BadRequest(f"mailbox type {value[:20]!r} is not one of "
                         f"{', '.join(t.value for t in MailboxType)}") from None


def json_search_query(params: Sequence[tuple[str, str]], max_results: int) -> SearchQuery:
    """The SearchQuery of /api/v1/directory/search (raises BadRequest)."""
    values = _single(params)
    unknown = sorted(set(values) - set(SEARCH_PARAMETERS))
    if unknown:
        raise BadRequest(f"unknown parameter(s): {', '.join(n[:40] for n in unknown[:10])}",
                         extra={"known_parameters": list(SEARCH_PARAMETERS)})
    given = {n: v[0] for n, v in values.items()}
    limit = min(DEFAULT_LIMIT, max_results)
    if given.get("limit", "").strip():
        text = given["limit"].strip()
        if not text.isdigit():
            raise BadRequest("limit must be a number")
        limit = int(text)
        if not 1 <= limit <= max_results:
            raise BadRequest(f"limit must be between 1 and {max_results}")
    criteria: dict[str, Any] = {n: v.strip() or None for n, v in given.items() if n not in ("limit", "mailbox_type")}
    if given.get("mailbox_type", "").strip():
        criteria["mailbox_type"] = _mailbox_type(given["mailbox_type"])
    return SearchQuery(**criteria, limit=limit)


# -- FHIR search parameters ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Token:
    """A FHIR token `[system]|code`; `system` None when absent (`code` or `|code`)."""

    system: str | None
    code: str

    @classmethod
    def parse(cls, text: str) -> Token:
        system, sep, code = text.partition("|")
        if not sep:
            return cls(None, text.strip())
        return cls(system.strip() or None, code.strip())


_RPPS_SYSTEMS: Final = frozenset({fhir.RPPS_SYSTEM, "http://rpps.fr", "https://rpps.fr"})
_FINESS_SYSTEMS: Final = frozenset({fhir.FINESS_SYSTEM, "https://finess.esante.gouv.fr",
                                    "http://finess.esante.gouv.fr"})
_SIRENE_SYSTEMS: Final = frozenset({fhir.SIRENE_SYSTEM, "https://sirene.fr"})
_MAILBOX_TYPE_SYSTEMS: Final = frozenset({fhir.TYPE_BAL, fhir.TYPE_MESSAGERIE})
_SAVOIR_FAIRE_SYSTEMS: Final = frozenset({*fhir.SAVOIR_FAIRE_SYSTEMS.values(), fhir.TYPE_SAVOIR_FAIRE})


def person_national_id(token: Token) -> str:
    """The identification nationale PP an identifier token names (IdNatPS or RPPS)."""
    if not token.code:
        raise BadRequest("empty identifier")
    if token.system == fhir.PERSON_ID_SYSTEM:
        return token.code
    if token.system in _RPPS_SYSTEMS:
        return PERSON_RPPS_PREFIX + token.code
    if token.system is None:
        return PERSON_RPPS_PREFIX + token.code if len(token.code) == 11 and token.code.isdigit() else token.code
    raise BadRequest(f"unsupported identifier system for a practitioner (use {fhir.PERSON_ID_SYSTEM} or "
                     f"{fhir.RPPS_SYSTEM})", issue="not-supported")


def structure_national_id(token: Token) -> str:
    """The structure national id an identifier token names (IdNatStruct, FINESS site or SIRET)."""
    code = token.code
    if not code:
        raise BadRequest("empty identifier")
    if token.system == fhir.STRUCTURE_ID_SYSTEM or token.system is None:
        return code
    if token.system in _FINESS_SYSTEMS:
        return STRUCTURE_FINESS_PREFIX + code
    if token.system in _SIRENE_SYSTEMS:
        if len(code) == 14:
            return STRUCTURE_SIRET_PREFIX + code
        raise BadRequest("only SIRET (14 digits) is searchable in the SIRENE system, not SIREN",
                         issue="not-supported")
    raise BadRequest(f"unsupported identifier system for an organization (use {fhir.STRUCTURE_ID_SYSTEM}, "
                     f"{fhir.FINESS_SYSTEM} or {fhir.SIRENE_SYSTEM})", issue="not-supported")


def _reference(value: str, resource: str) -> str:
    """The logical id of a reference `Type/id` or `id` (a full URL ending in Type/id too)."""
    text = value.strip()
    marker = f"{resource}/"
    if marker in text:
        text = text.rsplit(marker, 1)[1]
    if "/" in text or not text:
        raise BadRequest(f"expected a reference {resource}/<id>")
    return text


def _norm(label: str, value: str) -> str:
    text = normalise(value)
    if not text:
        raise BadRequest(f"{label} has no letter or digit to search for")
    return text


# Parameters by resource, plus the common ones; `mailbox-mss` also takes the :exact modifier (ANS).
_FHIR_PARAMETERS: Final = {name: frozenset(p[0] for p in params) | set(fhir.COMMON_PARAMETERS)
                           for name, params in fhir.SEARCH_PARAMETERS.items()}
_INCLUDES: Final = {
    "PractitionerRole:practitioner": "practitioner", "PractitionerRole:practitioner:Practitioner": "practitioner",
    "PractitionerRole:organization": "organization", "PractitionerRole:organization:Organization": "organization",
}


def fhir_search(resource: str, params: Sequence[tuple[str, str]], max_results: int) -> fhir.FhirSearch:
    """The FhirSearch for GET /fhir/{resource}?params (raises BadRequest with an OperationOutcome text)."""
    known = _FHIR_PARAMETERS[resource] | ({"_revinclude"} if resource == fhir.PRACTITIONER else set()) | (
        {"_include"} if resource == fhir.PRACTITIONER_ROLE else set())
    values: dict[str, str] = {}
    includes: list[str] = []
    for raw_name, value in params:
        name, _, modifier = raw_name.partition(":")
        if name not in known:
            raise BadRequest(f"unsupported search parameter {raw_name[:60]!r} for {resource} "
                             f"(supported: {', '.join(sorted(known))})", issue="not-supported")
        if modifier and not (name == "mailbox-mss" and modifier == "exact"):
            raise BadRequest(f"modifier :{modifier[:20]} is not supported on {name}", issue="not-supported")
        if name == "_include":
            includes.append(value)
            continue
        if name in values:
            raise BadRequest(f"parameter {name} given more than once (AND of repeated parameters is not "
                             "supported)", issue="not-supported")
        if "," in value and name != "_elements":
            raise BadRequest(f"several values for {name} (OR with ',') are not supported", issue="not-supported")
        values[name] = value
    given = {n: v for n, v in values.items() if v.strip() or n.startswith("_")}

    count = min(DEFAULT_LIMIT, max_results)
    if "_count" in given:
        text = given.pop("_count").strip()
        if not text.isdigit():
            raise BadRequest("_count must be a number")
        count = min(int(text), max_results)
    elements: tuple[str, ...] = ()
    if "_elements" in given:
        elements = tuple(e.strip() for e in given.pop("_elements").split(",") if e.strip())
        if not all(re.fullmatch(r"[A-Za-z]{1,64}", e) for e in elements):
            raise BadRequest("_elements lists element names separated by ','")
    if "_format" in given and given.pop("_format").strip().lower() not in (
            "json", "application/json", "application/fhir+json"):
        raise BadRequest("only JSON is served (_format=json)", issue="not-supported")

    criteria: dict[str, Any] = {}
    extra: list[sa.Select[Any]] = []
    spec: dict[str, Any] = {}
    for name in ("name", "practitioner.name"):
        if name in given:
            criteria["name"] = given.pop(name)
    for name in ("family", "given"):
        if name in given:
            spec[name] = _norm(name, given.pop(name))
            criteria.setdefault("name", spec[name])
    if "_id" in given:
        logical_id = given.pop("_id").strip()
        extra.append(fhir.with_national_ids([logical_id.split("-", 1)[0] if resource == fhir.PRACTITIONER_ROLE
                                             else logical_id]))
        if resource == fhir.PRACTITIONER_ROLE:
            spec["role_ids"] = frozenset({logical_id})
    if "identifier" in given:
        token = Token.parse(given.pop("identifier"))
        nid = (structure_national_id(token) if resource == fhir.ORGANIZATION else person_national_id(token))
        extra.append(fhir.with_national_ids([nid]))
    if "practitioner" in given:
        extra.append(fhir.with_national_ids([_reference(given.pop("practitioner"), fhir.PRACTITIONER)]))
    if "practitioner.identifier" in given:
        extra.append(fhir.with_national_ids([person_national_id(Token.parse(given.pop("practitioner.identifier")))]))
    sites: set[str] | None = None
    for name in ("organization", "organization.identifier"):
        if name in given:
            value = given.pop(name)
            sid = (_reference(value, fhir.ORGANIZATION) if name == "organization"
                   else structure_national_id(Token.parse(value)))
            sites = {sid} if sites is None else sites & {sid}
    if sites is not None:
        extra.append(fhir.working_at(sites))
        spec["sites"] = frozenset(sites)
    for name in ("role", "specialty", "qualification-code"):
        if name in given:
            token = Token.parse(given.pop(name))
            if not token.code:
                raise BadRequest(f"empty {name}")
            if token.system == fhir.PROFESSION:
                target = "profession"
            elif token.system in _SAVOIR_FAIRE_SYSTEMS:
                target = "specialty"
            elif token.system is None:
                target = {"role": "profession", "specialty": "specialty"}.get(name) or (
                    "profession" if token.code.isdigit() else "specialty")
            else:
                raise BadRequest(f"unsupported code system for {name}", issue="not-supported")
            if (name, target) in (("role", "specialty"), ("specialty", "profession")):
                raise BadRequest(f"unsupported code system for {name}", issue="not-supported")
            criteria[target] = token.code
    for name, target in (("address-postalcode", "postcode"), ("organization.address-postalcode", "postcode"),
                         ("address-city", "city"), ("organization.address-city", "city")):
        if name in given:
            criteria[target] = given.pop(name).strip()
            if name.startswith("organization."):
                key = "site_postcode" if target == "postcode" else "site_city"
                spec[key] = (criteria[target].upper() if target == "postcode"
                             else _norm("organization.address-city", criteria[target]))
    if "mailbox-mss" in given:
        criteria["mailbox"] = spec["mailbox"] = given.pop("mailbox-mss").strip().lower()
    if "mailbox-mss-type" in given:
        token = Token.parse(given.pop("mailbox-mss-type"))
        if token.system is not None and token.system not in _MAILBOX_TYPE_SYSTEMS:
            raise BadRequest(f"mailbox-mss-type: unsupported system (use {fhir.TYPE_BAL})", issue="not-supported")
        criteria["mailbox_type"] = spec["mailbox_type"] = _mailbox_type(token.code)
    revinclude = given.pop("_revinclude", "").strip()
    if revinclude and revinclude not in ("PractitionerRole:practitioner", "PractitionerRole:practitioner:Practitioner"):
        raise BadRequest("_revinclude supports PractitionerRole:practitioner only", issue="not-supported")
    wanted: set[str] = set()
    for value in includes:
        if value.strip() not in _INCLUDES:
            raise BadRequest("_include supports PractitionerRole:practitioner and PractitionerRole:organization",
                             issue="not-supported")
        wanted.add(_INCLUDES[value.strip()])
    return fhir.FhirSearch(
        resource=resource, query=SearchQuery(**criteria), extra=tuple(extra), count=count, elements=elements,
        include_practitioner="practitioner" in wanted, include_organization="organization" in wanted,
        revinclude_roles=bool(revinclude), **spec,
    )


# -- the API (blocking; runs in a worker thread) -------------------------------------------------------------

@dataclass
class DirectoryApi:
    """Answers one request: `handle(target, cert_der, base)` → Handled. Blocking: run it in a thread."""

    engine: sa.Engine
    authorise: Callable[[bytes | None], Principal]
    max_results: int = 200
    responses: dict[int, int] = field(default_factory=dict)  # answered requests by status

    def count(self, status: int) -> None:
        self.responses[status] = self.responses.get(status, 0) + 1

    def handle(self, target: bytes, cert_der: bytes | None, base: str) -> Handled:
        fhir_call = log_path(target).startswith(FHIR_PREFIX + "/") or log_path(target) == FHIR_PREFIX
        try:
            principal = self.authorise(cert_der)
        except Refused as exc:
            text = _REFUSAL_TEXT[exc.status]
            response = (_outcome(exc.status, "login" if exc.status == 401 else "forbidden", text) if fhir_call
                        else _error(exc.status, "unauthorized" if exc.status == 401 else "forbidden", text))
            return Handled(response, reason=exc.reason)
        except Exception:  # noqa: BLE001 - never a stack trace to the client
            return Handled(self._internal_error(fhir_call), reason="internal_error")
        try:
            path, params = split_target(target)
            if fhir_call:
                return Handled(self._fhir(path, params, base), principal.national_id)
            if path == SEARCH_PATH:
                query = json_search_query(params, self.max_results)
                entries = search(self.engine, query)
                body = {"results": [to_jsonable(e) for e in entries], "count": len(entries), "limit": query.limit}
                return Handled(Response(200, _json(body)), principal.national_id)
            return Handled(_error(404, "not_found", "no such endpoint"), principal.national_id)
        except BadRequest as exc:
            response = (_outcome(exc.status, exc.issue, exc.message) if fhir_call
                        else _error(exc.status, "bad_request", exc.message, **exc.extra))
            return Handled(response, principal.national_id, reason="bad_request")
        except SearchError as exc:
            message = str(exc)[:300]
            response = _outcome(400, "invalid", message) if fhir_call else _error(400, "bad_request", message)
            return Handled(response, principal.national_id, reason="bad_request")
        except Exception:  # noqa: BLE001 - never a stack trace to the client
            return Handled(self._internal_error(fhir_call), principal.national_id, reason="internal_error")

    def _fhir(self, path: str, params: list[tuple[str, str]], base: str) -> Response:
        parts = path[len(FHIR_PREFIX):].strip("/").split("/") if path != FHIR_PREFIX else [""]
        fhir_base = base + FHIR_PREFIX
        if parts == ["metadata"]:
            return Response(200, _json(fhir.capability_statement(fhir_base)), FHIR_TYPE)
        if not parts[0] or parts[0] not in fhir.RESOURCE_TYPES or len(parts) > 2:
            return _outcome(404, "not-found", "unknown resource type or path "
                                              f"(served: {', '.join(fhir.RESOURCE_TYPES)}, metadata)")
        resource = parts[0]
        if len(parts) == 2:
            if params and any(n not in ("_format", "_elements") for n, _ in params):
                raise BadRequest("a read takes no search parameter", issue="not-supported")
            found = fhir.read(self.engine, resource, parts[1])
            if found is None:
                return _outcome(404, "not-found", f"no {resource} with this id")
            return Response(200, _json(found), FHIR_TYPE)
        spec = fhir_search(resource, params, self.max_results)
        result = fhir.run_search(self.engine, spec, self.max_results)
        outcome = None
        if not result.complete:
            outcome = fhir.operation_outcome(
                "too-costly", f"more than {self.max_results} candidates match: the total is unknown and only "
                              f"the first are searched; add criteria", severity="warning")
        self_url = f"{fhir_base}/{resource}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        return Response(200, _json(fhir.bundle(fhir_base, result.matches, total=result.total, self_url=self_url,
                                               includes=result.includes, outcome=outcome)), FHIR_TYPE)

    @staticmethod
    def _internal_error(fhir_call: bool) -> Response:
        from caducee.app import SafeFormatter

        ref = secrets.token_hex(4).upper()
        # The type and where it was raised, never the exception's text (it may carry directory data).
        log.error("event=http_internal_error ref=%s%s", ref,
                  SafeFormatter().formatException(sys.exc_info()).replace("\n", " "))
        message = f"internal error, ref {ref}"
        return _outcome(500, "exception", message) if fhir_call else _error(500, "internal_error", message)


# -- the Twisted shell --------------------------------------------------------------------------------------

def build_site(api: DirectoryApi, hostname: str) -> Any:
    """A twisted.web Site serving `api` (no access log of its own: `ApiResource` logs each request)."""
    from twisted.internet import threads
    from twisted.web import resource, server

    from crypto.tls import twisted_peer_certificate_der

    class ApiResource(resource.Resource):
        isLeaf = True

        def render(self, request: Any) -> Any:
            method = request.method.decode("ascii", errors="replace")[:16]
            target: bytes = request.uri
            path = log_path(target)
            if method != "GET":
                self._finish(request, method, path, Handled(
                    _error(405, "method_not_allowed", "only GET is allowed"), reason="method"))
                return server.NOT_DONE_YET
            if path == HEALTH_PATH:
                self._finish(request, method, path, Handled(Response(200, _json({"status": "ok"}))))
                return server.NOT_DONE_YET
            cert_der = twisted_peer_certificate_der(request.channel.transport if request.channel else None)
            base = f"https://{hostname}:{request.getHost().port}"
            gone: list[bool] = []
            request.notifyFinish().addErrback(lambda _failure: gone.append(True))
            d = threads.deferToThread(api.handle, target, cert_der, base)
            d.addErrback(lambda _failure: Handled(_error(500, "internal_error", "internal error"),
                                                  reason="internal_error"))
            d.addCallback(lambda handled: None if gone else self._finish(request, method, path, handled))
            return server.NOT_DONE_YET

        @staticmethod
        def _finish(request: Any, method: str, path: str, handled: Handled) -> None:
            response = handled.response
            request.setResponseCode(response.status)
            for name, value in (("content-type", response.content_type), ("content-length", str(len(response.body))),
                                ("cache-control", "no-store"), ("x-content-type-options", "nosniff"),
                                ("server", "caducee"), *response.headers):
                request.setHeader(name.encode("ascii"), value.encode("ascii"))
            if response.status == 405:
                request.setHeader(b"allow", b"GET")
            api.count(response.status)
            log.info("event=http_request method=%s path=%s status=%d principal=%s%s", method, path,
                     response.status, handled.principal, f" reason={handled.reason}" if handled.reason else "")
            request.write(response.body)
            request.finish()

    class ApiSite(server.Site):
        def log(self, request: Any) -> None:
            """No access log: its lines carry query strings (names searched); ApiResource logs instead."""

    site = ApiSite(ApiResource(), timeout=60)  # type: ignore[no-untyped-call]
    site.displayTracebacks = False
    return site


def start(reactor: Any, where: Any, cfg: Any, authenticator: Any, engine: sa.Engine) -> Any:
    """Listen with TLS on `where` (a config HostPort) and return the Twisted port."""
    from crypto.tls import twisted_server_context_factory

    api = DirectoryApi(engine, CertificateAuthoriser(authenticator), cfg.directory.http_max_results)
    tls = twisted_server_context_factory(cfg.path(cfg.tls.certificate), cfg.path(cfg.tls.key))
    return reactor.listenSSL(where.port, build_site(api, cfg.server.hostname), tls, interface=where.host)

