"""The UW-Madison GI Tract Image Segmentation dataset (Kaggle 2022), read exactly.

Layout (``root`` is the folder holding ``train.csv``)::

    root/train.csv        id,class,segmentation   (3 rows per slice, RLE row-major, 1-indexed)
    root/train/case{C}/case{C}_day{D}/scans/slice_{SSSS}_{W}_{H}_{PW}_{PH}.png

W and H are the slice's width and height (width first: ``slice_0066_360_310_1.50_1.50.png`` is
an array of shape (310, 360)), PW and PH the pixel spacing in mm; slices are 3 mm thick.
The conventions and where they were verified are in ``docs/data.md``; the names are parsed in
:mod:`kvseg.data.names`, images read by :mod:`kvseg.data.png`.

:class:`UWMadison` validates the whole CSV and file list at construction (so a bad RLE or a
missing image fails at once, naming the file and row), then serves items from an on-disk cache
of preprocessed slices (:class:`~kvseg.data.cache.SliceCache`).
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from kvseg.data.cache import SliceCache
from kvseg.data.context import neighbour_table, scan_positions
from kvseg.data.names import (
    BAD_SCANS,
    CLASSES,
    SLICE_THICKNESS_MM,
    SliceInfo,
    parse_case_id,
    parse_scan_id,
    parse_slice_id,
    parse_slice_path,
    scan_id,
)
from kvseg.data.png import load_png, read_slice
from kvseg.data.rle import parse_runs, rle_decode
from kvseg.data.splits import case_folds, check_split, select_split
from kvseg.data.transforms import augment, resize_mask
from kvseg.errors import ConfigError, DataError

log = logging.getLogger(__name__)

_COLUMNS = ("id", "class", "segmentation")


# --------------------------------------------------------------------------- train.csv
def _decode_csv(p: Path) -> str:
    """``p``'s text; a BOM (Excel) is dropped, anything but UTF-8 is a :class:`DataError`."""
    raw = p.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{p}: UTF-16 text (byte order mark {raw[:2].hex(' ')}); expected UTF-8 "
                        "(save it as \"CSV UTF-8\")")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{p}: line {line}: byte 0x{raw[e.start]:02x} is not UTF-8 ({e.reason}); "
                        "expected UTF-8 text (Latin-1 or another encoding? save it as UTF-8)"
                        ) from None


