"""Caducée: the application shell — configuration, command line, state folder, process wiring."""

__version__ = "0.1.0"
