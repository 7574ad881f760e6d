from __future__ import annotations

import os
import stat

import pytest

from kvseg.utils import atomic_path, atomic_write_text


def test_atomic_write_replaces_and_respects_umask(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"]  # no temp file left


def test_atomic_path_keeps_previous_file_on_error(tmp_path):
    target = tmp_path / "ckpt.bin"
    target.write_bytes(b"good")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half-writ")
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.bin"]
