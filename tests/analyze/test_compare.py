"""surgeon compare: runs grouped by configuration (seeds pooled), mean ± std, curves, errors."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from surgeon.analyze.compare import compare_runs, describe, read_run
from surgeon.cli import cli
from surgeon.errors import SurgeonError
from surgeon.grow.recipe import GrowStep, recipe_to_json
from surgeon.train.config import FinetuneConfig


def _run(root: Path, name: str, config: FinetuneConfig, accs: list[float]) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps({"epoch": i + 1, "val_acc": a}) + "\n" for i, a in enumerate(accs)))
    (d / "run.json").write_text(json.dumps({**config.to_dict(), "output_dir": str(d)}))
    return d


@pytest.fixture
def runs(tmp_path) -> dict[str, list[Path]]:
    base = FinetuneConfig(baseline=True, epochs=3)
    wide = FinetuneConfig(grow=[GrowStep("wide", "classifier.3", 128, gamma_init=20.0)], epochs=3)
    return {
        "base": [_run(tmp_path, f"b{s}", FinetuneConfig(**{**base.__dict__, "seed": s}), [0.5, 0.6, a])
                 for s, a in enumerate([0.70, 0.74, 0.72])],
        "wide": [_run(tmp_path, f"w{s}", FinetuneConfig(**{**wide.__dict__, "seed": s, "workers": 4}), [0.6, 0.9, a])
                 for s, a in enumerate([0.80, 0.84])],
    }


def test_groups_pool_seeds_and_report_mean_and_std(tmp_path, runs):
    groups, table = compare_runs(runs["base"] + runs["wide"], tmp_path / "out")
    assert [g.label for g in groups] == ["baseline (plain fine-tuning)", "wide classifier.3 +128 (γ 20.0)"]
    base, wide = (g.summary() for g in groups)
    assert base["seeds"] == [0, 1, 2] and wide["seeds"] == [0, 1]
    assert base["final_mean"] == pytest.approx(72.0) and base["final_std"] == pytest.approx(statistics.stdev([70, 74, 72]))
    assert wide["final_mean"] == pytest.approx(82.0) and wide["best_mean"] == pytest.approx(90.0)
    assert "| baseline (plain fine-tuning) | 3 | 3 | 72.00 ± 2.00 | 72.00 |" in table
    out = tmp_path / "out"
    assert (out / "compare.md").read_text() == table
    assert [g["label"] for g in json.loads((out / "compare.json").read_text())] == [g.label for g in groups]
    with Image.open(out / "curves.png") as im:
        assert im.format == "PNG" and im.size[0] > 300


def test_cli_prints_the_table(tmp_path, runs):
    res = CliRunner().invoke(cli, ["compare", *map(str, runs["wide"]), "-o", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    assert "wide classifier.3 +128 (γ 20.0) | 2 | 3 | 82.00 ± 2.83" in res.output


def test_different_settings_are_different_groups(tmp_path):
    a = _run(tmp_path, "a", FinetuneConfig(baseline=True, lr=0.01), [0.5])
    b = _run(tmp_path, "b", FinetuneConfig(baseline=True, lr=0.001), [0.6])
    groups, _ = compare_runs([a, b], tmp_path / "o")
    assert [g.label for g in groups] == ["baseline (plain fine-tuning)", "baseline (plain fine-tuning) #2"]


def test_describe():
    steps = recipe_to_json([GrowStep("wide", "fc7", 16, norm=False), GrowStep("deep", "fc7", 8, init="net2net")])
    assert describe({"grow": steps, "tune": "top"}) == "wide fc7 +16 (no GrowNorm); deep fc7 +8 (γ auto, net2net init), tune top"


def test_bad_run_directories(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "nocfg").mkdir()
    (tmp_path / "nocfg" / "metrics.jsonl").write_text('{"epoch": 1, "val_acc": 0.5}\n')
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metrics.jsonl").write_text("{not json\n")
    for name, message in (("empty", "not a fine-tuning run"), ("nocfg", "neither run.json nor grown.pt"),
                          ("broken", "not valid JSON lines")):
        with pytest.raises(SurgeonError, match=message):
            read_run(tmp_path / name)
    res = CliRunner().invoke(cli, ["compare", str(tmp_path / "empty")])
    assert res.exit_code == 1 and res.output.count("\n") == 1


def test_curves_keep_identical_runs_visible_and_ticks_on_whole_epochs(tmp_path):
    import matplotlib.pyplot as plt

    from surgeon.analyze.compare import curves_figure, group_runs

    same = [0.5, 0.6, 0.7]
    a = _run(tmp_path, "a", FinetuneConfig(baseline=True, epochs=3), same)
    b = _run(tmp_path, "b", FinetuneConfig(grow=[GrowStep("wide", "classifier.3", 64)], epochs=3), same)
    c = _run(tmp_path, "c", FinetuneConfig(grow=[GrowStep("deep", "classifier.3", 64)], epochs=3), [0.4, 0.5, 0.6])
    groups = group_runs([read_run(p) for p in (a, b, c)])
    fig = curves_figure(groups)
    try:
        ax = fig.axes[0]
        lines = ax.get_lines()
        assert len(lines) == 3
        styles = {(ln.get_marker(), ln.get_linestyle()) for ln in lines}
        assert len(styles) == 3  # each group distinguishable
        assert lines[0].get_markersize() > lines[1].get_markersize()  # the earlier one shows around the later
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert sum("same curve as" in label for label in labels) == 1
        ticks = [t for t in ax.get_xticks() if 1 <= t <= 3]
        assert ticks and all(float(t).is_integer() for t in ticks)
    finally:
        plt.close(fig)
