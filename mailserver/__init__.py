"""The mail server: SMTP submission, durable queue, local delivery, mailbox store, IMAP, audit trail.

Implements RFC 5321 (SMTP), RFC 6409 (submission), RFC 3207 (STARTTLS), RFC 4954 + RFC 4422 Appendix A
(AUTH EXTERNAL), RFC 1870 (SIZE), RFC 2034/3463 (enhanced status codes), RFC 3501 (IMAP4rev1) with
RFC 2177 (IDLE), RFC 4315 (UIDPLUS), RFC 6851 (MOVE), RFC 4959 (SASL-IR). See docs/standards.md.
"""
