"""Every CLI failure is one line on stderr; ``--debug`` (or SURGEON_DEBUG=1) shows the traceback."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import surgeon.source
from surgeon.cli import cli


def _boom(*args, **kwargs):
    raise RuntimeError("something nobody checked\nsecond line of detail")


def test_an_unexpected_exception_is_one_line_with_exit_2(monkeypatch):
    monkeypatch.setattr(surgeon.source, "open_model", _boom)
    res = CliRunner().invoke(cli, ["layers", "--model", "surgeon:digitnet"])
    assert res.exit_code == 2
    assert res.stderr.startswith("error: RuntimeError: something nobody checked (this is a surgeon bug")
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.output and "second line" not in res.output


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(monkeypatch, how):
    monkeypatch.setattr(surgeon.source, "open_model", _boom)
    args = ["layers", "--model", "surgeon:digitnet"]
    if how == "flag":
        args = ["--debug", *args]
    else:
        monkeypatch.setenv("SURGEON_DEBUG", "1")
    res = CliRunner().invoke(cli, args)
    assert isinstance(res.exception, RuntimeError)  # re-raised: the traceback is printed by Python


def test_a_surgeon_error_is_re_raised_under_debug(monkeypatch):
    res = CliRunner().invoke(cli, ["--debug", "layers", "--model", "torchvision:no_such_net"])
    assert res.exception is not None and type(res.exception).__name__.endswith("Error")
    res = CliRunner().invoke(cli, ["layers", "--model", "torchvision:no_such_net"])
    assert res.exit_code == 1 and res.stderr.startswith("error: ") and res.stderr.count("\n") == 1


def test_a_closed_pipe_ends_quietly():
    """`surgeon layers ... | head`: the reader closing the pipe is no error and no surgeon bug."""
    import subprocess
    import sys

    code = ("import sys; from surgeon.commands.common import friendly_errors\n"
            "@friendly_errors\n"
            "def main():\n"
            "    for i in range(10**6):\n"
            "        print('layer', i)\n"
            "main()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()  # what `head -1` does after its line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141
    assert err == ""
