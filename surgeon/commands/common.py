"""What every sub-command shares: one-line errors, the ``--debug`` switch and the click context."""

from __future__ import annotations

import functools
import io
import os
import sys

import click

from surgeon.errors import SurgeonError, first_line, missing_extra

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def debug_enabled() -> bool:
    """``surgeon --debug CMD`` or ``SURGEON_DEBUG=1``: show tracebacks instead of one-line errors."""
    if os.environ.get("SURGEON_DEBUG", "") not in ("", "0"):
        return True
    ctx = click.get_current_context(silent=True)
    return bool(ctx and ctx.find_root().params.get("debug"))


def _command_name() -> str:
    ctx = click.get_current_context(silent=True)
    return ctx.info_name if ctx and ctx.info_name else "this command"


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit does not raise BrokenPipeError again
    (Python's documented recipe for SIGPIPE)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):  # no real file behind stdout
        pass


def friendly_errors(fn):
    """Bad input ends as one line on stderr and exit code 1, not a traceback; an unexpected failure
    is one line too (exit 2), saying how to get its traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from surgeon.log import setup_cli_logging

        debug = debug_enabled()
        setup_cli_logging(debug)
        try:
            return fn(*args, **kwargs)
        except SurgeonError as exc:
            if debug:
                raise
            click.echo(f"error: {first_line(exc)}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except BrokenPipeError:  # `surgeon layers ... | head`: the reader has what it wanted
            _silence_stdout()
            sys.exit(141)  # 128 + SIGPIPE, what a shell reports for a tool that stopped on a closed pipe
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit):
            raise
        except ImportError as exc:  # a deploy-only install running a training command
            extra = missing_extra(exc, f"surgeon {_command_name()}")
            if extra is None or debug:
                raise
            click.echo(f"error: {extra}", err=True)
            sys.exit(1)
        except MemoryError:
            if debug:
                raise
            click.echo("error: out of memory (try a smaller --batch-size or --input-size)", err=True)
            sys.exit(1)
        except Exception as exc:  # a bug or an unforeseen input: still one line, the traceback on request
            if debug:
                raise
            click.echo(f"error: {type(exc).__name__}: {first_line(exc)[:500]} (this is a surgeon bug or an input it "
                       f"does not check yet: rerun with `surgeon --debug ...` for the traceback and report it)", err=True)
            sys.exit(2)

    return wrapper
