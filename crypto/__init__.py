"""Certificates and TLS for Caducée.

This package owns everything that touches X.509 and TLS:

* :mod:`crypto.pki` — a development PKI modelled on IGC-Santé (a root CA, a CA for persons and a CA for
  organisations and servers), issuing person, organisation and server certificates and publishing CRLs
  (RFC 5280). It plays the national PKI in development and in the tests; production trust anchors are
  configuration.
* :mod:`crypto.tls` — TLS contexts carrying the project's TLS profile (TLS 1.3 and 1.2 only, ECDHE with
  AEAD suites) for asyncio listeners, for outbound clients and for Twisted, all of which request a client
  certificate but leave its verdict to the application.
* :mod:`crypto.validation` — the application's verdict on a client certificate: chain to a trust anchor,
  validity period, extended key usage and revocation by CRL, mapped to a person or organisation identity.
"""
