"""Atomic writes: a writer killed before its rename leaves a temp file the next write removes. And
DirectWriter: large outputs written without a page-cache copy where the filesystem allows, the same
bytes as an ordinary write everywhere."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from surgeon.fileio import DIRECT_ALIGN, DirectWriter, atomic_write, atomic_write_text

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


# -- DirectWriter ------------------------------------------------------------------------------

CHUNK = 4 * DIRECT_ALIGN


def _pieces(seed: int) -> list[bytes | memoryview]:
    """Sizes that cross, end on and fall short of the buffer and block boundaries."""
    rng = np.random.default_rng(seed)
    sizes = [0, 1, DIRECT_ALIGN - 1, CHUNK, 3 * CHUNK + 17, 5, CHUNK - 5, 2 * DIRECT_ALIGN]
    out: list[bytes | memoryview] = []
    for i, n in enumerate(sizes):
        data = rng.integers(0, 256, n, dtype=np.uint8)
        out.append(data.tobytes() if i % 2 else memoryview(data.view(np.float32) if n % 4 == 0 and n else data))
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_direct_writer_writes_exactly_the_bytes_given(tmp_path, seed):
    pieces = _pieces(seed)
    target = tmp_path / "out.bin"
    with DirectWriter(target, chunk=CHUNK) as f:
        for p in pieces:
            assert f.write(p) == memoryview(p).nbytes
    expected = b"".join(memoryview(p).cast("B").tobytes() for p in pieces)
    assert target.read_bytes() == expected


def _direct_supported(folder) -> bool:
    with DirectWriter(folder / "probe.bin") as f:
        f.write(b"x")
        return f.direct


def test_direct_writer_uses_o_direct_where_the_filesystem_takes_it(tmp_path):
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    if not _direct_supported(tmp_path):
        pytest.skip(f"the filesystem of {tmp_path} refuses O_DIRECT")
    target = tmp_path / "big.bin"
    data = np.arange(3 * CHUNK // 4 + 3, dtype=np.float32)  # not a whole number of blocks
    with DirectWriter(target, chunk=CHUNK) as f:
        assert f.direct
        f.write(memoryview(data))
    assert target.stat().st_size == data.nbytes  # the padded last block was cut off
    np.testing.assert_array_equal(np.fromfile(target, np.float32), data)


def test_a_filesystem_refusing_o_direct_at_open_gets_an_ordinary_file(tmp_path, monkeypatch):
    real_open = os.open

    def refusing(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing)
    target = tmp_path / "out.bin"
    with DirectWriter(target, chunk=CHUNK) as f:
        assert not f.direct
        f.write(b"abc" * CHUNK)
    assert target.read_bytes() == b"abc" * CHUNK


@pytest.mark.parametrize(("length", "refused"), [(2 * CHUNK + 4, 1), (100, 1), (3 * CHUNK + 4, 2), (CHUNK + 9, 2)])
def test_a_filesystem_refusing_a_direct_write_gets_the_rest_as_an_ordinary_file(tmp_path, monkeypatch, length, refused):
    """Refused on the first write or a later one, mid-stream or at close (the padded last block)."""
    if not hasattr(os, "O_DIRECT") or not _direct_supported(tmp_path):
        pytest.skip("no O_DIRECT here")
    real_write, calls = os.write, []

    def refusing(fd, data):
        calls.append(len(data))
        if len(calls) == refused:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", refusing)
    target = tmp_path / "out.bin"
    payload = (bytes(range(256)) * (length // 256 + 1))[:length - 4] + b"tail"
    with DirectWriter(target, chunk=CHUNK) as f:
        f.write(payload)
    assert not f.direct
    assert target.read_bytes() == payload


def test_a_failing_direct_write_after_data_went_out_is_an_error(tmp_path, monkeypatch):
    if not hasattr(os, "O_DIRECT") or not _direct_supported(tmp_path):
        pytest.skip("no O_DIRECT here")
    real_write, calls = os.write, []

    def full_disk(fd, data):
        calls.append(len(data))
        if len(calls) == 2:
            return len(data) // 2  # a short write: the disk filled up
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(OSError) as err, DirectWriter(tmp_path / "out.bin", chunk=CHUNK) as f:
        f.write(b"z" * (3 * CHUNK))
    assert err.value.errno == errno.ENOSPC
    assert len(calls) == 2 and f.closed  # nothing more was tried after the failure, and the file is closed


def test_direct_writer_rejects_an_unaligned_chunk(tmp_path):
    with pytest.raises(ValueError, match="multiple"):
        DirectWriter(tmp_path / "x", chunk=DIRECT_ALIGN + 1)


def test_direct_false_is_an_ordinary_file(tmp_path):
    with DirectWriter(tmp_path / "out.bin", chunk=CHUNK, direct=False) as f:
        assert not f.direct
        f.write(b"q" * (CHUNK + 3))
    assert (tmp_path / "out.bin").read_bytes() == b"q" * (CHUNK + 3)
