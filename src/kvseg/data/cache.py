"""An on-disk, memory-mapped cache of preprocessed slices, built once under a file lock.

A dataset hands :class:`SliceCache` its files (for the cache key) and a ``prepare(i)`` function
returning slice ``i``'s ``(image uint16 (S, S), packed mask uint8 (S, S))``; the cache stores
them in two ``.npy`` arrays and serves them by index. It knows nothing about the layout.
A volume dataset prepares whole volumes at once instead (``blocks``: one ``prepare(b)`` call
returns the slices ``blocks[b]``), an RGB dataset stores three channels per slice, and a
multi-class or many-class dataset chooses the mask dtype.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from kvseg.data.transforms import P_HIGH, P_LOW
from kvseg.utils import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

CACHE_VERSION = 1

PrepareFn = Callable[[int], tuple[np.ndarray, np.ndarray]]
Block = tuple[int, int]  # slices [start, stop) prepared by one call


def _sample_digest(path: Path, blocks: int = 64, block: int = 4096) -> str:
    """sha256 of the file size and ``blocks`` evenly spaced blocks: cheap corruption check."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for k in range(blocks):
            f.seek(max(0, (size - block) * k // max(blocks - 1, 1)))
            h.update(f.read(block))
    return h.hexdigest()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock on ``path`` (POSIX ``flock``; no-op where unavailable)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: atomic renames still keep files whole
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class SliceCache:
    """Preprocessed slices of one dataset at one ``img_size``, on disk, memory-mapped.

    Files ``{prefix}-{key}.images.npy`` (N, S, S) uint16, ``{prefix}-{key}.masks.npy`` (N, S, S)
    uint8 (bit c = class c) and ``{prefix}-{key}.json`` (written last; the cache counts only
    with it). ``key`` hashes the dataset fingerprint (the bytes of the ``hashed`` index files,
    e.g. ``train.csv``, and every file's relative path, size and mtime) and the preprocessing
    parameters, so a changed dataset or preprocessing never reads an old cache. The JSON records
    the array shapes, file sizes and a sampled digest; a mismatch (truncated, overwritten,
    half-written file) means corrupt: rebuilt with a warning. Builds hold a file lock, so two
    processes (torchrun) constructing at once build it once. Context stacking, splits and
    augmentation happen at read time, so one cache serves them all.

    Args:
        root: the dataset folder (file paths in the key are relative to it).
        files: the slice files, in cache order (``prepare(i)`` prepares ``files[i]``'s slice).
        img_size: side of the prepared square slices.
        prepare: ``i -> (image uint16 (S, S), packed mask uint8 (S, S))``; called in threads.
        cache_dir: where the files go (default ``root/.kvseg_cache``).
        hashed: index files under ``root`` whose whole bytes enter the key.
        prefix: file name prefix.
        n: number of slices (default ``len(files)``: one slice per file).
        channels: image channels per slice; 1 stores (N, S, S), more (N, channels, S, S).
        mask_dtype: the masks' integer dtype (bit-packed classes, or a label index).
        salt: other settings that change the prepared slices (enter the key; caches of one
            root and size with another salt are kept, not superseded).
        blocks: ``[(start, stop), ...]`` covering ``range(n)``: then ``prepare(b)`` returns the
            arrays of slices ``start..stop-1`` (a leading axis), e.g. one volume per call.
    """

    def __init__(self, root: str | os.PathLike, files: Sequence[str | os.PathLike],
                 img_size: int, prepare: PrepareFn, *,
                 cache_dir: str | os.PathLike | None = None,
                 hashed: Sequence[str] = ("train.csv",), prefix: str = "uw",
                 n: int | None = None, channels: int = 1, mask_dtype=np.uint8, salt: str = "",
                 blocks: Sequence[Block] | None = None) -> None:
        self.root = Path(root)
        self.files = [str(f) for f in files]
        self.n = len(self.files) if n is None else int(n)
        self.img_size = int(img_size)
        s = self.img_size
        self.image_shape = (self.n, s, s) if channels == 1 else (self.n, int(channels), s, s)
        self.mask_dtype = np.dtype(mask_dtype)
        self.salt = salt
        self.variant = hashlib.sha256(salt.encode()).hexdigest()[:12] if salt else ""
        self.blocks = list(blocks) if blocks is not None else None
        self.hashed = tuple(hashed)
        self.prefix = prefix
        self.dir = Path(cache_dir) if cache_dir is not None else self.root / ".kvseg_cache"
        self.key = self._key()
        self.images_path = self.dir / f"{prefix}-{self.key}.images.npy"
        self.masks_path = self.dir / f"{prefix}-{self.key}.masks.npy"
        self.meta_path = self.dir / f"{prefix}-{self.key}.json"
        self.built = False  # True when this instance (re)built the files
        self._prepare: PrepareFn | None = prepare
        self._images: np.ndarray | None = None
        self._masks: np.ndarray | None = None

    def _key(self) -> str:
        h = hashlib.sha256()
        for name in self.hashed:
            h.update((self.root / name).read_bytes())
        for path in self.files:
            st = os.stat(path)
            rel = os.path.relpath(path, self.root)
            h.update(f"{rel}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        h.update(f"img_size={self.img_size}|p={P_LOW},{P_HIGH}|v={CACHE_VERSION}".encode())
        if self.salt:
            h.update(f"|n={self.n}|shape={self.image_shape}|mask={self.mask_dtype.str}|"
                     f"{self.salt}".encode())
        return h.hexdigest()[:20]

    def _check(self) -> str | None:
        """``None`` if the cache files are complete and match; else the reason they do not."""
        if not self.meta_path.exists():
            return "missing"
        try:
            meta = json.loads(self.meta_path.read_text())
            n, s = self.n, self.img_size
            if meta.get("key") != self.key or meta.get("n") != n or meta.get("img_size") != s:
                return "metadata does not match the dataset"
            for path, dtype, name, shape in (
                    (self.images_path, np.uint16, "images", self.image_shape),
                    (self.masks_path, self.mask_dtype, "masks", (n, s, s))):
                if not path.exists():
                    return f"{path.name} missing"
                if path.stat().st_size != meta[name]["bytes"]:
                    return f"{path.name} has the wrong size"
                arr = np.load(path, mmap_mode="r")
                if arr.shape != shape or arr.dtype != dtype:
                    return f"{path.name} has the wrong shape or dtype"
                del arr
                if _sample_digest(path) != meta[name]["digest"]:
                    return f"{path.name} content does not match its digest"
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"unreadable ({e})"
        return None

    def ensure(self, threads: int | None = None) -> None:
        """Build the cache unless a valid one exists (under an inter-process lock)."""
        reason = self._check()
        if reason is None:
            return
        lock = self.dir / f"{self.prefix}-{self.key}.lock"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            lock.touch()
        except OSError as e:
            raise PermissionError(f"{self.dir}: cannot write the slice cache here ({e.strerror}); "
                                  "pass another cache_dir (--cache-dir) or cache=False") from None
        with file_lock(lock):
            reason = self._check()  # another process may have built it while we waited
            if reason is None:
                return
            if reason != "missing":
                log.warning("cache %s is corrupt or stale (%s); rebuilding", self.meta_path,
                            reason)
            self.meta_path.unlink(missing_ok=True)
            self._build(threads)
            self.built = True
        self._remove_superseded()

    def _build(self, threads: int | None) -> None:
        if self._prepare is None:
            raise RuntimeError("SliceCache: no prepare function (a pickled copy cannot build)")
        prepare = self._prepare
        n, s = self.n, self.img_size
        log.info("building the slice cache for %d slices at %d px in %s", n, s, self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.images_path) as ti, atomic_path(self.masks_path) as tm:
            images = np.lib.format.open_memmap(ti, mode="w+", dtype=np.uint16,
                                               shape=self.image_shape)
            masks = np.lib.format.open_memmap(tm, mode="w+", dtype=self.mask_dtype,
                                              shape=(n, s, s))
            workers = threads or min(8, os.cpu_count() or 1)
            blocks = self.blocks if self.blocks is not None else [(i, i + 1) for i in range(n)]
            one = self.blocks is None  # prepare(i) returns one slice, without a leading axis
            chunk = (64 if one else 1) * workers  # bounded memory: written chunk by chunk
            with ThreadPoolExecutor(workers) as pool:
                for lo in range(0, len(blocks), chunk):
                    done = pool.map(prepare, range(lo, min(lo + chunk, len(blocks))))
                    for b, (image, packed) in enumerate(done, start=lo):
                        start, stop = blocks[b]
                        if one:
                            images[start], masks[start] = image, packed
                        else:
                            images[start:stop], masks[start:stop] = image, packed
            images.flush()
            masks.flush()
            del images, masks
        meta = dict(key=self.key, n=n, img_size=s, root=str(self.root.resolve()),
                    version=CACHE_VERSION, **({"variant": self.variant} if self.variant else {}),
                    images=dict(bytes=self.images_path.stat().st_size,
                                digest=_sample_digest(self.images_path)),
                    masks=dict(bytes=self.masks_path.stat().st_size,
                               digest=_sample_digest(self.masks_path)))
        atomic_write_text(self.meta_path, json.dumps(meta, indent=1))

    def _remove_superseded(self) -> None:
        """Delete older caches of the same root and img_size (their dataset has changed)."""
        root = str(self.root.resolve())
        for meta_path in self.dir.glob(f"{self.prefix}-*.json"):
            if meta_path == self.meta_path:
                continue
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                continue
            if (meta.get("root") == root and meta.get("img_size") == self.img_size
                    and meta.get("variant", "") == self.variant):
                stem = meta_path.name[: -len(".json")]
                meta_path.unlink(missing_ok=True)
                for suffix in (".images.npy", ".masks.npy", ".lock"):
                    (self.dir / f"{stem}{suffix}").unlink(missing_ok=True)
                log.info("removed superseded cache %s", stem)

    def get(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """``(image uint16 (S, S) or (C, S, S), mask (S, S))`` of slice ``index``."""
        if self._images is None:  # opened lazily: each DataLoader worker maps its own view
            self._images = np.load(self.images_path, mmap_mode="r")
            self._masks = np.load(self.masks_path, mmap_mode="r")
        return self._images[index], self._masks[index]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_images"] = state["_masks"] = None
        state["_prepare"] = None  # built in the main process; workers only read
        return state


__all__ = ["CACHE_VERSION", "SliceCache", "file_lock"]
