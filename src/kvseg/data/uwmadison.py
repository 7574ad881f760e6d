"""The UW-Madison GI Tract Image Segmentation dataset (Kaggle 2022), read exactly.

Layout (``root`` is the folder holding ``train.csv``)::

    root/train.csv        id,class,segmentation   (3 rows per slice, RLE row-major, 1-indexed)
    root/train/case{C}/case{C}_day{D}/scans/slice_{SSSS}_{W}_{H}_{PW}_{PH}.png

W and H are the slice's width and height (width first: ``slice_0066_360_310_1.50_1.50.png`` is
an array of shape (310, 360)), PW and PH the pixel spacing in mm; slices are 3 mm thick.
The conventions and where they were verified are in ``docs/data.md``.

:class:`UWMadison` validates the whole CSV and file list at construction (so a bad RLE or a
missing image fails at once, naming the file and row), then serves items from an on-disk cache
of preprocessed slices (built once, in the main process, under a file lock; see
:class:`SliceCache`).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from kvseg.data.rle import parse_runs, rle_decode
from kvseg.data.transforms import P_HIGH, P_LOW, augment, prepare_slices, resize_mask
from kvseg.utils import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

CLASSES = ("large_bowel", "small_bowel", "stomach")
SLICE_THICKNESS_MM = 3.0
# Scans with known annotation issues, as listed by the dataset's authors
# (happyharrycn/UW-Madison-GI-Tract-Segmentation-Data-Tools, common.py get_blacklist_case_ids).
BAD_SCANS = ("case61_day14", "case9_day27", "case7_day0", "case81_day30", "case43_day18",
             "case138_day0", "case34_day20", "case43_day26", "case124_day19", "case144_day15",
             "case83_day11", "case13_day0")

_ID_RE = re.compile(r"^case(\d+)_day(\d+)_slice_(\d{4})$")
_FILE_RE = re.compile(r"^slice_(\d{4})_(\d+)_(\d+)_(\d+(?:\.\d+)?)_(\d+(?:\.\d+)?)\.png$")
_SCAN_RE = re.compile(r"^case(\d+)_day(\d+)$")
_CASE_RE = re.compile(r"^case(\d+)$")
_PNG_MODES = ("I;16", "I;16B", "I;16L", "I", "L", "1")


class SliceInfo(NamedTuple):
    """What a slice's path says: ids, size in pixels (width, height) and pixel spacing (mm)."""

    case: int
    day: int
    slice: int
    width: int
    height: int
    spacing: float

    @property
    def id(self) -> str:
        return f"case{self.case}_day{self.day}_slice_{self.slice:04d}"


def parse_slice_path(path: str | os.PathLike) -> SliceInfo:
    """Parse ``.../case{C}_day{D}/scans/slice_{SSSS}_{W}_{H}_{PW}_{PH}.png``.

    Width comes first in the name. Case and day come from the ``case{C}_day{D}`` folder above
    ``scans``. Raises ``ValueError`` naming the file if any part does not parse.
    """
    p = Path(path)
    m = _FILE_RE.match(p.name)
    if not m:
        raise ValueError(f"{p}: file name does not parse as slice_SSSS_W_H_PW_PH.png")
    scan = _SCAN_RE.match(p.parent.parent.name)
    if not scan:
        raise ValueError(f"{p}: expected the image under case{{C}}/case{{C}}_day{{D}}/scans/")
    width, height = int(m.group(2)), int(m.group(3))
    spacing_w, spacing_h = float(m.group(4)), float(m.group(5))
    if width < 1 or height < 1 or spacing_w <= 0 or spacing_h <= 0:
        raise ValueError(f"{p}: non-positive size or spacing in the file name")
    return SliceInfo(int(scan.group(1)), int(scan.group(2)), int(m.group(1)), width, height,
                     spacing_w)


