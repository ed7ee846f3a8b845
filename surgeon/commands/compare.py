"""``surgeon compare``: fine-tuning runs side by side."""

from __future__ import annotations

import click

from surgeon.commands.common import CONTEXT, friendly_errors


@click.command("compare", context_settings=CONTEXT)
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("-o", "--output", default="compare", show_default=True, type=click.Path(file_okay=False),
              help="Folder for compare.md, compare.json and curves.png.")
@friendly_errors
def compare(runs: tuple[str, ...], output: str) -> None:
    """Compare fine-tuning runs (their --output-dir folders): final validation accuracy, mean ± std
    over the seeds of each configuration, and overlaid learning curves. Runs that differ only in
    their seed are grouped.

    \b
    Example:
      surgeon compare runs/baseline-s* runs/wide-s* runs/deep-s* -o runs/compare
    """
    from surgeon.analyze.compare import compare_runs

    groups, table = compare_runs(list(runs), output)
    click.echo(table, nl=False)
    click.echo(f"wrote {output}/compare.md, compare.json and curves.png ({len(groups)} configuration(s), {len(runs)} run(s))")
