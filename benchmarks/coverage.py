"""Which layers `surgeon layers` can grow, for every torchvision classification model.

For each name in ``torchvision.models.list_models(module=torchvision.models)``: the rows of
``surgeon layers --model torchvision:NAME --weights none`` (``analysed_layers``, timed), the number
of growable non-head layers (``wide == "ok"``) out of all Linear/Conv2d layers, the last growable
one, and whether the *last block's* sites are growable. Those sites come from the module structure
(``last_block_sites``), not from a per-model list:

- mlp: the first Linear of the last transformer / ConvNeXt block's MLP (ViT ``EncoderBlock.mlp``,
  Swin ``SwinTransformerBlock[V2].mlp``, MaxViT ``PartitionAttentionLayer.mlp_layer``, ConvNeXt
  ``CNBlock.block``);
- expansion: the first conv of the last inverted-residual block (MobileNetV2/V3 ``InvertedResidual``,
  EfficientNet ``MBConv``/``FusedMBConv``, MNASNet ``_InvertedResidual``, MaxViT ``MBConv``) where it
  expands (groups 1, more output than input channels);
- bottleneck: the first conv of the last bottleneck-type block, whose output reaches only the
  block's next conv, grouped or depthwise conv (ResNet ``Bottleneck``/``BasicBlock.conv1``, RegNet
  ``ResBottleneckBlock.f.a``, DenseNet ``_DenseLayer.conv1``, ShuffleNetV2 ``InvertedResidual.branch2``'s
  first conv, SqueezeNet ``Fire.squeeze``);
- concat: the last concat block's first branch conv (GoogLeNet ``Inception.branch1``, Inception-v3
  ``InceptionE.branch1x1``, DenseNet ``_DenseLayer.conv2``, SqueezeNet ``Fire.expand1x1``).

For the other non-head layers it counts the refusal reasons (layer names and numbers masked). Writes
a Markdown table grouped by family and a JSON file; tests/grow/test_coverage.py applies the same
structural rules.

    python benchmarks/coverage.py [--models NAME,...] [--md build/coverage.md] [--json build/coverage.json] [--readme table.md] [--cold 5]
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from torch import nn

FAMILIES = ("alexnet", "vgg", "resnet", "wide_resnet", "resnext", "regnet_x", "regnet_y", "densenet",
            "googlenet", "inception", "squeezenet", "shufflenet", "mobilenet_v2", "mobilenet_v3", "mnasnet",
            "efficientnet", "efficientnet_v2", "convnext", "vit", "swin", "swin_v2", "maxvit")

# (module that defines it, class name) of a block → the child holding the MLP whose first Linear is the site
MLP_BLOCKS = {("torchvision.models.vision_transformer", "EncoderBlock"): "mlp",
              ("torchvision.models.swin_transformer", "SwinTransformerBlock"): "mlp",
              ("torchvision.models.swin_transformer", "SwinTransformerBlockV2"): "mlp",
              ("torchvision.models.maxvit", "PartitionAttentionLayer"): "mlp_layer", ("torchvision.models.convnext", "CNBlock"): "block"}
# (module, class) of inverted-residual blocks: the first conv is the expansion conv
EXPANSION_BLOCKS = {("torchvision.models.mobilenetv2", "InvertedResidual"), ("torchvision.models.mobilenetv3", "InvertedResidual"),
                    ("torchvision.models.efficientnet", "MBConv"), ("torchvision.models.efficientnet", "FusedMBConv"),
                    ("torchvision.models.mnasnet", "_InvertedResidual"), ("torchvision.models.maxvit", "MBConv")}
# (module, class) → the child whose first conv is the site
BOTTLENECK_BLOCKS = {("torchvision.models.resnet", "Bottleneck"): "conv1", ("torchvision.models.resnet", "BasicBlock"): "conv1",
                     ("torchvision.models.regnet", "ResBottleneckBlock"): "f.a", ("torchvision.models.densenet", "_DenseLayer"): "conv1",
                     ("torchvision.models.shufflenetv2", "InvertedResidual"): "branch2", ("torchvision.models.squeezenet", "Fire"): "squeeze"}
CONCAT_BLOCKS = {("torchvision.models.googlenet", "Inception"): "branch1", ("torchvision.models.inception", "InceptionE"): "branch1x1",
                 ("torchvision.models.densenet", "_DenseLayer"): "conv2", ("torchvision.models.squeezenet", "Fire"): "expand1x1"}
KINDS = ("mlp", "expansion", "bottleneck", "concat")
TABLES = {"mlp": MLP_BLOCKS, "expansion": EXPANSION_BLOCKS, "bottleneck": BOTTLENECK_BLOCKS, "concat": CONCAT_BLOCKS}


def block_kinds(name: str) -> list[str]:
    """The kinds of last-block site torchvision model ``name`` can have: those with a block class
    defined in the module of its builder (no model is built)."""
    import torchvision

    module = torchvision.models.get_model_builder(name).__module__
    return [kind for kind in KINDS if any(mod == module for mod, _ in TABLES[kind])]


def family(name: str) -> str:
    """The family of a torchvision model name (longest matching prefix of FAMILIES)."""
    fams = [f for f in FAMILIES if name == f or name.startswith(f + "_") or re.match(rf"{f}\d", name)]
    if not fams:
        raise ValueError(f"no family for {name}")
    return max(fams, key=len)


def _first(module: nn.Module, prefix: str, kind: type) -> str | None:
    for sub, m in module.named_modules():
        if isinstance(m, kind):
            return f"{prefix}.{sub}" if sub else prefix
    return None


def last_block_sites(model: nn.Module) -> dict[str, str]:
    """{kind: layer name} for the last block of each kind the model has (see the module docstring)."""
    last: dict[str, str] = {}
    for name, m in model.named_modules():
        key = (type(m).__module__, type(m).__name__)
        for kind, table, layer in (("mlp", MLP_BLOCKS, nn.Linear), ("bottleneck", BOTTLENECK_BLOCKS, nn.Conv2d),
                                   ("concat", CONCAT_BLOCKS, nn.Conv2d)):
            if key in table:
                site = _first(m.get_submodule(table[key]), f"{name}.{table[key]}", layer)
                if site:
                    last[kind] = site
        if key in EXPANSION_BLOCKS:
            site = _first(m, name, nn.Conv2d)
            conv = model.get_submodule(site) if site else None
            if conv is not None and conv.groups == 1 and conv.out_channels > conv.in_channels:
                last["expansion"] = site
            else:
                last.pop("expansion", None)  # the last such block does not expand: nothing to require
    return last


def mask_reason(reason: str) -> str:
    """A refusal reason with layer names, node suffixes and numbers masked, to count alike ones together."""
    reason = re.sub(r"'[^']*'", "'…'", reason)
    reason = re.sub(r"\(([a-z_]+?)(?:_\d+)?\)", r"(\1)", reason)
    return re.sub(r"(?<![A-Za-z])\d+", "N", reason)


def analyse(name: str) -> dict:
    """One model's coverage row (see the module docstring)."""
    from surgeon.commands.layers import analysed_layers
    from surgeon.zoo import load_base

    t0 = time.perf_counter()
    rows = analysed_layers(f"torchvision:{name}", "none", None)
    seconds = time.perf_counter() - t0
    sites = last_block_sites(load_base(f"torchvision:{name}", "none", meta=True).module)
    by_name = {r.name: r for r in rows}
    growable = [r.name for r in rows if r.wide == "ok" and not r.is_head]
    refused = collections.Counter(mask_reason(r.wide) for r in rows if r.wide != "ok" and not r.is_head)
    return {
        "model": name, "family": family(name), "seconds": round(seconds, 3),
        "layers": len(rows), "growable": len(growable), "head": next((r.name for r in rows if r.is_head), None),
        "last_growable": growable[-1] if growable else None,
        "last_block": {kind: {"layer": site, "growable": site in by_name and by_name[site].wide == "ok",
                              "reason": None if site not in by_name or by_name[site].wide == "ok" else by_name[site].wide}
                       for kind, site in sites.items()},
        "refused": refused.most_common(),
    }


