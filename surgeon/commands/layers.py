"""``surgeon layers``: which layers of a model can be grown."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import click

from surgeon.commands.common import CONTEXT, friendly_errors
from surgeon.errors import SurgeonError

if TYPE_CHECKING:
    from surgeon.grow.analysis import LayerInfo


def analysed_layers(model_spec: str, weights: str, input_size: int | None, *, trust_code: bool = False) -> list[LayerInfo]:
    """The layer table of ``--model``. Only the structure matters, so with ``--weights none`` the model
    is first built on the meta device: no weights initialized (seconds for the largest torchvision
    models) and shapes propagated without computing a forward pass. A model that does not build,
    trace or run there (a tensor made on the CPU inside its forward, say) is analysed as usual."""
    from surgeon.grow.analysis import layer_table, propagate_shapes, trace
    from surgeon.source import is_checkpoint_spec, open_model

    try_meta = weights.lower() == "none" and not is_checkpoint_spec(model_spec)
    for meta in (True, False) if try_meta else (False,):
        try:
            src = open_model(model_spec, weights, input_size, trust_code=trust_code, meta=meta)
            gm = trace(src.module)
            propagate_shapes(gm, input_size or src.preprocessing.input_size)
            return layer_table(gm)
        except Exception:
            if not meta:
                raise
    raise AssertionError("unreachable")


@click.command("layers", context_settings=CONTEXT)
@click.option("--model", "model_spec", required=True, help="torchvision:NAME, timm:NAME, surgeon:NAME, a checkpoint file, or MODULE:CLASS / FILE.py:CLASS.")
@click.option("--weights", default="none", show_default=True, help="Weights to load (only the structure matters here).")
@click.option("--input-size", type=int, default=None, help="Input resolution used to infer shapes (default: the model's).")
@click.option("--all", "show_all", is_flag=True, help="Also list layers that cannot be grown, with the reason.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--trust-code", is_flag=True, help="Allow importing the user code a checkpoint was grown from.")
@friendly_errors
def layers(model_spec: str, weights: str, input_size: int | None, show_all: bool, as_json: bool, trust_code: bool) -> None:
    """List the Linear/Conv2d layers of a model with their shapes and whether they can be widened
    (--grow wide) or deepened after (--grow deep).

    \b
    Examples:
      surgeon layers --model torchvision:resnet18
      surgeon layers --model timm:convnext_atto
      surgeon layers --model surgeon:digitnet --all
    """
    rows = analysed_layers(model_spec, weights, input_size, trust_code=trust_code)
    if not rows:
        raise SurgeonError(f"{model_spec} has no Linear or Conv2d layer")
    shown = [r for r in rows if show_all or r.wide == "ok" or r.deep == "ok"]
    if as_json:
        click.echo(json.dumps([{**r.__dict__, "out_shape": list(r.out_shape or [])} for r in shown], indent=2))
        return
    header = ("layer", "type", "in", "out", "kernel", "output", "wide", "deep")
    table = [header] + [
        (r.name, r.kind, str(r.in_channels), str(r.out_channels), r.kernel,
         "x".join(str(s) for s in (r.out_shape or ())[1:]), r.wide, r.deep)
        for r in shown
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    hidden = len(rows) - len(shown)
    if hidden:
        click.echo(f"({hidden} layers that cannot be grown are hidden; --all shows them and why)")
