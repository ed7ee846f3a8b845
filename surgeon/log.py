"""surgeon's messages to the person at the terminal: one ``surgeon`` logger, plain lines on stderr.

Library code logs (``LOG.warning``); the CLI installs the handler, so a program that imports surgeon
keeps control of its own logging and sees no source lines as ``warnings.warn`` would print.
"""

from __future__ import annotations

import logging
import sys

LOG = logging.getLogger("surgeon")


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (click's test runner swaps it per call)."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _Plain(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        return msg if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {msg}"


def setup_cli_logging(debug: bool = False) -> None:
    """Warnings and notes of the ``surgeon`` logger to stderr, once (``--debug``: debug lines too)."""
    if any(getattr(h, "_surgeon_cli", False) for h in LOG.handlers):
        LOG.setLevel(logging.DEBUG if debug else logging.INFO)
        return
    handler = _Stderr()
    handler.setFormatter(_Plain())
    handler._surgeon_cli = True  # type: ignore[attr-defined]
    LOG.addHandler(handler)
    LOG.setLevel(logging.DEBUG if debug else logging.INFO)
    LOG.propagate = False