def markdown(results: list[dict]) -> str:
    lines = ["| family | model | growable / layers | last growable | last block's sites (✓ growable, ✗ refused) | s |",
             "|---|---|---:|---|---|---:|"]
    for fam in FAMILIES:
        for r in (r for r in results if r["family"] == fam):
            if "error" in r:
                lines.append(f"| {fam} | {r['model']} | error | {r['error']} | | |")
                continue
            blocks = ", ".join(f"{k} `{v['layer']}` {'✓' if v['growable'] else '✗'}" for k, v in r["last_block"].items())
            lines.append(f"| {fam} | {r['model']} | {r['growable']}/{r['layers']} | `{r['last_growable']}` | {blocks or '—'} | {r['seconds']:.2f} |")
    return "\n".join(lines)


def family_summary(results: list[dict]) -> str:
    """One row per family: its models' counts, the last-block kinds, the most common refusals."""
    lines = ["| family | growable non-head / Linear+Conv2d layers | last block's sites growable | most common refusals |",
             "|---|---|---|---|"]
    for fam in FAMILIES:
        rs = [r for r in results if r["family"] == fam and "error" not in r]
        if not rs:
            continue
        counts = ", ".join(f"{r['model']} {r['growable']}/{r['layers']}" for r in rs)
        kinds = collections.defaultdict(list)
        for r in rs:
            for k, v in r["last_block"].items():
                kinds[k].append(v["growable"])
        blocks = ", ".join(f"{k} {sum(v)}/{len(v)}" for k, v in kinds.items()) or "—"
        refused: collections.Counter = collections.Counter()
        for r in rs:
            refused.update(dict(r["refused"]))
        top = "; ".join(f"{why} ({n})" for why, n in refused.most_common(3)) or "—"
        lines.append(f"| {fam} | {counts} | {blocks} | {top} |")
    return "\n".join(lines)


