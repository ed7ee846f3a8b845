"""``surgeon finetune``: grow a pretrained model and fine-tune it (torchvision reference-script flags)."""

from __future__ import annotations

import os
from dataclasses import fields

import click

from surgeon.commands.common import CONTEXT, friendly_errors
from surgeon.errors import SurgeonError
from surgeon.grow.recipe import GROW_KINDS, INITS, GrowStep, read_recipe_file
from surgeon.train.config import TUNE_MODES, FinetuneConfig

_D = FinetuneConfig()
_STEP = {f.name: f.default for f in fields(GrowStep)}  # a growth step's defaults (init, gamma_init, norm)
# The options a resumed run takes from the command line; every other setting is the interrupted run's.
_RESUME_OPTIONS = {"resume", "epochs", "trust_code", "data_root", "quiet"}


def growth_steps(grow: tuple[str, ...], layer: tuple[str, ...], units: tuple[int, ...], recipe: str | None,
                 init: str, gamma_init: str, norm: bool) -> list[GrowStep]:
    """Pair the repeatable --grow/--layer/--units options (or read --recipe)."""
    if recipe:
        if grow or layer or units:
            raise SurgeonError("use either --recipe or --grow/--layer/--units, not both")
        return read_recipe_file(recipe)
    if not grow and not layer and not units:
        return []
    if not (len(grow) == len(layer)) or len(units) not in (1, len(grow)):
        raise SurgeonError(
            f"each --grow needs its --layer and --units (got {len(grow)} --grow, {len(layer)} --layer, {len(units)} --units); "
            "one --units applies to every step"
        )
    if not units:
        raise SurgeonError("--grow needs --units K (how many units to add)")
    all_units = units * len(grow) if len(units) == 1 else units
    return [GrowStep(kind=g, layer=l, units=u, init=init, norm=norm, gamma_init=gamma_init)
            for g, l, u in zip(grow, layer, all_units)]


@click.command("finetune", context_settings=CONTEXT)
@click.option("--model", "model_spec", default=_D.model, show_default=True,
              help="torchvision:NAME, timm:NAME, surgeon:NAME, a surgeon checkpoint (.pt), or MODULE:CLASS / FILE.py:CLASS.")
@click.option("--weights", default=_D.weights, show_default=True,
              help="DEFAULT, none, a torchvision weights name (IMAGENET1K_V1), or a local state-dict file.")
@click.option("--data", default=_D.data, show_default=True,
              help="An ImageFolder DIR (DIR/train + DIR/val, or DIR/<class>/ with --val-split), builtin:NAME, or torchvision:NAME.")
@click.option("--grow", type=click.Choice(GROW_KINDS), multiple=True, help="wide: add units to --layer; deep: insert a block after it. Repeatable.")
@click.option("--layer", multiple=True, help="The layer to grow (see `surgeon layers`). One per --grow.")
@click.option("--units", type=int, multiple=True, help="Units to add. One per --grow, or one for all.")
@click.option("--recipe", type=click.Path(dir_okay=False), help='JSON list of steps, e.g. [{"kind": "wide", "layer": "classifier.3", "units": 1024}].')
@click.option("--init", type=click.Choice(INITS), default=_STEP["init"], show_default=True, help="New-unit initialisation.")
@click.option("--gamma-init", default=_STEP["gamma_init"], show_default=True, help="GrowNorm scale init: auto (from a data batch) or a number (ParseNet/SSD use 10-20).")
@click.option("--norm/--no-norm", default=_STEP["norm"], show_default=True, help="Insert GrowNorm after grown layers (without it, random new units learn slowly).")
@click.option("--tune", type=click.Choice(TUNE_MODES), default=_D.tune, show_default=True,
              help="Pretrained parameters that train: none (new), those from the first grown layer up (top), or all.")