def read_train_csv(path: str | os.PathLike) -> dict[str, dict[str, tuple[int, str]]]:
    """Read ``train.csv`` into ``{slice_id: {class: (line_number, rle)}}`` (RLEs not decoded).

    Raises ``FileNotFoundError`` if absent and :class:`~kvseg.errors.DataError` naming the file
    (and line) for: text that is not UTF-8, a missing ``id``/``class``/``segmentation`` column,
    a row with more fields than the header (e.g. a comma inside an RLE), an unknown class, a
    malformed id, or a repeated (id, class) row. Logs a warning naming any class without a
    single non-empty mask, with the per-class counts.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: train.csv not found")
    text = _decode_csv(p)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows: dict[str, dict[str, tuple[int, str]]] = {}
    try:
        header = reader.fieldnames or []
        end = reader.line_num  # the last line of the previous row (here: the header)
        missing = [c for c in _COLUMNS if c not in header]
        if missing:
            raise DataError(f"{p}: missing column(s) {', '.join(missing)}; expected "
                            "id,class,segmentation")
        for row in reader:
            line = reader.line_num
            sid, cls, rle = row["id"], row["class"], row["segmentation"] or ""
            _check_one_line(p, row, end, line, text)
            end = line
            if None in row:  # DictReader's key for fields beyond the header
                n = len(header) + len(row[None])
                raise DataError(f"{p}: line {line} ({sid}): {n} fields but the header has "
                                f"{len(header)} ({','.join(header)}); a comma inside the "
                                "segmentation?")
            if cls not in CLASSES:
                raise DataError(f"{p}: line {line} ({sid}): unknown class {cls!r}; expected one "
                                f"of {', '.join(CLASSES)}")
            if parse_slice_id(sid) is None:
                raise DataError(f"{p}: line {line}: id {sid!r} is not "
                                "case{C}_day{D}_slice_SSSS")
            per_id = rows.setdefault(sid, {})
            if cls in per_id:
                raise DataError(f"{p}: line {line} ({sid}, {cls}): repeated row (first at line "
                                f"{per_id[cls][0]})")
            per_id[cls] = (line, rle.strip())
    except csv.Error as e:
        raise DataError(f"{p}: line {reader.line_num}: not readable as CSV ({e})") from None
    if rows:
        _check_complete(p, rows)
        _warn_empty_classes(p, rows)
    return rows


def _check_one_line(p: Path, row: dict, previous: int, line: int, text: str) -> None:
    """A row that spans lines opened a quote it never closed (the ``csv`` module then reads on
    to the next quote, maybe hundreds of lines later): a :class:`DataError` naming the line
    where the row, and its quote, began (the first non-blank line after ``previous``)."""
    values = [v for k, v in row.items() if k is not None and isinstance(v, str)]
    values += [v for v in row.get(None) or () if isinstance(v, str)]
    if not any("\n" in v or "\r" in v for v in values):
        return
    lines = text.splitlines()
    start = previous + 1
    while start < line and start <= len(lines) and not lines[start - 1].strip():
        start += 1
    raise DataError(f"{p}: line {start}: a quote (\") opens a field that runs on to line "
                    f"{line}; an unterminated quote? (train.csv fields are never quoted)")


def _check_complete(p: Path, rows: dict[str, dict[str, tuple[int, str]]]) -> None:
    """Every slice has a row for every class the file has rows for (the Kaggle file has exactly
    one per slice and class, empty for no mask): a missing row would silently read as an empty
    mask, so it is a :class:`DataError` naming the first such slice and the count. A class
    with no rows at all is only warned about (:func:`_warn_empty_classes`)."""
    present = [c for c in CLASSES if any(c in per for per in rows.values())]
    gaps = [(sid, [c for c in present if c not in per]) for sid, per in rows.items()]
    gaps = [(sid, missing) for sid, missing in gaps if missing]
    if gaps:
        sid, missing = gaps[0]
        line = min(v[0] for v in rows[sid].values())
        raise DataError(f"{p}: {len(gaps)} slice(s) lack a class row (first: {sid}, line {line}, "
                        f"has no {' / '.join(missing)} row); the Kaggle file has one row per "
                        "slice and class, with an empty segmentation for no mask: a truncated "
                        "or edited file? add the rows, or download it again")


def _warn_empty_classes(p: Path, rows: dict[str, dict[str, tuple[int, str]]]) -> None:
    """Warn about classes that have no rows, or only empty masks (the model cannot learn them)."""
    n_rows = {c: sum(c in per for per in rows.values()) for c in CLASSES}
    non_empty = {c: sum(bool(per.get(c, (0, ""))[1]) for per in rows.values()) for c in CLASSES}
    empty = [f"{c} ({'no rows' if not n_rows[c] else f'{n_rows[c]} rows, all empty'})"
             for c in CLASSES if not non_empty[c]]
    if empty:
        counts = ", ".join(f"{c} {non_empty[c]}" for c in CLASSES)
        log.warning("%s: no non-empty mask for %s; non-empty masks per class: %s", p,
                    "; ".join(empty), counts)


# --------------------------------------------------------------------------- records
@dataclass(frozen=True)
class SliceRecord(SliceInfo):
    """One slice of the dataset: what its file name says (:class:`SliceInfo`: ids, size,
    spacing), its image path and its three RLEs (class order :data:`CLASSES`).

    ``index`` is the slice's row in the cache (the position in the full sorted dataset).
    """

    index: int = 0
    path: str = ""
    rles: tuple[str, str, str] = ("", "", "")

    def full_mask(self) -> np.ndarray:
        """The slice's masks at original resolution: uint8 (3, height, width) in {0, 1}."""
        return np.stack([rle_decode(r, (self.height, self.width)) for r in self.rles])