def load_png(path: str | os.PathLike) -> np.ndarray:
    """Read a grayscale PNG (16-bit, or 8-bit / 1-bit, which fit in 16 bits) as a 2D array.

    Keeps the stored dtype (uint16 for the UW-Madison slices). Raises ``FileNotFoundError`` if
    absent and ``ValueError`` naming the file if unreadable or not grayscale (RGB, palette,
    alpha, float).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: image file not found")
    try:
        with Image.open(p) as im:
            im.load()
            mode = im.mode
            arr = np.array(im)
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{p}: unreadable image ({e})") from None
    if mode not in _PNG_MODES:
        raise ValueError(f"{p}: image mode {mode} is not 16-bit grayscale compatible")
    if mode == "I" and arr.size and (arr.min() < 0 or arr.max() > 65535):
        raise ValueError(f"{p}: 32-bit image with values outside the 16-bit range")
    if mode == "1":
        arr = arr.astype(np.uint8)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr


def read_train_csv(path: str | os.PathLike) -> dict[str, dict[str, tuple[int, str]]]:
    """Read ``train.csv`` into ``{slice_id: {class: (line_number, rle)}}`` (RLEs not decoded).

    Raises ``FileNotFoundError`` if absent and ``ValueError`` naming the file and line for: a
    missing ``id``/``class``/``segmentation`` column, an unknown class, a malformed id, or a
    repeated (id, class) row.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: train.csv not found")
    rows: dict[str, dict[str, tuple[int, str]]] = {}
    with open(p, newline="", encoding="utf-8-sig") as f:  # -sig: a BOM (Excel) is dropped
        reader = csv.DictReader(f)
        missing = [c for c in ("id", "class", "segmentation") if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{p}: missing column(s) {', '.join(missing)}; expected "
                             "id,class,segmentation")
        for row in reader:
            line = reader.line_num
            sid, cls, rle = row["id"], row["class"], row["segmentation"] or ""
            if cls not in CLASSES:
                raise ValueError(f"{p}: line {line} ({sid}): unknown class {cls!r}; expected one "
                                 f"of {', '.join(CLASSES)}")
            if sid is None or not _ID_RE.match(sid):
                raise ValueError(f"{p}: line {line}: id {sid!r} is not "
                                 "case{C}_day{D}_slice_SSSS")
            per_id = rows.setdefault(sid, {})
            if cls in per_id:
                raise ValueError(f"{p}: line {line} ({sid}, {cls}): repeated row (first at line "
                                 f"{per_id[cls][0]})")
            per_id[cls] = (line, rle.strip())
    return rows


@dataclass(frozen=True)
class SliceRecord:
    """One slice of the dataset: ids, image path, original size and spacing, its three RLEs.

    ``index`` is the slice's row in the cache (the position in the full sorted dataset).
    """

    index: int
    id: str
    case: int
    day: int
    slice: int
    width: int
    height: int
    spacing: float
    path: str
    rles: tuple[str, str, str]

    @property
    def scan_id(self) -> str:
        return f"case{self.case}_day{self.day}"

    def full_mask(self) -> np.ndarray:
        """The slice's masks at original resolution: uint8 (3, height, width) in {0, 1}."""
        return np.stack([rle_decode(r, (self.height, self.width)) for r in self.rles])


