"""The command line answers ``--help`` without loading PyTorch (or onnx, numpy, PIL): every command's
options come from plain-Python modules (surgeon.spec, surgeon.contract, surgeon.grow.recipe,
surgeon.train.config), and each command imports its framework only when it runs."""

from __future__ import annotations

import json
import subprocess
import sys

from surgeon.cli import cli

HEAVY = ("torch", "torchvision", "onnx", "onnxruntime", "numpy", "PIL", "tensorrt_rtx", "matplotlib", "sklearn")

# One subprocess (a fresh interpreter) answers every --help in turn and reports, after each, which of
# HEAVY it has imported so far: the first command that loads one is named.
_SCRIPT = f"""
import json, sys
from surgeon.cli import cli
heavy = {HEAVY!r}
seen = {{}}
for args in json.loads(sys.argv[1]):
    try:
        cli(args, prog_name="surgeon", standalone_mode=False)
    except SystemExit as exc:
        assert not exc.code, (args, exc.code)
    seen[" ".join(args)] = [m for m in heavy if m in sys.modules]
print(json.dumps(seen))
"""


def test_every_help_imports_no_framework():
    commands = [["--help"]] + [[name, "--help"] for name in sorted(cli.commands)]
    assert len(commands) > 10  # every registered command, not a hand-kept list
    out = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(commands)], capture_output=True, text=True,
                         check=True).stdout
    seen = json.loads(out.strip().splitlines()[-1])
    assert set(seen) == {" ".join(c) for c in commands}
    assert {args: mods for args, mods in seen.items() if mods} == {}


def test_cli_choices_are_the_library_constants():
    from surgeon.grow.recipe import GROW_KINDS, INITS
    from surgeon.spec import BACKENDS, BUILDERS, PLUGIN_CHOICES, PRECISIONS
    from surgeon.train.config import TUNE_MODES

    def choices(command: str, option: str) -> tuple[str, ...]:
        param = next(p for p in cli.commands[command].params if p.name == option)
        return tuple(param.type.choices)

    assert choices("finetune", "grow") == GROW_KINDS and choices("finetune", "init") == INITS
    assert choices("finetune", "tune") == TUNE_MODES
    for command in ("predict", "bench", "serve"):
        assert choices(command, "backend") == BACKENDS
    for command in ("build", "export"):
        assert choices(command, "builder") == BUILDERS and choices(command, "plugin") == PLUGIN_CHOICES
        assert choices(command, "precision") == PRECISIONS
    from surgeon.spec import CALIB_METHODS, GROWNORM_RANGES, QUANT_TARGETS

    for command in ("quantize", "export"):
        assert choices(command, "calib_method") == CALIB_METHODS and choices(command, "target") == QUANT_TARGETS
        assert choices(command, "grownorm_ranges") == GROWNORM_RANGES
