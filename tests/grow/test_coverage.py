"""Coverage of `surgeon layers` over every torchvision classification model (issue 12 part 4).

Each model has at least one growable layer besides the head, and the last block's sites found from
the module structure (benchmarks/coverage.py's ``last_block_sites``: the first Linear of a
transformer / ConvNeXt MLP, the expansion conv of an inverted-residual block, a bottleneck's first
conv, a concat block's first branch conv) are growable. Families whose sites are not covered yet are
strict xfails, so the test says when they start passing. Slow: it builds and analyses all 80 models
(about a minute on the 2-core VM); times are measured by the script, not asserted here.
"""

from __future__ import annotations

import functools
import importlib.util

import pytest

torchvision = pytest.importorskip("torchvision")

from tests.conftest import ROOT  # noqa: E402

pytestmark = pytest.mark.slow

_spec = importlib.util.spec_from_file_location("_coverage", ROOT / "benchmarks" / "coverage.py")
coverage = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(coverage)

MODELS = sorted(torchvision.models.list_models(module=torchvision.models))

# (family, kind) → why the last block's site of that kind is still refused, at the last coverage run
NOT_YET: dict[tuple[str, str], str] = {}  # none at the last run (concat growth landed)
# family → why no non-head layer is growable yet (none at the last run)
NO_SITE_YET: dict[str, str] = {}


@functools.lru_cache(maxsize=None)
def _structure(name: str) -> dict[str, str]:
    from surgeon.zoo import load_base

    return coverage.last_block_sites(load_base(f"torchvision:{name}", "none", meta=True).module)


@functools.lru_cache(maxsize=2)
def _rows(name: str) -> dict:
    from surgeon.commands.layers import analysed_layers

    return {r.name: r for r in analysed_layers(f"torchvision:{name}", "none", None)}


def _params(with_kind: bool):
    out = []
    for name in MODELS:
        fam = coverage.family(name)
        if not with_kind:
            marks = [pytest.mark.xfail(strict=True, reason=NO_SITE_YET[fam])] if fam in NO_SITE_YET else []
            out.append(pytest.param(name, marks=marks, id=name))
            continue
        for kind in coverage.block_kinds(name):
            marks = [pytest.mark.xfail(strict=True, reason=NOT_YET[fam, kind])] if (fam, kind) in NOT_YET else []
            out.append(pytest.param(name, kind, marks=marks, id=f"{name}-{kind}"))
    return out


def test_every_model_has_a_family():
    assert {coverage.family(n) for n in MODELS} == set(coverage.FAMILIES)


@pytest.mark.parametrize("name", _params(with_kind=False))
def test_a_layer_besides_the_head_is_growable(name):
    rows = _rows(name)
    assert any(r.is_head for r in rows.values()), f"{name}: no classifier head found"
    growable = [r.name for r in rows.values() if r.wide == "ok" and not r.is_head]
    assert growable, f"{name}: nothing but the head can be grown: " + "; ".join(
        f"{r.name}: {r.wide}" for r in list(rows.values())[-5:])


@pytest.mark.parametrize(("name", "kind"), _params(with_kind=True))
def test_the_last_blocks_site_is_growable(name, kind):
    site = _structure(name).get(kind)
    assert site is not None, f"{name}: no {kind} block found, though its module defines one"
    rows = _rows(name)
    assert site in rows, f"{name}: the {kind} site {site} is not in the layer table"
    assert rows[site].wide == "ok", f"{name}: {site} ({kind}) is refused: {rows[site].wide}"


def test_every_expected_failure_names_a_kind_of_its_family():
    # A NOT_YET entry no parametrization uses would never tell when it starts passing.
    used = {(coverage.family(n), k) for n in MODELS for k in coverage.block_kinds(n)}
    assert set(NOT_YET) <= used, set(NOT_YET) - used


def test_the_structural_rules_find_the_documented_sites():
    # The rules of benchmarks/coverage.py on four models whose sites the README names.
    assert _structure("vit_b_16")["mlp"] == "encoder.layers.encoder_layer_11.mlp.0"
    assert _structure("swin_t")["mlp"] == "features.7.1.mlp.0"
    assert _structure("convnext_tiny")["mlp"] == "features.7.2.block.3"
    assert _structure("mobilenet_v2")["expansion"] == "features.17.conv.0.0"
    assert _structure("efficientnet_b0")["expansion"] == "features.7.0.block.0.0"
    assert _structure("resnet50")["bottleneck"] == "layer4.2.conv1"
    assert set(_structure("alexnet")) == set()