def scan_dataset(root: str | os.PathLike) -> list[SliceRecord]:
    """Match ``root/train.csv`` with the images under ``root/train``; validate everything.

    Returns records sorted by (case, day, slice). Every non-empty RLE is checked against the
    image size in its file name (``ValueError`` naming CSV file, line, id and class); a CSV id
    without an image raises ``FileNotFoundError``; images with no CSV row are skipped with a
    warning (they have no labels).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset folder not found")
    csv_path = root / "train.csv"
    rows = read_train_csv(csv_path)
    images: dict[str, tuple[Path, SliceInfo]] = {}
    for png in sorted((root / "train").glob("case*/case*_day*/scans/*.png")):
        info = parse_slice_path(png)
        if png.parent.parent.parent.name != f"case{info.case}":
            raise ValueError(f"{png}: folder case{info.case}_day{info.day} is not inside "
                             f"case{info.case}/")
        if info.id in images:
            raise ValueError(f"{png}: second image for slice {info.id} (also {images[info.id][0]})")
        images[info.id] = (png, info)
    records = []
    for sid, per_class in rows.items():
        if sid not in images:
            m = _ID_RE.match(sid)
            line = min(v[0] for v in per_class.values())
            raise FileNotFoundError(
                f"{csv_path}: line {line}: no image for {sid} (expected "
                f"{root}/train/case{m.group(1)}/case{m.group(1)}_day{m.group(2)}/scans/"
                f"slice_{m.group(3)}_W_H_PW_PH.png)")
        png, info = images[sid]
        rles = []
        for cls in CLASSES:
            line, rle = per_class.get(cls, (0, ""))
            try:
                parse_runs(rle, info.width * info.height)
            except ValueError as e:
                raise ValueError(f"{csv_path}: line {line} ({sid}, {cls}): {e}") from None
            rles.append(rle)
        records.append((info.case, info.day, info.slice, sid, str(png), info, tuple(rles)))
    unlabeled = len(images) - len(records)
    if unlabeled:
        log.warning("%s: %d image(s) have no row in train.csv and are skipped", root, unlabeled)
    if not records:
        raise ValueError(f"{csv_path}: no slices (empty CSV or no images under {root}/train)")
    records.sort(key=lambda r: r[:3])
    return [SliceRecord(i, sid, info.case, info.day, info.slice, info.width, info.height,
                        info.spacing, png, rles)
            for i, (_, _, _, sid, png, info, rles) in enumerate(records)]


# --------------------------------------------------------------------------- preprocessing
def prepare_record(record: SliceRecord, img_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode one slice: ``(image uint16 (S, S), packed mask uint8 (S, S))``.

    The image is :func:`prepare_slices` output quantised to 16 bits (value / 65535); the mask
    packs class ``c`` into bit ``c``. The cache stores exactly these arrays, and the uncached
    path computes the same, so cached and uncached items are identical.
    """
    raw = load_png(record.path)
    if raw.shape != (record.height, record.width):
        raise ValueError(f"{record.path}: image is {raw.shape[1]}x{raw.shape[0]} (width x height) "
                         f"but its file name says {record.width}x{record.height}")
    image = prepare_slices(raw[None], img_size)[0]
    image = torch.round(image * 65535).to(torch.int32).numpy().astype(np.uint16)
    mask = resize_mask(record.full_mask(), img_size).to(torch.uint8).numpy()
    packed = mask[0] | (mask[1] << 1) | (mask[2] << 2)
    return image, packed


def unpack_mask(packed: np.ndarray) -> torch.Tensor:
    """Packed uint8 (S, S) -> float32 (3, S, S) in {0, 1}, class order :data:`CLASSES`."""
    p = torch.from_numpy(np.array(packed, dtype=np.uint8))  # copy: the cache is read-only
    return torch.stack([(p >> c) & 1 for c in range(len(CLASSES))]).float()


