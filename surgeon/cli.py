"""The ``surgeon`` command line (click): one sub-command per module in :mod:`surgeon.commands`."""

from __future__ import annotations

import click

from surgeon import __version__
from surgeon.collect import freeze_for_exit
from surgeon.commands.analyze import analyze
from surgeon.commands.build import build
from surgeon.commands.common import CONTEXT
from surgeon.commands.compare import compare
from surgeon.commands.demo import demo
from surgeon.commands.export import export, verify
from surgeon.commands.finetune import finetune
from surgeon.commands.layers import layers
from surgeon.commands.predict import bench, predict
from surgeon.commands.quantize import quantize
from surgeon.commands.serve import serve


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="surgeon")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error (also: SURGEON_DEBUG=1).")
def cli(debug: bool) -> None:
    """Grow pretrained networks, fine-tune them, and deploy them.

    \b
    Example (offline, minutes on a laptop CPU):
      surgeon layers --model surgeon:digitnet
      surgeon finetune --model surgeon:digitnet --data builtin:digits-target \\
          --grow wide --layer classifier.3 --units 128 --output-dir runs/wide
    """


cli.add_command(layers)
cli.add_command(finetune)
cli.add_command(demo)
cli.add_command(export)
cli.add_command(verify)
cli.add_command(quantize)
cli.add_command(build)
cli.add_command(predict)
cli.add_command(bench)
cli.add_command(serve)
cli.add_command(analyze)
cli.add_command(compare)


def main() -> None:
    try:
        cli(prog_name="surgeon")
    finally:  # click ends with SystemExit: this runs before the interpreter shuts down
        freeze_for_exit()
