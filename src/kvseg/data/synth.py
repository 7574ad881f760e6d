"""The synthetic twin of UW-Madison GI Tract: same layout, same conventions, no download.

``generate(out, cases=8, days=2, slices=32, seed=0)`` writes::

    out/train.csv                                   id,class,segmentation (row-major RLE)
    out/train/case{C}/case{C}_day{D}/scans/slice_{SSSS}_{W}_{H}_{PW}_{PH}.png   16-bit grayscale
    out/.kvseg_synth.json                           the generator's parameters and the list
                                                    of files it wrote (its manifest)

Each scan is a smooth 3D volume drawn in millimetres (pixel spacing in-plane, 3 mm slices):
an abdomen with a fat ring, spine, liver and kidneys (distractors), a **stomach** (a deformed
ellipsoid that moves and grows/shrinks across slices), a **large bowel** (a thick tube along a
curved colon-like path: ascending, transverse, descending, sigmoid) and a **small bowel**
(clusters of thinner tubes along smoothed random walks). Masks are painted per organ and may
overlap. Texture, a multiplicative bias field, a slight blur and Rician-like noise make it
MRI-like; the organs occupy roughly the middle half of the scan, so about half of the slices are
empty, as in the real data. Slice sizes cycle through the real ones (266_266, 360_310,
276_276 at 1.63 mm, 234_234).

The anatomy of a case is drawn from ``(seed, case)``, each day perturbs it with
``(seed, case, day)``: the same seed gives byte-identical files. :func:`scan_layout` and
:func:`render_scan` return the volumes without writing, so tests can compare what a reader
decodes with what the generator drew.
"""

from __future__ import annotations

import io
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter, gaussian_filter1d
from tqdm import tqdm

from kvseg.data.manifest import foreign_entry, read_manifest, remove_files, write_manifest
from kvseg.data.names import CLASSES, scan_id, slice_filename, slice_id
from kvseg.data.rle import rle_encode
from kvseg.errors import ConfigError, RunDirError
from kvseg.utils import MAX_SEED, check_number, gigabytes, physical_memory

log = logging.getLogger(__name__)

# The anatomy spans a fixed head-to-foot range whatever the number of slices, so a 32-slice scan
# samples it coarsely (like every 4th-5th real slice) instead of squeezing organs flat.
ANATOMY_DEPTH_MM = 300.0
# (width, height, spacing) cycled over scans; the real set's sizes (W_H as in the file name).
SIZES = ((266, 266, 1.50), (360, 310, 1.50), (266, 266, 1.50), (276, 276, 1.63),
         (360, 310, 1.50), (266, 266, 1.50), (234, 234, 1.50), (266, 266, 1.50))
MARKER = ".kvseg_synth.json"


@dataclass(frozen=True)
class ScanSpec:
    """One synthetic scan: ids, pixel size (width-first like the file names), spacing, slices."""

    case: int
    day: int
    width: int
    height: int
    spacing: float
    num_slices: int

    @property
    def scan_id(self) -> str:
        return scan_id(self.case, self.day)

    def slice_filename(self, slice_no: int) -> str:
        """``slice_{SSSS}_{W}_{H}_{PW}_{PH}.png`` with slice numbers starting at 1."""
        return slice_filename(slice_no, self.width, self.height, self.spacing)


def scan_layout(cases: int = 8, days: int = 2, slices: int = 32, seed: int = 0) -> list[ScanSpec]:
    """The scans ``generate`` writes, in order: real-looking case/day numbers, cycled sizes."""
    if cases < 1 or days < 1:
        raise ConfigError(f"--cases and --days must be >= 1, got cases={cases} days={days}")
    if slices < 3:
        raise ConfigError(f"--slices must be >= 3, got {slices}")
    rng = np.random.default_rng([seed, 7919])
    case_ids = np.sort(rng.choice(np.arange(1, max(160, 2 * cases)), size=cases, replace=False))
    specs = []
    for case in case_ids.tolist():
        day = int(rng.integers(0, 15))
        for _ in range(days):
            w, h, sp = SIZES[len(specs) % len(SIZES)]
            specs.append(ScanSpec(case, day, w, h, sp, slices))
            day += int(rng.integers(1, 12))
    return specs