# --------------------------------------------------------------------------- cache
CACHE_VERSION = 1


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
def _file_lock(path: Path) -> Iterator[None]:
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

    Files ``uw-{key}.images.npy`` (N, S, S) uint16, ``uw-{key}.masks.npy`` (N, S, S) uint8
    (bit c = class c) and ``uw-{key}.json`` (written last; the cache counts only with it).
    ``key`` hashes the dataset fingerprint (``train.csv`` bytes and every image's relative path,
    size and mtime) and the preprocessing parameters, so a changed dataset or preprocessing never
    reads an old cache. The JSON records the array shapes, file sizes and a sampled digest; a
    mismatch (truncated, overwritten, half-written file) means corrupt: rebuilt with a warning.
    Builds hold a file lock, so two processes (torchrun) constructing at once build it once.
    Context stacking, splits and augmentation happen at read time, so one cache serves them all.
    """

    def __init__(self, root: Path, records: list[SliceRecord], img_size: int,
                 cache_dir: str | os.PathLike | None = None) -> None:
        self.root = Path(root)
        self.records = records
        self.img_size = int(img_size)
        self.dir = Path(cache_dir) if cache_dir is not None else self.root / ".kvseg_cache"
        self.key = self._key()
        self.images_path = self.dir / f"uw-{self.key}.images.npy"
        self.masks_path = self.dir / f"uw-{self.key}.masks.npy"
        self.meta_path = self.dir / f"uw-{self.key}.json"
        self.built = False  # True when this instance (re)built the files
        self._images: np.ndarray | None = None
        self._masks: np.ndarray | None = None

    def _key(self) -> str:
        h = hashlib.sha256()
        h.update((self.root / "train.csv").read_bytes())
        for r in self.records:
            st = os.stat(r.path)
            rel = os.path.relpath(r.path, self.root)
            h.update(f"{rel}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        h.update(f"img_size={self.img_size}|p={P_LOW},{P_HIGH}|v={CACHE_VERSION}".encode())
        return h.hexdigest()[:20]

    def _check(self) -> str | None:
        """``None`` if the cache files are complete and match; else the reason they do not."""
        if not self.meta_path.exists():
            return "missing"
        try:
            meta = json.loads(self.meta_path.read_text())
            n, s = len(self.records), self.img_size
            if meta.get("key") != self.key or meta.get("n") != n or meta.get("img_size") != s:
                return "metadata does not match the dataset"
            for path, dtype, name in ((self.images_path, np.uint16, "images"),
                                      (self.masks_path, np.uint8, "masks")):
                if not path.exists():
                    return f"{path.name} missing"
                if path.stat().st_size != meta[name]["bytes"]:
                    return f"{path.name} has the wrong size"
                arr = np.load(path, mmap_mode="r")
                if arr.shape != (n, s, s) or arr.dtype != dtype:
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
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / f"uw-{self.key}.lock"
            probe.touch()
        except OSError as e:
            raise PermissionError(f"{self.dir}: cannot write the slice cache here ({e.strerror}); "
                                  "pass another cache_dir (--cache-dir) or cache=False") from None
        with _file_lock(self.dir / f"uw-{self.key}.lock"):
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
        n, s = len(self.records), self.img_size
        log.info("building the slice cache for %d slices at %d px in %s", n, s, self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.images_path) as ti, atomic_path(self.masks_path) as tm:
            images = np.lib.format.open_memmap(ti, mode="w+", dtype=np.uint16, shape=(n, s, s))
            masks = np.lib.format.open_memmap(tm, mode="w+", dtype=np.uint8, shape=(n, s, s))
            workers = threads or min(8, os.cpu_count() or 1)
            chunk = 64 * workers  # bounded memory: results are written chunk by chunk
            with ThreadPoolExecutor(workers) as pool:
                for lo in range(0, n, chunk):
                    done = pool.map(lambda r: prepare_record(r, s), self.records[lo:lo + chunk])
                    for i, (image, packed) in enumerate(done, start=lo):
                        images[i], masks[i] = image, packed
            images.flush()
            masks.flush()
            del images, masks
        meta = dict(key=self.key, n=n, img_size=s, root=str(self.root.resolve()),
                    version=CACHE_VERSION,
                    images=dict(bytes=self.images_path.stat().st_size,
                                digest=_sample_digest(self.images_path)),
                    masks=dict(bytes=self.masks_path.stat().st_size,
                               digest=_sample_digest(self.masks_path)))
        atomic_write_text(self.meta_path, json.dumps(meta, indent=1))

    def _remove_superseded(self) -> None:
        """Delete older caches of the same root and img_size (their dataset has changed)."""
        root = str(self.root.resolve())
        for meta_path in self.dir.glob("uw-*.json"):
            if meta_path == self.meta_path:
                continue
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                continue
            if meta.get("root") == root and meta.get("img_size") == self.img_size:
                stem = meta_path.name[: -len(".json")]
                meta_path.unlink(missing_ok=True)
                for suffix in (".images.npy", ".masks.npy", ".lock"):
                    (self.dir / f"{stem}{suffix}").unlink(missing_ok=True)
                log.info("removed superseded cache %s", stem)

    def get(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """``(image uint16 (S, S), packed mask uint8 (S, S))`` of record ``index``."""
        if self._images is None:  # opened lazily: each DataLoader worker maps its own view
            self._images = np.load(self.images_path, mmap_mode="r")
            self._masks = np.load(self.masks_path, mmap_mode="r")
        return self._images[index], self._masks[index]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_images"] = state["_masks"] = None
        return state


# --------------------------------------------------------------------------- splits
def case_folds(cases: Iterable[int], n_folds: int) -> dict[int, int]:
    """Assign each case a fold: sorted case ids, a fixed permutation (seed 0), round-robin.

    Deterministic and grouped by case (no case in two folds); fold sizes differ by at most one.
    """
    unique = sorted(set(int(c) for c in cases))
    order = np.random.default_rng(0).permutation(len(unique))
    return {unique[j]: k % n_folds for k, j in enumerate(order.tolist())}


def _parse_exclude(exclude: str | Iterable[str | int] | None) -> tuple[set[str], set[int]]:
    """``"bad"`` / ``"caseC_dayD"`` / ``"caseC"`` / int case ids -> (scan ids, case ids)."""
    scans: set[str] = set()
    cases: set[int] = set()
    if exclude is None:
        return scans, cases
    if isinstance(exclude, (str, int)):
        exclude = [exclude]
    for e in exclude:
        if isinstance(e, (int, np.integer)) and not isinstance(e, bool):
            cases.add(int(e))
        elif e == "bad":
            scans.update(BAD_SCANS)
        elif isinstance(e, str) and _SCAN_RE.match(e):
            scans.add(e)
        elif isinstance(e, str) and _CASE_RE.match(e):
            cases.add(int(_CASE_RE.match(e).group(1)))
        else:
            raise ValueError(f"exclude entry {e!r}: expected 'bad', 'caseC_dayD', 'caseC' or an "
                             "int case id")
    return scans, cases


class UWMadison(Dataset):
    """UW-Madison GI Tract slices as a map-style dataset (2.5D context, folds, cache).

    Items are dicts: ``image`` float32 (2*context+1, S, S) in [0, 1] (channel ``context`` is the
    slice itself, channel ``j`` the slice ``j - context`` positions away in the same scan, the
    border slice repeated at the scan's ends); ``mask`` float32 (3, S, S) in {0, 1}, classes
    :data:`CLASSES`; ``id`` str; ``case``, ``day``, ``slice``, ``height``, ``width`` int
    (original pixels); ``spacing`` float (mm); ``path`` str (the slice's PNG).

    ``split``: ``"train"`` (every fold but ``fold``), ``"val"`` (fold ``fold``) or ``"all"``;
    folds are grouped by case (:func:`case_folds`). ``augment`` applies to the train split
    only. ``exclude``: ``"bad"`` (:data:`BAD_SCANS`), scan ids ``caseC_dayD``, ``caseC`` or int
    case ids. ``cache``: preprocessed slices in ``cache_dir`` (default ``root/.kvseg_cache``);
    with ``cache=False`` every item decodes PNG + RLE (identical values, slower).

    ``records`` lists the selected slices (:class:`SliceRecord`, in item order);
    :meth:`full_mask` gives a slice's masks at original size; :meth:`scans` groups item
    indices per scan for 3D metrics.
    """

    classes = CLASSES

    def __init__(self, root: str | os.PathLike, *, split: str = "train", fold: int = 0,
                 n_folds: int = 5, img_size: int = 256, context: int = 0, augment: bool = False,
                 cache: bool = True, cache_dir: str | os.PathLike | None = None,
                 exclude: str | Iterable[str | int] | None = ()) -> None:
        if split not in ("train", "val", "all"):
            raise ValueError(f"split {split!r}: expected 'train', 'val' or 'all'")
        if int(img_size) < 8:
            raise ValueError(f"img_size {img_size}: expected >= 8")
        if int(context) < 0:
            raise ValueError(f"context {context}: expected >= 0")
        self.root = Path(root)
        self.split, self.fold, self.n_folds = split, int(fold), int(n_folds)
        self.img_size, self.context = int(img_size), int(context)
        self.augment = bool(augment) and split == "train"
        self.in_channels = 2 * self.context + 1

        self.all_records = scan_dataset(self.root)
        self._neighbours = self._neighbour_table(self.all_records, self.context)
        scans_out, cases_out = _parse_exclude(exclude)
        named = [exclude] if isinstance(exclude, (str, int)) else list(exclude or ())
        named_scans, _ = _parse_exclude([e for e in named if e != "bad"])
        for s in sorted(named_scans - {r.scan_id for r in self.all_records}):
            log.warning("exclude %s: no such scan in %s", s, self.root)
        keep = [r for r in self.all_records
                if r.scan_id not in scans_out and r.case not in cases_out]
        if split != "all":
            n_cases = len({r.case for r in keep})
            if not 2 <= self.n_folds <= max(n_cases, 2):
                raise ValueError(f"n_folds {n_folds}: expected 2..{n_cases} (number of cases)")
            if not 0 <= self.fold < self.n_folds:
                raise ValueError(f"fold {fold}: expected 0..{self.n_folds - 1}")
            # Folds come from every case in the dataset, before `exclude`, so excluding a scan
            # or a case never moves the other cases between folds.
            folds = case_folds((r.case for r in self.all_records), self.n_folds)
            want_val = split == "val"
            keep = [r for r in keep if (folds[r.case] == self.fold) == want_val]
        if not keep:
            raise ValueError(f"{self.root}: split {split!r} (fold {fold}) selects no slices")
        self.records: list[SliceRecord] = keep
        self._by_id = {r.id: r for r in self.all_records}

        self.cache: SliceCache | None = None
        if cache:
            self.cache = SliceCache(self.root, self.all_records, self.img_size, cache_dir)
            self.cache.ensure()

    @staticmethod
    def _neighbour_table(records: list[SliceRecord], context: int) -> np.ndarray:
        """(N, 2*context+1) record indices: neighbours by slice order within each scan."""
        table = np.zeros((len(records), 2 * context + 1), np.int64)
        start = 0
        while start < len(records):
            end = start
            while end < len(records) and records[end].scan_id == records[start].scan_id:
                end += 1
            for i in range(start, end):
                for j, off in enumerate(range(-context, context + 1)):
                    table[i, j] = min(max(i + off, start), end - 1)
            start = end
        return table

    def __len__(self) -> int:
        return len(self.records)

    def _slice(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if self.cache is not None:
            return self.cache.get(index)
        return prepare_record(self.all_records[index], self.img_size)

    def __getitem__(self, i: int) -> dict:
        rec = self.records[i]
        wanted = [int(j) for j in self._neighbours[rec.index]]
        slices = {j: self._slice(j) for j in set(wanted)}
        image = torch.from_numpy(np.stack([slices[j][0] for j in wanted]).astype(np.float32))
        image = image / 65535.0  # (2*context+1, S, S)
        mask = unpack_mask(slices[rec.index][1])  # (3, S, S)
        if self.augment:
            image, mask = augment(image, mask)
        return dict(image=image, mask=mask, id=rec.id, case=rec.case, day=rec.day,
                    slice=rec.slice, height=rec.height, width=rec.width, spacing=rec.spacing,
                    path=rec.path)

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.records]

    def record(self, slice_id: str) -> SliceRecord:
        """The record of ``slice_id`` (any slice of the root, selected or not)."""
        try:
            return self._by_id[slice_id]
        except KeyError:
            raise ValueError(f"{slice_id}: no such slice in {self.root}") from None

    def full_mask(self, slice_id: str) -> np.ndarray:
        """Ground truth at original resolution: uint8 (3, height, width) in {0, 1}."""
        return self.record(slice_id).full_mask()

    def neighbour_ids(self, slice_id: str) -> list[str]:
        """The slice ids stacked as channels for ``slice_id`` (length 2*context+1)."""
        rec = self.record(slice_id)
        return [self.all_records[int(j)].id for j in self._neighbours[rec.index]]

    def scans(self) -> dict[str, list[int]]:
        """``{"caseC_dayD": [item indices sorted by slice]}`` for per-scan (3D) metrics."""
        out: dict[str, list[int]] = {}
        for i, r in enumerate(self.records):
            out.setdefault(r.scan_id, []).append(i)
        return out

    def __repr__(self) -> str:
        return (f"UWMadison({str(self.root)!r}, split={self.split!r}, fold={self.fold}, "
                f"n={len(self)}, img_size={self.img_size}, context={self.context})")


def spacing_mm(record: SliceRecord) -> tuple[float, float, float]:
    """Voxel spacing (slice, row, column) in mm for 3D metrics: (3.0, spacing, spacing)."""
    return (SLICE_THICKNESS_MM, record.spacing, record.spacing)


__all__ = ["BAD_SCANS", "CLASSES", "SliceCache", "SliceInfo", "SliceRecord", "UWMadison",
           "case_folds", "load_png", "parse_slice_path", "prepare_record", "read_train_csv",
           "scan_dataset", "spacing_mm", "unpack_mask"]
