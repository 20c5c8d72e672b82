"""`caducee mdn …`: read receipts (RFC 8098)."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any, state_parent: argparse.ArgumentParser) -> None:
    """Add this command group to the `caducee` parser."""