def scan_dataset(root: str | os.PathLike) -> list[SliceRecord]:
    """Match ``root/train.csv`` with the images under ``root/train``; validate everything.

    Returns records sorted by (case, day, slice). Every non-empty RLE is checked against the
    image size in its file name (:class:`~kvseg.errors.DataError` naming CSV file, line, id and
    class); a CSV id without an image raises ``FileNotFoundError``; images with no CSV row are
    skipped with a warning (they have no labels).
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
            raise DataError(f"{png}: folder {info.scan_id} is not inside case{info.case}/")
        if info.id in images:
            raise DataError(f"{png}: second image for slice {info.id} (also {images[info.id][0]})")
        images[info.id] = (png, info)
    records = []
    for sid, per_class in rows.items():
        if sid not in images:
            case, day, slice_no = parse_slice_id(sid)
            line = min(v[0] for v in per_class.values())
            raise FileNotFoundError(
                f"{csv_path}: line {line}: no image for {sid} (expected "
                f"{root}/train/case{case}/{scan_id(case, day)}/scans/"
                f"slice_{slice_no:04d}_W_H_PW_PH.png)")
        png, info = images[sid]
        rles = []
        for cls in CLASSES:
            line, rle = per_class.get(cls, (0, ""))
            try:
                parse_runs(rle, info.width * info.height)
            except ValueError as e:
                raise DataError(f"{csv_path}: line {line} ({sid}, {cls}): {e}") from None
            rles.append(rle)
        records.append((info, str(png), tuple(rles)))
    unlabeled = len(images) - len(records)
    if unlabeled:
        log.warning("%s: %d image(s) have no row in train.csv and are skipped", root, unlabeled)
    if not records:
        raise DataError(f"{csv_path}: no slices (empty CSV or no images under {root}/train)")
    records.sort(key=lambda r: (r[0].case, r[0].day, r[0].slice))
    return [SliceRecord(info.case, info.day, info.slice, info.width, info.height, info.spacing,
                        index=i, path=png, rles=rles)
            for i, (info, png, rles) in enumerate(records)]


# --------------------------------------------------------------------------- preprocessing
def prepare_record(record: SliceRecord, img_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode one slice: ``(image uint16 (S, S), packed mask uint8 (S, S))``.

    The image is :func:`~kvseg.data.png.read_slice` output quantised to 16 bits
    (value / 65535); the mask packs class ``c`` into bit ``c``. The cache stores exactly these
    arrays, and the uncached path computes the same, so cached and uncached items are identical.
    """
    raw, image = read_slice(record.path, img_size)
    if raw.shape != (record.height, record.width):
        raise DataError(f"{record.path}: image is {raw.shape[1]}x{raw.shape[0]} (width x height) "
                        f"but its file name says {record.width}x{record.height}")
    image = torch.round(image[0] * 65535).to(torch.int32).numpy().astype(np.uint16)
    mask = resize_mask(record.full_mask(), img_size).to(torch.uint8).numpy()
    packed = mask[0] | (mask[1] << 1) | (mask[2] << 2)
    return image, packed


def unpack_mask(packed: np.ndarray) -> torch.Tensor:
    """Packed uint8 (S, S) -> float32 (3, S, S) in {0, 1}, class order :data:`CLASSES`."""
    p = torch.from_numpy(np.array(packed, dtype=np.uint8))  # copy: the cache is read-only
    return torch.stack([(p >> c) & 1 for c in range(len(CLASSES))]).float()


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
        elif parse_scan_id(e) is not None:
            scans.add(e)
        elif parse_case_id(e) is not None:
            cases.add(parse_case_id(e))
        else:
            raise ConfigError(f"exclude entry {e!r}: expected 'bad', 'caseC_dayD', 'caseC' or "
                              "an int case id")
    return scans, cases


