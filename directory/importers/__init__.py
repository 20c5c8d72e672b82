"""Import of the national open-data files into the directory (REFERENCE.md §4, research/formats.md §1).

    from directory.importers import import_file, import_order
    summary = import_file(engine, Path("PS_LibreAcces_Personne_activite_202501010000.txt"),
                          local_domains={"chu-exemple.mssante.fr"})

Files: PS_LibreAcces_Personne_activite (every header release seen: 52 and 56 columns, and the 49-column
Pro Santé Connect extraction, whose birth data is ignored), PS_LibreAcces_SavoirFaire,
PS_LibreAcces_Dipl_AutExerc and Extraction_Correspondance_MSSante. Each is recognised by its header and
read by normalised column name. A re-import applies the difference (added / changed / removed) for the
entities the file carries, in one transaction, on SQLite and PostgreSQL.
"""

from directory.importers.apply import EntityCounts
from directory.importers.formats import FileKind, FormatError, Header, parse_header
from directory.importers.parsers import Issue
from directory.importers.runner import (
    DEFAULT_MAX_REJECTED_RATIO,
    DirectoryImportError,
    ImportProgress,
    ImportSummary,
    detect,
    import_file,
    import_order,
    read_header,
)

__all__ = [
    "DEFAULT_MAX_REJECTED_RATIO",
    "DirectoryImportError",
    "EntityCounts",
    "FileKind",
    "FormatError",
    "Header",
    "ImportProgress",
    "ImportSummary",
    "Issue",
    "detect",
    "import_file",
    "import_order",
    "parse_header",
    "read_header",
]
