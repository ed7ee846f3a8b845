"""README.md renders as intended and its commands are ones the CLI accepts."""

from __future__ import annotations

import re
import shlex

import click
import pytest
from markdown_it import MarkdownIt

from surgeon.cli import cli

from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()
TOKENS = MarkdownIt("commonmark").parse(README)


def _code_blocks(*langs: str) -> list[str]:
    return [t.content for t in TOKENS if t.type in ("fence", "code_block") and (not langs or t.info.strip() in langs)]


def _surgeon_commands() -> list[list[str]]:
    """Every ``surgeon ...`` command in the README's code blocks, continuation lines joined."""
    commands = []
    for block in _code_blocks():
        text = re.sub(r"\\\n\s*", " ", block)
        for line in text.splitlines():
            line = line.split(" #", 1)[0].strip()
            m = re.search(r"(?:^|\s)(?:surgeon|-m surgeon)\s+([a-z][\w-]*(?:\s.*)?)$", line)
            if m and not line.startswith(("#", "pip ")):
                commands.append(shlex.split(m.group(1).replace("~", "/home/user")))
    return commands


def test_only_the_title_is_a_top_level_heading():
    # A code fence closed too early turns a `# comment` of a shell block into a heading.
    h1 = [TOKENS[i + 1].content for i, t in enumerate(TOKENS) if t.type == "heading_open" and t.tag == "h1"]
    assert h1 == ["surgeon"]


def test_fences_are_balanced_and_no_fence_marker_renders_as_text():
    assert README.count("\n```") % 2 == 0
    for t in TOKENS:
        if t.type == "inline":
            assert "```" not in t.content, t.content[:80]


def test_every_command_line_in_prose_is_code():
    # Lines that start like a command must be inside a code block, not rendered as prose.
    for t in TOKENS:
        if t.type == "inline":
            for line in t.content.splitlines():
                words = line.split()
                command = len(words) >= 2 and (words[0] == "surgeon" and words[1] in cli.commands
                                         or " ".join(words[:2]) in ("pip install", "make demo", "make test", "docker run"))
                assert not command, f"a command rendered as prose: {line}"


COMMANDS = _surgeon_commands()


def test_the_readme_shows_commands():
    assert len(COMMANDS) >= 10 and {c[0] for c in COMMANDS} >= {"finetune", "export", "build", "predict", "serve"}


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(c)[:60] for c in COMMANDS])
def test_readme_commands_use_real_subcommands_and_options(argv):
    name, *args = argv
    assert name in cli.commands, f"README uses `surgeon {name}`, which does not exist"
    cmd = cli.commands[name]
    known = {opt for p in cmd.params if isinstance(p, click.Option) for opt in (*p.opts, *p.secondary_opts)}
    known |= {"-h", "--help"}
    for arg in args:
        if arg.startswith("-") and not re.match(r"^-\d", arg):
            flag = arg.split("=", 1)[0]
            assert flag in known, f"`surgeon {name}` has no option {flag}"