# --------------------------------------------------------------------------- anatomy
def _smooth_path(points: np.ndarray, step_mm: float, smooth: float) -> np.ndarray:
    """Resample a 3D polyline (N, 3) in mm at ~``step_mm`` and smooth its corners."""
    seg = np.linalg.norm(np.diff(points, axis=0), axis=1)
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    n = max(int(arc[-1] / step_mm), 2)
    t = np.linspace(0.0, arc[-1], n)
    path = np.stack([np.interp(t, arc, points[:, i]) for i in range(3)], axis=1)
    if smooth > 0:
        path = gaussian_filter1d(path, smooth / step_mm, axis=0, mode="nearest")
    return path


@dataclass
class _Anatomy:
    body: tuple[float, float, float, float]     # centre x, y (mm), semi-axes a, b (mm)
    fat: float                                 # fat ring thickness (mm)
    stomach: dict
    colon: np.ndarray                          # (N, 4): x, y, z (mm), radius (mm)
    small: list[np.ndarray]                    # loops, each (N, 4)
    kidneys: tuple[float, float]               # z range (fraction)
    liver_scale: float
    levels: dict                               # intensity per tissue (0..1)
    bias: np.ndarray                           # 6 polynomial coefficients
    scale: float                               # intensity of 1.0 in uint16 units


def _draw_anatomy(spec: ScanSpec, seed: int) -> _Anatomy:
    """Sample the smooth 3D anatomy: per-case shape from (seed, case), day changes on top."""
    rc = np.random.default_rng([seed, spec.case])
    rd = np.random.default_rng([seed, spec.case, spec.day, 1])
    depth = ANATOMY_DEPTH_MM
    a = rc.uniform(135, 165) * rd.uniform(0.97, 1.03)
    b = rc.uniform(100, 120) * rd.uniform(0.97, 1.03)
    body = (rd.uniform(-8, 8), rd.uniform(-8, 8), a, b)
    z_shift = rd.uniform(-0.04, 0.04)  # breathing / positioning: organs move in z between days

    def jit(v: float, s: float) -> float:
        return v + rc.normal(0, s) + rd.normal(0, s / 2)

    # Stomach: patient's left = image right, upper part of the organ range.
    z0, z1 = 0.27 + z_shift + rc.uniform(-0.02, 0.02), 0.52 + z_shift + rc.uniform(-0.03, 0.03)
    stomach = dict(
        z=(z0 * depth, z1 * depth),
        start=(jit(0.40 * a, 8), jit(-0.35 * b, 6)), end=(jit(0.18 * a, 8), jit(-0.05 * b, 6)),
        axes=(jit(62, 6), jit(46, 5)), angle=(rc.uniform(-0.6, 0.6), rc.uniform(-0.6, 0.6)),
        wobble=rc.uniform(0, 2 * math.pi, 4), wobble_amp=(rc.uniform(0.05, 0.15),
                                                          rc.uniform(0.03, 0.1)),
    )
    # Large bowel: a colon frame, z as a fraction of the scan depth.
    zt = 0.33 + z_shift
    frame = np.array([
        [-0.05 * a, 0.25 * b, 0.70],  # sigmoid / rectum (centre, inferior)
        [0.50 * a, 0.10 * b, 0.64],   # descending colon, lower
        [0.58 * a, 0.05 * b, 0.50],
        [0.55 * a, -0.25 * b, zt],    # splenic flexure
        [0.15 * a, -0.45 * b, zt + 0.04],  # transverse colon
        [-0.25 * a, -0.42 * b, zt + 0.06],
        [-0.55 * a, -0.15 * b, zt + 0.02],  # hepatic flexure
        [-0.58 * a, 0.05 * b, 0.55],  # ascending colon
        [-0.50 * a, 0.15 * b, 0.66],  # caecum
    ])
    frame[:, 0] += rc.normal(0, 10, len(frame)) + rd.normal(0, 4, len(frame))
    frame[:, 1] += rc.normal(0, 8, len(frame)) + rd.normal(0, 4, len(frame))
    frame[:, 2] = (frame[:, 2] + z_shift + rc.normal(0, 0.015, len(frame))) * depth
    colon = _smooth_path(frame, 1.5, 15.0)
    phase = rc.uniform(0, 2 * math.pi)
    radius = rc.uniform(19, 24) * (1 + 0.2 * np.sin(np.linspace(0, 5 * math.pi, len(colon))
                                                     + phase))
    colon = np.concatenate([colon, radius[:, None]], axis=1)
    # Small bowel: loops of a random walk inside the lower-central abdomen.
    small = []
    for _ in range(int(rc.integers(7, 10))):
        p = np.array([rc.uniform(-0.3, 0.3) * a, rc.uniform(-0.1, 0.3) * b,
                      rc.uniform(0.45, 0.65)])
        pts, d = [], rc.normal(0, 1, 3)
        for _ in range(40):
            d = 0.7 * d + 0.3 * rc.normal(0, 1, 3)
            p = p + np.array([10 * d[0], 10 * d[1], 0.02 * d[2]])
            p[0] = np.clip(p[0], -0.35 * a, 0.35 * a)
            p[1] = np.clip(p[1], -0.15 * b, 0.35 * b)
            p[2] = np.clip(p[2], 0.42, 0.70)
            pts.append(p.copy())
        pts = np.array(pts)
        pts[:, :2] += rd.normal(0, 3, (len(pts), 2))
        pts[:, 2] = (pts[:, 2] + z_shift) * depth
        loop = _smooth_path(pts, 1.5, 6.0)
        r = rc.uniform(12, 15) * np.ones(len(loop))
        small.append(np.concatenate([loop, r[:, None]], axis=1))
    levels = dict(air=0.02, body=0.30, fat=0.78, liver=0.42, spine=0.18, spine_rim=0.55,
                  kidney=0.42, stomach=rd.uniform(0.85, 0.95), colon=rd.uniform(0.66, 0.74),
                  small=rd.uniform(0.5, 0.56), gas=0.12)
    return _Anatomy(body=body, fat=rc.uniform(10, 20), stomach=stomach, colon=colon, small=small,
                    kidneys=(0.35 + z_shift, 0.72 + z_shift), liver_scale=rc.uniform(0.9, 1.1),
                    levels=levels, bias=rd.uniform(-0.1, 0.1, 6),
                    scale=float(rd.uniform(4000, 14000)))


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float,
             angle: float = 0.0) -> np.ndarray:
    """Normalised squared radius of an (optionally rotated) ellipse; < 1 inside."""
    c, s = math.cos(angle), math.sin(angle)
    u, v = (x - cx) * c + (y - cy) * s, -(x - cx) * s + (y - cy) * c
    return (u / ax) ** 2 + (v / ay) ** 2


