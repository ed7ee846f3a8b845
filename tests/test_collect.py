"""surgeon.collect: collections that skip the objects alive before, and the CLI's exit freeze."""

from __future__ import annotations

import gc
import weakref

import pytest

from surgeon.collect import young_collections


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def _cycle() -> weakref.ref:
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


@pytest.fixture(autouse=True)
def _no_freeze():
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_objects_alive_before_are_frozen_inside_and_thawed_after():
    old = [Node() for _ in range(100)]
    with young_collections():
        frozen = gc.get_freeze_count()
        assert frozen >= len(old)
        young = _cycle()
        gc.collect()
        assert young() is None  # garbage made inside is collected inside
    assert gc.get_freeze_count() == 0


def test_a_nested_block_freezes_more_and_the_outermost_thaws_everything():
    with young_collections():
        outer = gc.get_freeze_count()
        kept = [Node() for _ in range(1000)]
        with young_collections():
            assert gc.get_freeze_count() >= outer + len(kept)
        assert gc.get_freeze_count() >= outer + len(kept)  # stays frozen until the outer block ends
    assert gc.get_freeze_count() == 0


def test_someone_elses_freeze_is_left_alone():
    gc.freeze()
    theirs = gc.get_freeze_count()
    with young_collections():
        made = [Node() for _ in range(1000)]  # noqa: F841
        assert gc.get_freeze_count() == theirs
    assert gc.get_freeze_count() == theirs


def test_the_block_thaws_when_it_raises():
    with pytest.raises(ValueError), young_collections():
        raise ValueError("boom")
    assert gc.get_freeze_count() == 0


def test_the_cli_freezes_before_the_interpreter_shuts_down(monkeypatch, capsys):
    from surgeon import cli

    monkeypatch.setattr("sys.argv", ["surgeon", "--version"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 0
    assert "surgeon" in capsys.readouterr().out
    assert gc.get_freeze_count() > 0  # the shutdown's collections skip these objects
