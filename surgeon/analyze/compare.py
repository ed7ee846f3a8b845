"""Compare fine-tuning runs: final accuracy (mean ± std over seeds) and overlaid learning curves.

Each run is an ``--output-dir`` of ``surgeon finetune``: ``metrics.jsonl`` (one row per epoch) and
``run.json`` (its configuration; older runs: the ``train_args`` in ``grown.pt``). Runs whose
configurations differ only in seed (and in where or how they ran: output dir, workers, device)
form one group.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from surgeon.errors import SurgeonError

# Configuration fields that do not change what is trained.
_NOT_THE_EXPERIMENT = {"seed", "output_dir", "resume", "workers", "device", "data_root", "trust_code", "max_image_pixels"}


@dataclass
class Run:
    path: Path
    config: dict[str, Any]
    history: list[dict]

    @property
    def final_acc(self) -> float:
        return float(self.history[-1]["val_acc"])

    @property
    def best_acc(self) -> float:
        return max(float(h["val_acc"]) for h in self.history)

    @property
    def seed(self) -> int | None:
        return self.config.get("seed")

    @property
    def key(self) -> str:
        return json.dumps({k: v for k, v in sorted(self.config.items()) if k not in _NOT_THE_EXPERIMENT}, sort_keys=True)


def describe(config: dict[str, Any]) -> str:
    """A short human label: what was grown and how."""
    steps = [s for s in config.get("grow") or [] if s.get("op", "grow") == "grow"]
    if config.get("baseline") or not steps:
        return "baseline (plain fine-tuning)"
    parts = []
    for s in steps:
        norm = "no GrowNorm" if not s.get("norm", True) else f"γ {s.get('gamma_init', 'auto')}"
        init = "" if s.get("init", "random") == "random" else f", {s['init']} init"
        parts.append(f"{s['kind']} {s['layer']} +{s['units']} ({norm}{init})")
    label = "; ".join(parts)
    if config.get("tune", "all") != "all":
        label += f", tune {config['tune']}"
    return label


def read_run(path: str | Path) -> Run:
    p = Path(path)
    metrics = p / "metrics.jsonl"
    if not metrics.is_file():
        raise SurgeonError(f"{p} is not a fine-tuning run (no metrics.jsonl)")
    try:
        history = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    except ValueError:
        raise SurgeonError(f"{metrics} is not valid JSON lines") from None
    if not history or any("val_acc" not in h for h in history):
        raise SurgeonError(f"{metrics} has no validation accuracy per epoch")
    if (p / "run.json").is_file():
        config = json.loads((p / "run.json").read_text())
    elif (p / "grown.pt").is_file():
        from surgeon.checkpoint import read_checkpoint

        config = dict(read_checkpoint(p / "grown.pt").train_args)
    else:
        raise SurgeonError(f"{p} has neither run.json nor grown.pt: cannot tell what was trained")
    return Run(p, config, history)


@dataclass
class Group:
    label: str
    runs: list[Run] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        finals = [100 * r.final_acc for r in self.runs]
        bests = [100 * r.best_acc for r in self.runs]
        return {"label": self.label, "runs": [str(r.path) for r in self.runs], "seeds": [r.seed for r in self.runs],
                "epochs": len(self.runs[0].history), "final_mean": statistics.mean(finals),
                "final_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                "best_mean": statistics.mean(bests), "finals": finals}


def group_runs(runs: list[Run]) -> list[Group]:
    groups: dict[str, Group] = {}
    for run in runs:
        groups.setdefault(run.key, Group(describe(run.config))).runs.append(run)
    labels: dict[str, int] = {}
    for g in groups.values():  # two configurations with one description: number them
        labels[g.label] = labels.get(g.label, 0) + 1
        if labels[g.label] > 1:
            g.label += f" #{labels[g.label]}"
    return list(groups.values())


def markdown_table(groups: list[Group]) -> str:
    lines = ["| run | seeds | epochs | final val accuracy (%) mean ± std | best (%) mean |", "|---|---|---|---|---|"]
    for g in groups:
        s = g.summary()
        lines.append(f"| {s['label']} | {len(s['seeds'])} | {s['epochs']} | {s['final_mean']:.2f} ± {s['final_std']:.2f} "
                     f"| {s['best_mean']:.2f} |")
    return "\n".join(lines) + "\n"


_MARKERS = "os^Dv<>PX*"
_LINES = ("-", "--", "-.", ":")


def identical_groups(groups: list[Group]) -> dict[int, int]:
    """Group index -> the index of an earlier group whose mean curve is exactly the same (drawn one
    over the other, the later would hide the earlier: the legend says so instead)."""
    curves = [tuple(round(100 * sum(r.history[e]["val_acc"] for r in g.runs) / len(g.runs), 9)
                    for e in range(min(len(r.history) for r in g.runs))) for g in groups]
    same: dict[int, int] = {}
    for i, c in enumerate(curves):
        j = curves.index(c)
        if j != i:
            same[i] = j
    return same


def curves_figure(groups: list[Group]):
    """Validation accuracy per epoch: each group's mean with a ±1 std band; integer epoch ticks, a
    marker and line style per group so overlapping curves stay visible."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    same = identical_groups(groups)
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, g in enumerate(groups):
        epochs = min(len(r.history) for r in g.runs)
        acc = np.array([[100 * r.history[e]["val_acc"] for e in range(epochs)] for r in g.runs])
        x = np.arange(1, epochs + 1)
        mean, std = acc.mean(axis=0), acc.std(axis=0)
        label = f"{g.label} (n={len(g.runs)})" + (f", same curve as {groups[same[i]].label}" if i in same else "")
        # Earlier groups get bigger markers, so a later identical curve leaves them visible around it.
        (line,) = ax.plot(x, mean, label=label, marker=_MARKERS[i % len(_MARKERS)], linestyle=_LINES[i % len(_LINES)],
                          markersize=max(3.0, 9.0 - 1.5 * i), markerfacecolor="none" if i % 2 else None)
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_groups(groups: list[Group], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = curves_figure(groups)
    try:
        fig.savefig(path, dpi=120, format="png")
    finally:
        plt.close(fig)


def compare_runs(paths: list[str | Path], output: str | Path) -> tuple[list[Group], str]:
    """Write ``compare.md``, ``compare.json`` and ``curves.png`` under ``output``; returns the groups
    and the markdown table."""
    from surgeon.fileio import atomic_write, atomic_write_text

    if not paths:
        raise SurgeonError("give at least one run directory")
    groups = group_runs([read_run(p) for p in paths])
    table = markdown_table(groups)
    out = Path(output)
    atomic_write_text(out / "compare.md", table)
    atomic_write_text(out / "compare.json", json.dumps([g.summary() for g in groups], indent=2, ensure_ascii=False))
    atomic_write(out / "curves.png", lambda tmp: plot_groups(groups, tmp))
    return groups, table
