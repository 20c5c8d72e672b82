"""Import speed of the national directory: N synthetic PS_LibreAcces_Personne_activite lines.

    caducee bench import --lines 2000000
    .venv/bin/python bench/directory_import.py --lines 200000
    .venv/bin/python bench/directory_import.py --lines 200000 --postgres postgresql+psycopg://postgres@127.0.0.1/postgres

Writes a file in the real format (the 52-column header of the 2021-2022 releases, `|`-separated, a
trailing `|` on every line, UTF-8; research/formats.md §1.3) with fictitious practitioners (RPPS passing
the Luhn check, a few ADELI), about 1.8 activities per practitioner, and sites drawn as described in
`Sites` (--uniform-sites for the worst case); then times a first
import into an empty database and a re-import of the file with 1 % of its lines changed, on SQLite (a
fresh file in a temporary folder) and, with --postgres ADMIN_URL, on a fresh PostgreSQL database created
and dropped through that URL. Prints lines/s for each. The whole France file has about 2 million lines.
"""

from __future__ import annotations

import argparse
import itertools
import random
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, write_results
from caducee import database
from directory.identifiers import luhn_complete
from directory.importers import ImportSummary, import_file
from mailserver.db import make_engine

HEADER = (
    "Type d'identifiant PP|Identifiant PP|Identification nationale PP|Code civilité d'exercice|"
    "Libellé civilité d'exercice|Code civilité|Libellé civilité|Nom d'exercice|Prénom d'exercice|"
    "Code profession|Libellé profession|Code catégorie professionnelle|Libellé catégorie professionnelle|"
    "Code type savoir-faire|Libellé type savoir-faire|Code savoir-faire|Libellé savoir-faire|"
    "Code mode exercice|Libellé mode exercice|Numéro SIRET site|Numéro SIREN site|Numéro FINESS site|"
    "Numéro FINESS établissement juridique|Identifiant technique de la structure|Raison sociale site|"
    "Enseigne commerciale site|Complément destinataire (coord. structure)|"
    "Complément point géographique (coord. structure)|Numéro Voie (coord. structure)|"
    "Indice répétition voie (coord. structure)|Code type de voie (coord. structure)|"
    "Libellé type de voie (coord. structure)|Libellé Voie (coord. structure)|"
    "Mention distribution (coord. structure)|Bureau cedex (coord. structure)|Code postal (coord. structure)|"
    "Code commune (coord. structure)|Libellé commune (coord. structure)|Code pays (coord. structure)|"
    "Libellé pays (coord. structure)|Téléphone (coord. structure)|Téléphone 2 (coord. structure)|"
    "Télécopie (coord. structure)|Adresse e-mail (coord. structure)|Code Département (structure)|"
    "Libellé Département (structure)|Ancien identifiant de la structure|Autorité d'enregistrement|"
    "Code secteur d'activité|Libellé secteur d'activité|Code section tableau pharmaciens|"
    "Libellé section tableau pharmaciens|"
)

LAST = ["MARTIN", "BERNARD", "THOMAS", "PETIT", "ROBERT", "RICHARD", "DURAND", "DUBOIS", "MOREAU", "LAURENT",
        "SIMON", "MICHEL", "LEFÈVRE", "LEROY", "ROUX", "DAVID", "BERTRAND", "MOREL", "FOURNIER", "GIRARD",
        "BONNET", "DUPONT", "LAMBERT", "FONTAINE", "ROUSSEAU", "VINCENT", "MÜLLER", "FAURE", "ANDRÉ", "MERCIER",
        "D'ALMEIDA", "LE GALL", "N'DIAYE", "GUÉRIN", "BOYER", "CHEVALIER", "FRANÇOIS", "LEGRAND", "GAUTHIER"]
FIRST = ["Camille", "Louis", "Sophie", "Jean-Marie", "Hélène", "Zoé", "Noël", "Élodie", "Anaïs", "Léa",
         "Chloé", "Gaëlle", "Jérôme", "François", "Inès", "Maël", "Agnès", "Benoît", "Cécile", "Loïc"]
PROFESSIONS = [("10", "Médecin"), ("21", "Pharmacien"), ("40", "Chirurgien-Dentiste"), ("50", "Sage-Femme"),
               ("60", "Infirmier"), ("70", "Masseur-Kinésithérapeute"), ("91", "Orthophoniste")]
SPECIALTIES = [("SM53", "Spécialiste en Médecine Générale"), ("SM26", "Qualifié en Médecine Générale"),
               ("SM04", "Cardiologie et maladies vasculaires"), ("SM49", "Santé publique et médecine sociale")]
MODES = [("L", "Libéral"), ("S", "Salarié"), ("B", "Bénévole")]
SECTORS = [("SA01", "Etablissement Public de santé"), ("SA07", "Cabinet individuel"),
           ("SA08", "Cabinet de groupe"), ("SA33", "Etablissement privé PSPH")]
