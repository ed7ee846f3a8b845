"""The ``surgeon analyze`` report: PNG figures, a self-contained ``index.html`` that references them
relatively (same folder), and ``metrics.json`` with every number. All files are written atomically."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from surgeon.fileio import atomic_write, atomic_write_text
from surgeon.preprocessing import Preprocessing

GROUP_COLORS = {"old": "tab:blue", "new": "tab:orange", "units": "tab:green", "both": "tab:purple"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> str:
    plt = _plt()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    finally:
        plt.close(fig)
    return path.name


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "layer"


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.2f}%"


def public(obj: Any) -> Any:
    """``obj`` without the ``_``-prefixed keys (arrays for plotting), for ``metrics.json``."""
    if isinstance(obj, dict):
        return {k: public(v) for k, v in obj.items() if not (isinstance(k, str) and k.startswith("_"))}
    if isinstance(obj, list):
        return [public(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------------
# Figures


def plot_accuracy(name: str, info: dict[str, Any], path: Path) -> str:
    plt = _plt()
    bars = [(f"model: {k.replace('_', ' ')}", v) for k, v in info["accuracy"].items()]
    bars += [(f"probe: {k}", v) for k, v in info["probe_accuracy"].items()]
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(bars)), 3.8))
    labels = [b[0] for b in bars]
    values = [100 * (b[1] if b[1] is not None else 0.0) for b in bars]
    colors = [GROUP_COLORS.get(lbl.split(": ")[1].split(" ")[0], "gray") for lbl in labels]
    ax.bar(range(len(bars)), values, color=colors)
    for i, (lbl, v) in enumerate(bars):
        ax.text(i, values[i] + 1, "n/a" if v is None else f"{100 * v:.1f}", ha="center", fontsize=8)
    ax.set_xticks(range(len(bars)), labels, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="validation accuracy (%)", ylim=(0, 105), title=f"{name}: accuracy by unit group")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_histograms(title: str, values: dict[str, np.ndarray], xlabel: str, path: Path) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for k, v in values.items():
        v = np.asarray(v, dtype=np.float64).ravel()
        if v.size:
            ax.hist(v, bins=30, alpha=0.6, label=f"{k} ({v.size})", color=GROUP_COLORS.get(k))
    ax.set(xlabel=xlabel, ylabel="count", title=title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _group_labels(n: int) -> list[str]:
    if n == 1:
        return ["units"]
    return ["old"] + (["new"] if n == 2 else [f"new {i}" for i in range(1, n)])


def plot_gamma_history(name: str, hist: dict[str, Any], path: Path) -> str:
    plt = _plt()
    rows = ([(0, hist["init"])] if hist.get("init") is not None else []) + [
        (e["epoch"], e["mean_gamma"]) for e in hist["epochs"]]
    n = max(len(g) for _, g in rows)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for gi, label in enumerate(_group_labels(n)):
        pts = [(ep, g[gi]) for ep, g in rows if gi < len(g)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label, color=GROUP_COLORS.get(label))
    ax.set(xlabel="epoch (0 = initial value)", ylabel="mean γ", title=f"{name}: mean γ per group during fine-tuning")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_embeddings(name: str, info: dict[str, Any], labels: np.ndarray, classes: list[str], path: Path) -> str:
    plt = _plt()
    embs = info["_embeddings"]
    fig, axes = plt.subplots(1, len(embs), figsize=(4.2 * len(embs), 4.2), squeeze=False)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for ax, (k, xy) in zip(axes[0], embs.items()):
        for c in np.unique(labels):
            sel = labels == c
            ax.scatter(xy[sel, 0], xy[sel, 1], s=8, color=cmap(int(c) % cmap.N),
                       label=classes[int(c)] if len(classes) <= 20 else None)
        ax.set_title(f"{k} units ({info['embedding']['method'][k]})")
        ax.set_xticks([])
        ax.set_yticks([])
    if len(classes) <= 20:
        axes[0][-1].legend(fontsize=7, markerscale=2, loc="best")
    fig.suptitle(f"{name}: features coloured by class")
    fig.tight_layout()
    return _save(fig, path)


def _unnormalize(image: Any, pre: Preprocessing) -> np.ndarray:
    x = np.asarray(image, dtype=np.float32)
    mean = np.asarray(pre.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(pre.std, dtype=np.float32).reshape(-1, 1, 1)
    return np.clip(x * std + mean, 0.0, 1.0).transpose(1, 2, 0)


def plot_unit_grid(name: str, group: str, tops: list[dict[str, Any]], dataset: Any, classes: list[str],
                   pre: Preprocessing, path: Path) -> str:
    plt = _plt()
    cols = max((len(t["images"]) for t in tops), default=1)
    rows = max(len(tops), 1)
    fig, axes = plt.subplots(rows, cols, figsize=(1.8 * cols, 1.9 * rows + 0.4), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for r, t in enumerate(tops):
        for c, (idx, act) in enumerate(zip(t["images"], t["activations"])):
            image, label = dataset[idx]
            ax = axes[r][c]
            ax.imshow(_unnormalize(image, pre))
            ax.set_title(f"{classes[int(label)]} · {act:.2f}", fontsize=7)
        axes[r][0].text(-0.08, 0.5, f"unit {t['unit']}\nmean {t['mean_activation']:.2f}", fontsize=7,
                        transform=axes[r][0].transAxes, ha="right", va="center")
    fig.suptitle(f"{name}: top images of the {group} units (class · activation)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------------------------------------
# HTML


_CSS = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%;margin:.4em 0}
.note{color:#555;font-size:.92em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em}"""


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v: Any) -> str:
    return "–" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def _layer_html(name: str, info: dict[str, Any], figs: dict[str, str]) -> str:
    e = html.escape
    parts = [f"<h2>{e(name)} — {e(info['kind'])} layer, groups {e(str(info['groups']))}</h2>"]
    if info["kind"] == "deepened":
        parts.append("<p class='note'>One group: a deepened layer (all its units are new), so the old/new "
                     "comparisons do not apply; its statistics are shown for the whole layer.</p>")
    pool = ("Features of this convolutional layer are average-pooled over spatial positions (one value per "
            "channel and image) for the probes, the embedding and the unit ranking."
            if info["conv"] else "Features are taken per channel (a fully connected layer; no pooling).")
    parts.append(f"<p class='note'>{e(pool)}</p>")
    parts.append("<h3>1. Old vs new units</h3>")
    rows = [[f"model, {k.replace('_', ' ')}", _pct(v)] for k, v in info["accuracy"].items()]
    rows += [[f"linear probe on {k} units", _pct(v)] for k, v in info["probe_accuracy"].items()]
    parts.append(_table(["classifier", "accuracy"], rows))
    parts.append("<p class='note'>“only old/new”: the other group's channels are zeroed at the GrowNorm output "
                 "(a forward hook) and the rest of the model is unchanged. Probes: standardized logistic "
                 "regression on the GrowNorm output features, trained on one half of the evaluated images and "
                 "tested on the other.</p>")
    parts.append(f"<img src='{e(figs['accuracy'])}' alt='accuracy'>")
    parts.append("<h3>2. Scales and magnitudes</h3>")
    stat_rows = []
    for what, key in (("γ", "gamma"), ("activation L2 norm before GrowNorm", "activation_norm")):
        for g, s in (info[key] or {}).items():
            stat_rows.append([f"{what} ({g})"] + [_fmt(s.get(c)) for c in ("count", "mean", "std", "min", "median", "max")])
    parts.append(_table(["quantity", "count", "mean", "std", "min", "median", "max"], stat_rows))
    if "gamma" in figs:
        parts.append(f"<img src='{e(figs['gamma'])}' alt='gamma histogram'>")
    else:
        parts.append("<p class='note'>This GrowNorm has no learned scale γ.</p>")
    parts.append(f"<img src='{e(figs['norms'])}' alt='activation norms'>")
    parts.append("<p class='note'>Activation norm: per image, the L2 norm over the group's channels of the "
                 "GrowNorm input" + (", averaged over spatial positions" if info["conv"] else "") + ".</p>")
    if "gamma_history" in figs:
        parts.append(f"<img src='{e(figs['gamma_history'])}' alt='gamma history'>")
    else:
        parts.append("<p class='note'>The checkpoint's history does not record γ per epoch, so how γ moved "
                     "during fine-tuning cannot be shown.</p>")
    parts.append("<h3>3. Feature space</h3>")
    parts.append(f"<img src='{e(figs['embedding'])}' alt='embedding'>")
    parts.append("<h3>4. What units detect</h3>")
    parts.append("<p class='note'>Units with the highest mean activation (GrowNorm input" +
                 (", averaged over positions" if info["conv"] else "") + ") over the evaluated images, "
                 "each with its most activating validation images.</p>")
    for g in info["top_units"]:
        parts.append(f"<img src='{e(figs['units_' + g])}' alt='{e(g)} units'>")
    return "\n".join(parts)


