"""The directory: who is who in the trust space.

Owns the identifiers (RPPS, ADELI, FINESS, SIRET, national ids), the model of principals (practitioners
and organisations) and of their mailboxes (BAL: PER, ORG, APP, CAB), and the store that maps an
authenticated identity to the mailboxes it may use. Later: importers of the national open-data files and
LDAP/HTTP publication.
"""