CITIES = [("75015", "75115", "Paris"), ("69003", "69383", "Lyon"), ("13005", "13205", "Marseille"),
          ("25300", "25462", "Pontarlier"), ("42000", "42218", "Saint-Étienne"), ("20000", "2A004", "Ajaccio"),
          ("59000", "59350", "Lille"), ("35000", "35238", "Rennes"), ("97400", "97411", "Saint-Denis")]
STREETS = [("R", "Rue", "DE LA RÉPUBLIQUE"), ("AV", "Avenue", "JEAN JAURÈS"), ("BD", "Boulevard", "VICTOR HUGO"),
           ("PL", "Place", "DU GÉNÉRAL DE GAULLE"), ("FG", "Faubourg", "SAINT ÉTIENNE")]


def _structure(i: int, rng: random.Random, kind: str) -> list[str]:
    """The 28 structure columns (Numéro SIRET site … Libellé Département) ending with the structure id."""
    postcode, commune, city = rng.choice(CITIES)
    street_type, street_label, street = rng.choice(STREETS)
    if kind == "hospital":
        finess = luhn_complete(f"{i % 100_000_000:08d}")
        ids = ["", "", finess, "", f"F{finess}"]
        sid, name = "1" + finess, f"CENTRE HOSPITALIER {city.upper()} {i}"
    else:
        siret = f"{i:014d}"
        ids = [siret, siret[:9], "", "", f"C{siret}"]
        sid = "3" + siret
        name = f"PHARMACIE DU CENTRE {i}" if kind == "pharmacy" else f"CABINET {rng.choice(LAST)} {i}"
    return [*ids, name, "", "", "", str(rng.randint(1, 200)), "", street_type, street_label, street, "", "",
            postcode, commune, city, "", "", f"01{i % 100_000_000:08d}", "", "", f"contact{i}@exemple.fr",
            postcode[:2], "", sid]