def render_html(result: dict[str, Any], figs: dict[str, dict[str, str]]) -> str:
    e = html.escape
    head = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>surgeon analyze: {e(result['checkpoint'])}</title><style>{_CSS}</style></head><body>",
        f"<h1>Grown units of {e(result['checkpoint'])}</h1>",
        _table(["", ""], [
            ["data", result["data"]], ["images evaluated", f"{result['images']} ({result['subset']})"],
            ["classes", ", ".join(result["classes"])], ["model accuracy", _pct(result["accuracy"])],
            ["probe split", f"{result['probe']['train_images']} train / {result['probe']['test_images']} test"
             + (" (stratified)" if result["probe"]["stratified"] else " (not stratified: a class has < 2 images)")],
        ]),
        "<p class='note'>Every number is also in <a href='metrics.json'>metrics.json</a>.</p>",
    ]
    body = [_layer_html(name, info, figs[name]) for name, info in result["layers"].items()]
    return "\n".join(head + body + ["</body></html>\n"])


def write_report(result: dict[str, Any], out_dir: str | Path, *, dataset: Any, classes: list[str],
                 preprocessing: Preprocessing) -> Path:
    """Write the figures, ``index.html`` and ``metrics.json`` of ``result`` (from
    :func:`surgeon.analyze.units.analyze_model`, with ``checkpoint``, ``data`` and ``classes`` added)
    into ``out_dir``; returns the path of ``index.html``."""
    out = Path(out_dir)
    labels = result["_labels"]
    figs: dict[str, dict[str, str]] = {}
    for name, info in result["layers"].items():
        slug = _slug(name)
        f: dict[str, str] = {}
        f["accuracy"] = plot_accuracy(name, info, out / f"{slug}_accuracy.png")
        if info["_gamma"] is not None:
            f["gamma"] = plot_histograms(f"{name}: γ per group", info["_gamma"], "γ", out / f"{slug}_gamma.png")
        f["norms"] = plot_histograms(f"{name}: activation norms before GrowNorm", info["_norms"],
                                     "L2 norm of the group's activations", out / f"{slug}_norms.png")
        if info["gamma_history"] is not None:
            f["gamma_history"] = plot_gamma_history(name, info["gamma_history"], out / f"{slug}_gamma_history.png")
        f["embedding"] = plot_embeddings(name, info, labels, classes, out / f"{slug}_embedding.png")
        for g, tops in info["top_units"].items():
            f["units_" + g] = plot_unit_grid(name, g, tops, dataset, classes, preprocessing, out / f"{slug}_units_{g}.png")
        info["figures"] = dict(f)
        figs[name] = f
    metrics = public(result)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    return atomic_write_text(out / "index.html", render_html(result, figs))