@click.option("--baseline", is_flag=True, help="Plain fine-tuning with a new head and no growth, for comparison.")
@click.option("--head", default=None, help="Name of the classifier head to replace (found automatically).")
@click.option("--epochs", type=int, default=_D.epochs, show_default=True)
@click.option("-b", "--batch-size", type=int, default=_D.batch_size, show_default=True, help="Images per batch (per process under torchrun).")
@click.option("--lr", type=float, default=_D.lr, show_default=True, help="Base learning rate (pretrained parameters).")
@click.option("--lr-new-mult", type=float, default=_D.lr_new_mult, show_default=True, help="Learning-rate multiplier of new units, γ and the head.")
@click.option("--momentum", type=float, default=_D.momentum, show_default=True)
@click.option("--wd", "--weight-decay", "wd", type=float, default=_D.wd, show_default=True)
@click.option("--lr-step", type=int, default=None, help="Divide the learning rate by 10 every N epochs [default: once, at 2/3 of the run].")
@click.option("-j", "--workers", type=int, default=_D.workers, show_default=True, help="Data-loading worker processes.")
@click.option("--amp", is_flag=True, help="Mixed precision (fp16 on CUDA, bf16 on CPU).")
@click.option("--device", default=_D.device, show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--seed", type=int, default=_D.seed, show_default=True)
@click.option("--output-dir", type=click.Path(file_okay=False), default=_D.output_dir, show_default=True)
@click.option("--resume", type=click.Path(exists=True), default=None, help="Continue an interrupted run from its --output-dir (or its checkpoint.pt).")
@click.option("--val-split", type=float, default=_D.val_split, show_default=True, help="Validation fraction when --data is a single folder.")
@click.option("--input-size", type=int, default=None, help="Input resolution (default: the model's).")
@click.option("--augment/--no-augment", default=True, show_default=True, help="Training-time augmentation.")
@click.option("--skip-bad-images", is_flag=True, help="Drop unreadable images (checked up front) instead of stopping.")
@click.option("--max-image-pixels", type=click.IntRange(min=0), default=_D.max_image_pixels, show_default=True,
              help="Refuse training images with more pixels than this, before decoding (0 = no limit).")
@click.option("--calib-samples", type=int, default=_D.calib_samples, show_default=True, help="Images used to calibrate --gamma-init auto.")
@click.option("--data-root", default=None, help="Download folder for torchvision:NAME data sets.")
@click.option("--trust-code", is_flag=True, help="Allow importing the user code a checkpoint was grown from.")
@click.option("--quiet", is_flag=True, help="No progress bars or per-epoch lines.")
@click.pass_context
@friendly_errors
def finetune(ctx: click.Context, model_spec, weights, data, grow, layer, units, recipe, init, gamma_init, norm, tune,
             baseline, head, epochs, batch_size, lr, lr_new_mult, momentum, wd, lr_step, workers, amp, device, seed,
             output_dir, resume, val_split, input_size, augment, skip_bad_images, max_image_pixels, calib_samples, data_root,
             trust_code, quiet) -> None:
    """Grow a pretrained model and fine-tune it on a target task; writes metrics.jsonl, curves.png,
    checkpoint.pt (for --resume) and grown.pt to --output-dir.

    \b
    Examples:
      # the paper's WA-CNN on an offline set: widen fc7 of the shipped DigitNet
      surgeon finetune --model surgeon:digitnet --data builtin:digits-target \\
          --grow wide --layer classifier.3 --units 128 --output-dir runs/wide
      # plain fine-tuning of the same model, for comparison
      surgeon finetune --model surgeon:digitnet --data builtin:digits-target --baseline --output-dir runs/base
      # WWA on VGG16 (widen fc6 and fc7), your images, 2 processes
      torchrun --nproc_per_node=2 -m surgeon finetune --model torchvision:vgg16 --data ~/flowers \\
          --grow wide --layer classifier.0 --grow wide --layer classifier.3 --units 1024
    """
    from surgeon.train.finetune import finetune as run

    if resume:
        given = [p.opts[0] for p in ctx.command.params if p.name not in _RESUME_OPTIONS
                 and ctx.get_parameter_source(p.name) == click.core.ParameterSource.COMMANDLINE]
        if given:
            raise SurgeonError(f"--resume continues a run with its own settings and output folder; {', '.join(given)} "
                               f"cannot change (with --resume only {', '.join('--' + o.replace('_', '-') for o in sorted(_RESUME_OPTIONS - {'resume'}))} apply)")
        explicit = ctx.get_parameter_source("epochs") == click.core.ParameterSource.COMMANDLINE
        # Only what says who to trust and where downloads go is taken from the command line; the
        # experiment itself (model, data, recipe, schedule) is the interrupted run's.
        caller = FinetuneConfig(trust_code=trust_code, data_root=data_root)
        result = run(caller, resume=resume, progress=not quiet, epochs_override=epochs if explicit else None)
    else:
        steps = growth_steps(grow, layer, units, recipe, init, gamma_init, norm)
        config = FinetuneConfig(
            model=model_spec, weights=weights, data=data, output_dir=output_dir, grow=steps, baseline=baseline,
            head=head, input_size=input_size, tune=tune, epochs=epochs, batch_size=batch_size, lr=lr,
            lr_new_mult=lr_new_mult, momentum=momentum, wd=wd, lr_step=lr_step, workers=workers, amp=amp,
            device=device, seed=seed, val_split=val_split, augment=augment, skip_bad_images=skip_bad_images,
            max_image_pixels=max_image_pixels,
            calib_samples=calib_samples, trust_code=trust_code, data_root=data_root,
        )
        result = run(config, progress=not quiet)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        return
    click.echo(f"final val accuracy {100 * result.final_acc:.2f}% (best {100 * result.best_acc:.2f}%); "
               f"wrote {result.output_dir / 'grown.pt'}")