# --------------------------------------------------------------------------- dataset
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
    task = "multilabel"  # the organs overlap: one sigmoid channel per class
    preprocess = {"channels": 1, "window": None}

    def __init__(self, root: str | os.PathLike, *, split: str = "train", fold: int = 0,
                 n_folds: int = 5, img_size: int = 256, context: int = 0, augment: bool = False,
                 cache: bool = True, cache_dir: str | os.PathLike | None = None,
                 exclude: str | Iterable[str | int] | None = ()) -> None:
        check_split(split)
        if int(img_size) < 8:
            raise ConfigError(f"img_size {img_size}: expected >= 8")
        if int(context) < 0:
            raise ConfigError(f"context {context}: expected >= 0")
        self.root = Path(root)
        self.split, self.fold, self.n_folds = split, int(fold), int(n_folds)
        self.img_size, self.context = int(img_size), int(context)
        self.augment = bool(augment) and split == "train"
        self.in_channels = 2 * self.context + 1

        self.all_records = scan_dataset(self.root)
        self._neighbours = neighbour_table([r.scan_id for r in self.all_records], self.context)
        scans_out, cases_out = _parse_exclude(exclude)
        named = [exclude] if isinstance(exclude, (str, int)) else list(exclude or ())
        named_scans, _ = _parse_exclude([e for e in named if e != "bad"])
        for s in sorted(named_scans - {r.scan_id for r in self.all_records}):
            log.warning("exclude %s: no such scan in %s", s, self.root)
        keep = [r for r in self.all_records
                if r.scan_id not in scans_out and r.case not in cases_out]
        # Folds (and the n_folds check) come from every case in the dataset, before `exclude`,
        # so excluding a scan or a case never moves the other cases between folds.
        keep = select_split(keep, lambda r: r.case, (r.case for r in self.all_records), split,
                            self.fold, self.n_folds, where=str(self.root))
        if not keep:
            raise DataError(f"{self.root}: split {split!r} (fold {fold}) selects no slices")
        self.records: list[SliceRecord] = keep
        self._by_id = {r.id: r for r in self.all_records}

        self.cache: SliceCache | None = None
        if cache:
            records, size = self.all_records, self.img_size
            self.cache = SliceCache(self.root, [r.path for r in records], size,
                                    lambda i: prepare_record(records[i], size),
                                    cache_dir=cache_dir)
            self.cache.ensure()

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
            raise DataError(f"{slice_id}: no such slice in {self.root}") from None

    def full_mask(self, slice_id: str) -> np.ndarray:
        """Ground truth at original resolution: uint8 (3, height, width) in {0, 1}."""
        return self.record(slice_id).full_mask()

    def neighbour_ids(self, slice_id: str) -> list[str]:
        """The slice ids stacked as channels for ``slice_id`` (length 2*context+1)."""
        rec = self.record(slice_id)
        return [self.all_records[int(j)].id for j in self._neighbours[rec.index]]

    def scans(self) -> dict[str, list[int]]:
        """``{"caseC_dayD": [item indices sorted by slice]}`` for per-scan (3D) metrics."""
        return scan_positions(r.scan_id for r in self.records)

    def __repr__(self) -> str:
        return (f"UWMadison({str(self.root)!r}, split={self.split!r}, fold={self.fold}, "
                f"n={len(self)}, img_size={self.img_size}, context={self.context})")


def spacing_mm(record: SliceRecord) -> tuple[float, float, float]:
    """Voxel spacing (slice, row, column) in mm for 3D metrics: (3.0, spacing, spacing)."""
    return (SLICE_THICKNESS_MM, record.spacing, record.spacing)


# SliceCache, SliceInfo, case_folds, load_png and parse_slice_path live in their own modules
# (cache, names, splits, png); they stay importable from here for existing code.
__all__ = ["BAD_SCANS", "CLASSES", "SLICE_THICKNESS_MM", "SliceCache", "SliceInfo",
           "SliceRecord", "UWMadison", "case_folds", "load_png", "parse_slice_path",
           "prepare_record", "read_train_csv", "scan_dataset", "spacing_mm", "unpack_mask"]