class Sites:
    """Where activities happen. Realistic mix (default): 45 % in a few thousand hospitals, the big ones
    far more often (weights 1/rank), recurring all along the file; 10 % in pharmacies and laboratories;
    45 % in private practices, 70 % of them the practitioner's own (met on that person's lines only), the
    others shared by a group. With `uniform`, every activity picks one of lines/3 sites at random: the
    worst case for the importer's cache of recent sites."""

    def __init__(self, lines: int, rng: random.Random, uniform: bool) -> None:
        self.rng = rng
        self.uniform = uniform
        self.next_id = 0
        if uniform:
            self.pool = [self._new("hospital" if i % 3 == 0 else "practice") for i in range(max(1, lines // 3))]
            return
        self.hospitals = [self._new("hospital") for _ in range(max(20, lines // 400))]
        self.weights = list(itertools.accumulate(1 / rank for rank in range(1, len(self.hospitals) + 1)))
        self.pharmacies = [self._new("pharmacy") for _ in range(max(10, lines // 100))]
        self.groups = [self._new("practice") for _ in range(max(10, lines // 20))]
        self.own: list[str] | None = None

    def _new(self, kind: str) -> list[str]:
        self.next_id += 1
        return _structure(self.next_id, self.rng, kind)

    def new_person(self) -> None:
        if not self.uniform:
            self.own = None

    def pick(self) -> tuple[list[str], tuple[str, str]]:
        """A site and the exercise mode there."""
        rng = self.rng
        if self.uniform:
            return rng.choice(self.pool), rng.choice(MODES)
        draw = rng.random()
        if draw < 0.45:
            return rng.choices(self.hospitals, cum_weights=self.weights)[0], ("S", "Salarié")
        if draw < 0.55:
            return rng.choice(self.pharmacies), rng.choice(MODES)
        if rng.random() < 0.7:
            if self.own is None:
                self.own = self._new("practice")
            return self.own, ("L", "Libéral")
        return rng.choice(self.groups), ("L", "Libéral")


def generate(path: Path, lines: int, seed: int, *, uniform: bool = False) -> None:
    """Write `lines` activity lines (plus the header) to `path`."""
    rng = random.Random(seed)
    sites = Sites(lines, rng, uniform)
    written = 0
    person = 0
    with open(path, "w", encoding="utf-8", newline="\n") as out:
        out.write(HEADER + "\n")
        while written < lines:
            person += 1
            sites.new_person()
            code, label = rng.choice(PROFESSIONS)
            if person % 50 == 0:
                ident = f"{person % 1_000_000_000:09d}"
                person_cols = ["0", ident, "0" + ident, "", ""]
            else:
                ident = luhn_complete(f"1{person:09d}")
                person_cols = ["8", ident, "8" + ident, "DR" if code == "10" else "",
                               "Docteur" if code == "10" else ""]
            civility = rng.choice([("M", "Monsieur"), ("MME", "Madame")])
            spec = rng.choice(SPECIALTIES) if code == "10" else ("", "")
            head = [*person_cols, *civility, rng.choice(LAST), rng.choice(FIRST).upper(), code, label, "C", "Civil",
                    "S" if spec[0] else "", "Spécialité ordinale" if spec[0] else "", *spec]
            for _ in range(min(lines - written, rng.choice((1, 1, 2, 2, 3)))):
                site, mode = sites.pick()
                sector = rng.choice(SECTORS)
                authority = "CNOM/CNOM/ARS" if code == "10" else "ARS/ARS/ARS"
                row = [*head, *mode, *site, authority, *sector, "", ""]
                out.write("|".join(row) + "|\n")
                written += 1


def mutate(source: Path, target: Path, every: int) -> None:
    """Copy `source` with one line in `every` changed (a new phone number) and one in `every` dropped."""
    with open(source, encoding="utf-8") as src, open(target, "w", encoding="utf-8", newline="\n") as out:
        for n, line in enumerate(src):
            if n and n % every == 0:
                fields = line.split("|")
                fields[40] = "0999999999"  # Téléphone (coord. structure)
                line = "|".join(fields)
            elif n and n % every == every // 2:
                continue
            out.write(line)


def timed(url: str, path: Path, lines: int, label: str, record: list[dict[str, Any]] | None = None,
          backend: str = "") -> ImportSummary:
    engine = make_engine(url)
    try:
        start = time.perf_counter()
        summary = import_file(engine, path)
        elapsed = time.perf_counter() - start
    finally:
        engine.dispose()
    counts = ", ".join(f"{name} +{c.added} ~{c.changed} -{c.removed}" for name, c in summary.entities.items())
    print(f"  {label:<11} {elapsed:7.1f} s  {lines / elapsed:>9,.0f} lines/s  ({counts}; "
          f"{summary.rejected} rejected, {summary.warnings} warnings)")
    if record is not None:
        record.append({"backend": backend, "run": label, "seconds": round(elapsed, 2),
                       "lines_per_s": round(lines / elapsed), "changes": counts,
                       "rejected": summary.rejected, "warnings": summary.warnings})
    return summary


def run(url: str, first: Path, second: Path, lines: int, record: list[dict[str, Any]] | None = None,
        backend: str = "") -> None:
    database.upgrade(url)
    timed(url, first, lines, "import", record, backend)
    timed(url, second, lines, "re-import", record, backend)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=200_000, help="activity lines to generate (default 200000)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--uniform-sites", action="store_true",
                        help="every activity at a random site among lines/3 (worst case for the site cache)")
    parser.add_argument("--postgres", metavar="ADMIN_URL",
                        help="also run on a scratch PostgreSQL database created through this URL")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    args = parser.parse_args(argv)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    desc = machine()
    record: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="caducee-bench-") as tmp:
        folder = Path(tmp)
        first, second = folder / "PS_LibreAcces_Personne_activite_1.txt", folder / "PS_LibreAcces_Personne_activite_2.txt"
        start = time.perf_counter()
        generate(first, args.lines, args.seed, uniform=args.uniform_sites)
        mutate(first, second, 100)
        size = first.stat().st_size
        print(f"{args.lines:,} lines, {size / 1e6:.1f} MB, generated in {time.perf_counter() - start:.1f} s")
        print("SQLite:")
        run(f"sqlite:///{folder / 'bench.db'}", first, second, args.lines, record, "SQLite")
        if args.postgres:
            admin = sa.create_engine(args.postgres, isolation_level="AUTOCOMMIT")
            name = f"caducee_bench_{secrets.token_hex(4)}"
            with admin.connect() as conn:
                conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
            try:
                print("PostgreSQL:")
                run(admin.url.set(database=name).render_as_string(hide_password=False), first, second, args.lines,
                    record, "PostgreSQL")
            finally:
                with admin.connect() as conn:
                    conn.exec_driver_sql(f'DROP DATABASE "{name}" WITH (FORCE)')
                admin.dispose()
    table = ["| database | run | seconds | lines/s | changes |", "|---|---|---:|---:|---|"]
    table += [f"| {r['backend']} | {r['run']} | {r['seconds']:.1f} | {r['lines_per_s']:,} | {r['changes']} |" for r in record]
    table.append("")
    table.append(f"{args.lines:,} generated activity lines (PS_LibreAcces_Personne_activite format); the re-import "
                 "file has 1 % of its lines changed and 1 % removed. Target: 2 million lines in under 2 minutes.")
    result = {"title": "Import of the national directory", "started": started, "machine": desc,
              "parameters": {"lines": args.lines, "seed": args.seed, "uniform_sites": args.uniform_sites},
              "rows": record}
    json_path, md_path = write_results("import", result, "\n".join(table), args.out)
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
