"""The private slapd harness of the tests: it lives in `directory.testing_slapd` (the benchmarks use it too);
this module re-exports it so that the tests keep importing `tests.directory.slapd`."""

from directory.testing_slapd import *
from directory.testing_slapd import (
    DEPLOY_DIR,
    LDAPSEARCH,
    SCHEMA_DIR,
    SLAPADD,
    SLAPCAT,
    SLAPD,
    SLAPTEST,
    SYSTEM_SCHEMAS,
    Slapd,
    SlapdError,
    SlapdTls,
    ldif_entry,
    slaptest_conf,
    ssha,
)

__all__ = [
    "DEPLOY_DIR",
    "LDAPSEARCH",
    "SCHEMA_DIR",
    "SLAPADD",
    "SLAPCAT",
    "SLAPD",
    "SLAPTEST",
    "SYSTEM_SCHEMAS",
    "Slapd",
    "SlapdError",
    "SlapdTls",
    "ldif_entry",
    "slaptest_conf",
    "ssha",
]
