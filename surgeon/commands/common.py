"""What every sub-command shares: one-line errors and the click context."""

from __future__ import annotations

import functools
import sys

import click

from surgeon.errors import SurgeonError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def friendly_errors(fn):
    """Bad input ends as one line on stderr and exit code 1, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SurgeonError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper
