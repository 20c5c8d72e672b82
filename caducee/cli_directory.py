"""`caducee directory …`: the directory of practitioners, organisations and mailboxes."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any, state_parent: argparse.ArgumentParser) -> None:
    """Add this command group to the `caducee` parser."""