SHORT = (("residual add", "residual add"), ("product with another tensor", "SE product"), ("a concat", "concat"),
         ("no growable layer feeds it", "depthwise, no growable feeder"), ("depthwise conv", "depthwise (grows with its feeder)"), ("grouped conv", "grouped (by whole groups, via its feeder)"),
         ("permute", "permute"), ("LayerNorm", "LayerNorm"), ("no image-dependent input", "image-independent input"),
         ("chunk", "chunk"), ("reshape", "reshape"), ("a view surgeon cannot follow", "view"), ("not a Linear or Conv2d", "not Linear/Conv2d"))


def short_reason(reason: str) -> str:
    return next((label for key, label in SHORT if key in reason), reason[:40])


def readme_table(results: list[dict]) -> str:
    """The README's table: per family, each model's growable non-head / Linear+Conv2d layers, the
    last block's sites and whether they grow, and the refusals of the other layers in short."""
    lines = ["| family | growable non-head / Linear+Conv2d layers | last block's sites, all models (✓ growable), in the first | other layers refused: why (count) |",
             "|---|---|---|---|"]
    for fam in FAMILIES:
        rs = sorted((r for r in results if r["family"] == fam and "error" not in r), key=lambda r: (r["layers"], r["model"]))
        if not rs:
            continue
        counts = ", ".join(f"{r['model']} {r['growable']}/{r['layers']}" for r in rs)
        blocks = "; ".join(f"{k} {sum(r['last_block'][k]['growable'] for r in rs)}/{len(rs)} {'✓' if all(r['last_block'][k]['growable'] for r in rs) else '✗'}"
                           f" `{v['layer']}`" for k, v in rs[0]["last_block"].items()) or "—"
        refused: collections.Counter = collections.Counter()
        for r in rs:
            for why, n in r["refused"]:
                refused[short_reason(why)] += n
        lines.append(f"| {fam} | {counts} | {blocks} | " + (", ".join(f"{w} ({n})" for w, n in refused.most_common()) or "—") + " |")
    return "\n".join(lines)


def main() -> None:
    import torch
    import torchvision

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="", help="comma-separated subset (default: all)")
    ap.add_argument("--md", type=Path, default=Path("build/coverage.md"), help="write the Markdown tables here")
    ap.add_argument("--json", type=Path, default=Path("build/coverage.json"), help="write the rows as JSON here")
    ap.add_argument("--readme", type=Path, default=None, help="write the README's coverage table here")
    ap.add_argument("--cold", type=int, default=5, help="the slowest N also run as `python -m surgeon layers` subprocesses")
    args = ap.parse_args()

    torch.set_grad_enabled(False)
    names = args.models.split(",") if args.models else sorted(torchvision.models.list_models(module=torchvision.models))
    results = []
    for name in names:
        try:
            r = analyse(name)
        except Exception as exc:  # reported in the table
            r = {"model": name, "family": family(name), "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
        results.append(r)
        print(f"{name}: " + (r["error"] if "error" in r else f"{r['growable']}/{r['layers']} in {r['seconds']:.2f} s, last "
              + ", ".join(f"{k} {'ok' if v['growable'] else 'refused'}" for k, v in r["last_block"].items())), file=sys.stderr, flush=True)
    ok = [r for r in results if "error" not in r]
    times = [r["seconds"] for r in ok]
    cold = {}
    for r in sorted(ok, key=lambda r: -r["seconds"])[: args.cold]:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "surgeon", "layers", "--model", f"torchvision:{r['model']}"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cold[r["model"]] = r["cold_seconds"] = round(time.perf_counter() - t0, 3)
    rev = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
    summary = {
        "models": len(results), "with_growable_non_head": sum(r["growable"] > 0 for r in ok),
        "last_block_sites": sum(len(r["last_block"]) for r in ok),
        "last_block_sites_growable": sum(v["growable"] for r in ok for v in r["last_block"].values()),
        "seconds_max": max(times, default=0.0), "seconds_median": statistics.median(times) if times else 0.0,
        "slowest": max(ok, key=lambda r: r["seconds"])["model"] if ok else None,
        "cold_subprocess_seconds": cold,
        "torch": torch.__version__, "torchvision": torchvision.__version__, "threads": torch.get_num_threads(), "revision": rev,
    }
    head = (f"{summary['with_growable_non_head']}/{summary['models']} models with a growable non-head layer; last-block sites "
            f"growable {summary['last_block_sites_growable']}/{summary['last_block_sites']}; `analysed_layers` max "
            f"{summary['seconds_max']:.2f} s ({summary['slowest']}), median {summary['seconds_median']:.2f} s"
            + (f"; cold `python -m surgeon layers` of the slowest: " + ", ".join(f"{n} {s:.2f} s" for n, s in cold.items()) if cold else "")
            + f" (torch {summary['torch']}, torchvision {summary['torchvision']}, {summary['threads']} threads, revision {rev})")
    text = head + "\n\n" + family_summary(results) + "\n\n" + markdown(results) + "\n"
    print(text)
    for out in (args.md, args.json, args.readme):
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
    if args.md:
        args.md.write_text(text)
    if args.readme:
        args.readme.write_text(readme_table(results) + "\n")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "models": results}, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
