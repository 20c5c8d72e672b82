"""`caducee bench …`: side-by-side benchmarks against the reference servers (bench/, issue of the
benchmarks; docs/standards.md says how figures are taken and quoted)."""

from __future__ import annotations

import argparse
import importlib

COMMANDS = {
    "smtp": ("bench.smtp", "SMTP acceptance and delivery with STARTTLS and client certificates, against Postfix"),
    "imap": ("bench.imap", "one IMAP session over 10,000 messages (headers of all, 100 bodies), against Dovecot"),
    "ldap": ("bench.ldap", "LDAPS searches by mail and by name (100,000 practitioners), against OpenLDAP slapd"),
    "memory": ("bench.memory", "memory per idle TLS connection (1,000 held) and RSS under TLS churn, against Postfix"),
    "import": ("bench.directory_import", "import of the national directory files (N generated activity lines)"),
}


def cmd_bench(args: argparse.Namespace) -> int:
    module = importlib.import_module(COMMANDS[args.benchmark][0])
    return int(module.main(args.rest))


def register(sub: argparse._SubParsersAction, state: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "bench", help="benchmarks side by side with the reference servers",
        description="Run one benchmark; the options after its name are its own (caducee bench NAME --help). "
                    "Results go to bench/results/ as JSON and Markdown.",
        epilog="\n".join(f"  {name:8} {text}" for name, (_, text) in COMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("benchmark", choices=sorted(COMMANDS), metavar="NAME", help=", ".join(sorted(COMMANDS)))
    p.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own options")
    p.set_defaults(func=cmd_bench)
