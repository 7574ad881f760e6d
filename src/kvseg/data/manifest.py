"""Output folders kvseg writes into: a manifest of its own files, so it never deletes others.

``kvseg synth`` (``.kvseg_synth.json``) and ``kvseg predict`` (``.kvseg_predict.json``) list
every file they write, relative to the folder, in a JSON manifest beside them. When they
replace an earlier output they remove exactly the files that manifest lists; a file they did
not write is never deleted (synth refuses the folder, predict refuses to overwrite that file).
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Iterable
from pathlib import Path

from kvseg.errors import RunDirError
from kvseg.utils import atomic_write_text


def read_manifest(path: Path) -> dict | None:
    """The manifest at ``path`` as a dict (``files``: a list of relative paths), ``None`` if
    absent; :class:`~kvseg.errors.RunDirError` if it cannot be read (then nothing is trusted)."""
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise RunDirError(f"{path}: unreadable kvseg manifest ({e}); move the folder aside or "
                          "delete it yourself") from None
    files = meta.get("files", [])
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise RunDirError(f"{path}: malformed kvseg manifest ('files' is not a list of paths)")
    return meta


def write_manifest(path: Path, files: Iterable[str], **meta: object) -> None:
    """Write (atomically) the manifest listing ``files`` (relative posix paths) and ``meta``."""
    body = dict(meta, files=sorted(set(files)))
    atomic_write_text(path, json.dumps(body, indent=1) + "\n")


def _safe(folder: Path, rel: str) -> Path | None:
    """``folder / rel`` if ``rel`` stays inside ``folder`` (a manifest is only trusted there)."""
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        return None
    return folder / p


def foreign_entry(folder: Path, own: Collection[str], skip: Collection[str] = ()) -> str | None:
    """The first entry under ``folder`` that is not one of ``own`` files (nor a folder holding
    them), as a relative path; ``None`` if everything there was written by kvseg.

    ``skip`` names top-level entries not to look into (e.g. ``.kvseg_cache``). Links count as
    foreign unless listed.
    """
    own = set(own)
    dirs = {p.as_posix() for f in own for p in Path(f).parents if p.parts}
    for dirpath, dirnames, filenames in os.walk(folder):
        base = Path(dirpath).relative_to(folder)
        for d in sorted(dirnames):
            rel = (base / d).as_posix()
            if base == Path(".") and d in skip:
                dirnames.remove(d)
            elif rel not in dirs or os.path.islink(os.path.join(dirpath, d)):
                return rel
        for f in sorted(filenames):
            rel = (base / f).as_posix()
            if rel not in own and not (base == Path(".") and f in skip):
                return rel
    return None


def remove_files(folder: Path, files: Iterable[str]) -> int:
    """Delete the listed files under ``folder`` (those that exist), then the folders they leave
    empty (up to ``folder``, kept); return how many files were deleted."""
    removed = 0
    parents: set[Path] = set()
    for rel in sorted(set(files)):
        p = _safe(folder, rel)
        if p is None or not (p.is_file() or p.is_symlink()):
            continue
        p.unlink()
        removed += 1
        parents.update(q for q in p.parents if folder in q.parents)
    for d in sorted(parents, key=lambda q: len(q.parts), reverse=True):
        try:
            d.rmdir()  # only if empty
        except OSError:
            pass
    return removed


__all__ = ["foreign_entry", "read_manifest", "remove_files", "write_manifest"]