def _linear_taps(n_out: int, factor: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices and weight for linear upsampling by ``factor`` (pixel-centre aligned)."""
    pos = np.clip((np.arange(n_out) + 0.5) / factor - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(np.intp)
    return lo, np.minimum(lo + 1, n_in - 1), (pos - lo).astype(np.float32)


def _upsample(field: np.ndarray, factor: int, h: int, w: int) -> np.ndarray:
    """Bilinear upsampling of a coarse random field by ``factor`` to (h, w), float32.

    Element-wise (no BLAS), so it stays fast and bit-reproducible on any machine.
    """
    field = field.astype(np.float32)
    lo, hi, f = _linear_taps(h, factor, field.shape[0])
    rows = field[lo] * (1 - f)[:, None] + field[hi] * f[:, None]
    lo, hi, f = _linear_taps(w, factor, field.shape[1])
    return rows[:, lo] * (1 - f)[None, :] + rows[:, hi] * f[None, :]


_AR = np.arange(4096, dtype=np.float64)  # pixel indices, sliced by _paint_tube


def _paint_tube(mask: np.ndarray, path: np.ndarray, z: float, spec: ScanSpec) -> None:
    """Paint the slice at height ``z`` (mm) of a tube = union of spheres along ``path`` (N, 4)."""
    near = np.abs(path[:, 2] - z) < path[:, 3]
    sp, h, w = spec.spacing, spec.height, spec.width
    for x, y, zz, r in path[near]:
        rr = math.sqrt(r * r - (zz - z) ** 2) / sp        # disk radius in pixels
        cc, cr = x / sp + w / 2 - 0.5, y / sp + h / 2 - 0.5  # centre in pixel coordinates
        r0, r1 = max(int(cr - rr), 0), min(int(cr + rr) + 2, h)
        c0, c1 = max(int(cc - rr), 0), min(int(cc + rr) + 2, w)
        if r0 >= r1 or c0 >= c1:
            continue
        yy = (_AR[r0:r1] - cr)[:, None]
        xx = (_AR[c0:c1] - cc)[None, :]
        mask[r0:r1, c0:c1] |= yy * yy + xx * xx <= rr * rr


def render_scan(spec: ScanSpec, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Render one scan without writing anything.

    Returns ``image`` uint16 (D, H, W) and ``masks`` uint8 (D, 3, H, W) in {0, 1}, classes in
    the order ``("large_bowel", "small_bowel", "stomach")``; D = ``spec.num_slices``, H, W the
    slice's height and width (a 360_310 scan gives (D, 310, 360)).
    """
    anat = _draw_anatomy(spec, seed)
    rn = np.random.default_rng([seed, spec.case, spec.day, 2])
    h, w, sp, d = spec.height, spec.width, spec.spacing, spec.num_slices
    depth = ANATOMY_DEPTH_MM
    y = ((np.arange(h, dtype=np.float32) + 0.5 - h / 2) * sp)[:, None]  # mm, towards posterior
    x = ((np.arange(w, dtype=np.float32) + 0.5 - w / 2) * sp)[None, :]  # mm, patient's left right
    bx, by, ba, bb = anat.body
    c = anat.bias
    u, v = x / 250.0, y / 250.0
    bias = 1.0 + c[0] * u + c[1] * v + c[2] * u * u + c[3] * v * v + c[4] * u * v + 0.1 * c[5]
    lv = anat.levels
    image = np.empty((d, h, w), np.uint16)
    masks = np.zeros((d, 3, h, w), np.uint8)
    for k in range(d):
        f = k / (d - 1)  # position in the scan, 0 (superior) .. 1 (inferior)
        z = f * depth
        taper = 0.93 + 0.07 * math.sin(math.pi * f)
        body = _ellipse(x, y, bx, by, ba * taper, bb * taper)
        inner = _ellipse(x, y, bx, by, ba * taper - anat.fat, bb * taper - anat.fat)
        img = np.where(body < 1, lv["fat"], lv["air"])
        img = np.where(inner < 1, lv["body"], img)
        # Distractors: liver (image left, upper), kidneys, spine.
        lz = max(0.0, 1.0 - f / 0.6)
        if lz > 0:
            liver = _ellipse(x, y, bx - 0.45 * ba, by - 0.05 * bb,
                             0.42 * ba * anat.liver_scale * math.sqrt(lz), 0.55 * bb * lz + 1)
            img = np.where((liver < 1) & (inner < 1), lv["liver"], img)
        k0, k1 = anat.kidneys
        if k0 < f < k1:
            s = math.sin(math.pi * (f - k0) / (k1 - k0))
            for side in (-1, 1):
                kid = _ellipse(x, y, bx + side * 0.42 * ba, by + 0.42 * bb, 22 * s + 1, 32 * s + 1,
                               side * 0.4)
                img = np.where(kid < 1, lv["kidney"], img)
        spine = _ellipse(x, y, bx, by + 0.62 * bb, 20, 17)
        img = np.where(spine < 1.3, lv["spine_rim"], img)
        img = np.where(spine < 1, lv["spine"], img)

        organ = np.zeros((3, h, w), bool)
        st = anat.stomach
        if st["z"][0] < z < st["z"][1]:
            t = (z - st["z"][0]) / (st["z"][1] - st["z"][0])
            s = math.sin(math.pi * t) ** 0.6
            cx = st["start"][0] + t * (st["end"][0] - st["start"][0])
            cy = st["start"][1] + t * (st["end"][1] - st["start"][1])
            ang = st["angle"][0] + t * (st["angle"][1] - st["angle"][0])
            theta = np.arctan2(y - cy, x - cx)
            ph, amp = st["wobble"], st["wobble_amp"]
            wob = 1 + amp[0] * np.sin(2 * theta + ph[0] + 3 * t) + amp[1] * np.sin(3 * theta
                                                                                    + ph[1])
            organ[2] = _ellipse(x, y, bx + cx, by + cy, st["axes"][0] * s + 1,
                                st["axes"][1] * s + 1, ang) < wob
        colon = anat.colon.copy()
        colon[:, :2] += (bx, by)
        _paint_tube(organ[0], colon, z, spec)
        for loop in anat.small:
            loop = loop.copy()
            loop[:, :2] += (bx, by)
            _paint_tube(organ[1], loop, z, spec)
        organ &= (inner < 1)[None]
        masks[k] = organ

        tex = _upsample(rn.normal(0, 1, (h // 12 + 2, w // 12 + 2)), 12, h, w)
        img = np.where(organ[1], lv["small"] * (1 + 0.08 * np.sin(x / 3.0 + tex)), img)
        img = np.where(organ[0], lv["colon"], img)
        if organ[0].any():  # gas pockets inside the large bowel (still labelled large bowel)
            gas = _upsample(rn.normal(0, 1, (h // 6 + 2, w // 6 + 2)), 6, h, w) > 1.6
            img = np.where(organ[0] & gas, lv["gas"], img)
        img = np.where(organ[2], lv["stomach"], img)
        img = img * (1 + 0.08 * tex) * bias
        img = gaussian_filter(img, 0.7)
        n1, n2 = rn.normal(0, 0.03, (2, h, w)).astype(np.float32)
        img = np.sqrt((img + n1) ** 2 + n2 ** 2)
        image[k] = np.clip(img * anat.scale, 0, 65535).astype(np.uint16)
    return image, masks


# --------------------------------------------------------------------------- writing
def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


CACHE_DIR = ".kvseg_cache"  # the reader's slice cache of this dataset (kept on replacement)


def dataset_files(specs: list[ScanSpec]) -> list[str]:
    """The files :func:`generate` writes for ``specs`` (relative paths), besides its marker."""
    return ["train.csv"] + [
        f"train/case{spec.case}/{spec.scan_id}/scans/{spec.slice_filename(k + 1)}"
        for spec in specs for k in range(spec.num_slices)]


def _own_files(out: Path) -> set[str] | None:
    """The files an earlier :func:`generate` wrote in ``out`` (its marker included), or
    ``None`` if ``out`` holds no marker. Version-1 markers list the scans, not the files."""
    meta = read_manifest(out / MARKER)
    if meta is None:
        return None
    files = meta.get("files")
    if not files:
        try:
            files = dataset_files([ScanSpec(**s) for s in meta.get("scans", [])])
        except TypeError as e:
            raise RunDirError(f"{out / MARKER}: malformed synth marker ({e})") from None
    return set(files) | {MARKER}


def _check_out(out: Path) -> set[str]:
    """The files of an earlier synthetic dataset in ``out`` that may be replaced (empty if
    ``out`` is absent or empty); :class:`~kvseg.errors.RunDirError` for anything else: a file,
    a folder that is not a synth output, or a synth output holding files synth did not write."""
    if not out.exists():
        return set()
    if not out.is_dir():
        raise RunDirError(f"--out {out}: exists and is not a folder")
    first = next(iter(sorted(out.iterdir())), None)
    if first is None:
        return set()
    own = _own_files(out)
    if own is None:
        raise RunDirError(f"--out {out}: folder is not empty and not a kvseg synth dataset (it "
                          f"holds {first.name}); refusing to overwrite it")
    foreign = foreign_entry(out, own, skip=(CACHE_DIR,))
    if foreign is not None:
        raise RunDirError(f"--out {out}: holds {foreign}, which kvseg synth did not write; "
                          "move it out of the folder or choose another --out (synth replaces "
                          "only its own files)")
    return own


def _swap_in(tmp: Path, out: Path, own: set[str]) -> None:
    """Put the finished dataset ``tmp`` at ``out``, replacing the earlier one (``own`` files).

    The old folder is renamed aside, the new one renamed into place, the reader's cache moved
    across (its keys notice the new files), and then only the old dataset's own files are
    deleted; anything else found there (written meanwhile) is left in the renamed folder.
    """
    if not out.exists():
        os.replace(tmp, out)
        return
    if not own:  # an empty folder
        out.rmdir()
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.replace(out, old / "d")
    os.replace(tmp, out)
    if (old / "d" / CACHE_DIR).is_dir():
        os.replace(old / "d" / CACHE_DIR, out / CACHE_DIR)
    remove_files(old / "d", own)
    try:
        (old / "d").rmdir()
        old.rmdir()
    except OSError:
        log.warning("%s: files written during the replacement of %s were kept here", old, out)


#: A lower bound of one slice's PNG on disk (they measure ~105 kB: noise does not compress).
PNG_BYTES = 50_000


def _check_fits(out: Path, cases: int, days: int, slices: int, seed: int) -> None:
    """Refuse, before anything is allocated or written, a seed NumPy cannot take, a dataset
    the disk under ``out`` cannot hold, or a scan larger than this machine's memory."""
    check_number("--seed", seed, integer=True, minimum=0, maximum=MAX_SEED)
    if not all(isinstance(v, int) and v >= 1 for v in (cases, days, slices)):
        return  # scan_layout says what is wrong
    n = cases * days * slices
    folder = next(p for p in (out, *out.absolute().parents) if p.exists())
    free = shutil.disk_usage(folder).free
    if n * PNG_BYTES > free:
        raise ConfigError(f"--cases {cases} --days {days} --slices {slices}: {n} slices need at "
                          f"least {gigabytes(n * PNG_BYTES)} on disk; {folder} has "
                          f"{gigabytes(free)} free")
    scan = slices * max(w * h for w, h, _ in SIZES) * 4 * (1 + len(CLASSES))  # fp32 + masks
    memory = physical_memory()
    if memory is not None and scan > memory:
        raise ConfigError(f"--slices {slices}: one scan needs {gigabytes(scan)} of memory; this "
                          f"machine has {gigabytes(memory)}")


def generate(out: str | os.PathLike, *, cases: int = 8, days: int = 2, slices: int = 32,
             seed: int = 0, progress: bool = False) -> str:
    """Write a synthetic dataset in the exact UW-Madison layout; return a one-line summary.

    The dataset is written into a temporary sibling folder and renamed into place at the end,
    so ``out`` never holds half a dataset. ``out`` must be absent, empty, or an earlier synthetic
    dataset holding only the files synth wrote (listed in its marker) and the reader's
    ``.kvseg_cache``; it is then replaced (the cache is kept). Any other file in ``out`` is a
    :class:`~kvseg.errors.RunDirError` naming it, and nothing is deleted.
    ``generate(out, cases=2, days=1, slices=8)`` makes a tiny one for tests (~16 slices, well
    under a second).
    """
    t0 = time.perf_counter()
    out = Path(out)
    _check_fits(out, cases, days, slices, seed)
    specs = scan_layout(cases, days, slices, seed)
    own = _check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    rows = ["id,class,segmentation"]
    n_empty = n_total = 0
    sizes: dict[str, int] = {}
    try:
        it = specs
        if progress:
            it = tqdm(specs, desc="synth", unit="scan")
        for spec in it:
            image, masks = render_scan(spec, seed)
            folder = tmp / "train" / f"case{spec.case}" / spec.scan_id / "scans"
            folder.mkdir(parents=True)
            for k in range(spec.num_slices):
                (folder / spec.slice_filename(k + 1)).write_bytes(_png_bytes(image[k]))
                sid = slice_id(spec.case, spec.day, k + 1)
                for c, name in enumerate(CLASSES):
                    rows.append(f"{sid},{name},{rle_encode(masks[k, c])}")
                n_empty += int(not masks[k].any())
                n_total += 1
            key = f"{spec.width}_{spec.height}"
            sizes[key] = sizes.get(key, 0) + spec.num_slices
        (tmp / "train.csv").write_text("\n".join(rows) + "\n")
        write_manifest(tmp / MARKER, dataset_files(specs), generator="kvseg.data.synth",
                       version=2, seed=seed, cases=cases, days=days, slices=slices,
                       scans=[asdict(s) for s in specs])
        _swap_in(tmp, out, own)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    size_txt = ", ".join(f"{k}: {v}" for k, v in sorted(sizes.items()))
    return (f"wrote {cases} cases, {len(specs)} scans, {n_total} slices ({size_txt}) to {out}; "
            f"{100 * n_empty / n_total:.0f}% of slices empty; "
            f"{time.perf_counter() - t0:.1f} s")
