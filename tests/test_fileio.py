"""Atomic writes: a writer killed before its rename leaves a temp file the next write removes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from surgeon.fileio import atomic_write, atomic_write_text

_KILLED_WRITER = """
import os, sys, time
from pathlib import Path
from surgeon.fileio import atomic_write

def write(tmp: Path) -> None:
    tmp.write_bytes(b"x" * 1_000_000)
    print(tmp, flush=True)
    time.sleep(60)  # killed here: after writing, before the rename

atomic_write(sys.argv[1], write)
"""


def _killed_write(target: Path) -> Path:
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    tmp = Path(proc.stdout.readline().strip())
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    return tmp


def test_a_write_removes_the_temp_file_of_a_killed_writer(tmp_path):
    target = tmp_path / "grown.pt"
    stale = _killed_write(target)
    assert stale.exists() and stale.stat().st_size == 1_000_000 and not target.exists()
    atomic_write_text(target, "ok")
    assert target.read_text() == "ok"
    assert not stale.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["grown.pt"]


def test_a_live_writers_temp_file_and_other_files_are_kept(tmp_path):
    target = tmp_path / "model.onnx"
    live = tmp_path / f".model.onnx.{os.getppid()}.abcd.tmp"  # our parent is alive
    foreign = tmp_path / ".model.onnx.notapid.tmp"
    other = tmp_path / ".other.onnx.999999999.x.tmp"
    for p in (live, foreign, other):
        p.write_text("keep")
    atomic_write(target, lambda tmp: tmp.write_text("new"))
    assert live.exists() and foreign.exists() and other.exists()
    assert target.read_text() == "new"
