"""3D volumes (NIfTI, ``.nii`` / ``.nii.gz``, read with nibabel) as 2D slice datasets.

A volume is sliced along its **third voxel axis as stored** (the acquisition's slice axis: axial
for the Synapse CT scans, short-axis for ACDC); nothing is reoriented, so predictions map back
onto the input's voxel grid exactly. Slice ``k`` is ``data[:, :, k]``: its rows run along the
first voxel axis, its columns along the second (a PNG of it may look transposed next to a
viewer's radiological display). ``voxel_mm`` is ``(zooms[2], zooms[0], zooms[1])`` from the
header: the slice spacing and the pixel size, carried into HD95.

Intensities: a fixed window (``window: [-125, 275]`` in ``dataset.yaml``, Hounsfield units for
CT) or, without one, the percentile normalisation of every slice
(:func:`kvseg.data.transforms.prepare_slices`); 2.5D context stacks neighbouring slices of the
same volume (:mod:`kvseg.data.context`). Label volumes hold class values
(:func:`kvseg.data.spec.to_class_index`). Splits group volumes (a patient's volumes stay
together when the layout or ``group`` says which volumes are one patient's).

Errors (one line naming the file): an unreadable or truncated file, a volume that is not 3D, a
label volume of another shape than its image, a label value that is not a class.
"""

from __future__ import annotations

import gzip
import logging
import os
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from kvseg.data.slices import SliceRef, SliceSet, encode_mask
from kvseg.data.spec import DatasetSpec, resolve_task, to_class_index
from kvseg.data.transforms import prepare_slices
from kvseg.errors import DataError
from kvseg.utils import atomic_write_bytes

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def is_nifti(path: str | os.PathLike) -> bool:
    """Whether ``path`` is named like a NIfTI file (``.nii`` or ``.nii.gz``)."""
    name = Path(path).name.lower()
    return name.endswith(NIFTI_SUFFIXES) and not name.startswith(".")


def nifti_stem(path: str | os.PathLike) -> str:
    """The name without ``.nii.gz`` / ``.nii``."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def nifti_files(folder: Path) -> list[Path]:
    """The NIfTI files directly in ``folder``, sorted (macOS ``._`` files skipped)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and is_nifti(p))


@dataclass(frozen=True)
class VolumePair:
    """An image volume, its label volume (``None``: unlabelled) and its split group."""

    id: str
    image: Path
    label: Path | None
    group: str


def _load(path: Path):
    import nibabel as nib

    if not path.is_file():
        raise FileNotFoundError(f"{path}: volume file not found")
    try:
        return nib.load(str(path))
    except Exception as e:  # nibabel raises ImageFileError, OSError, EOFError, zlib.error...
        raise DataError(f"{path}: unreadable NIfTI file ({type(e).__name__}: {e})") from None


def _load_checked(path: Path):
    """The image with its data in memory; a ``.nii.gz`` is decompressed whole first, so a
    corrupt file fails its gzip checksum here (nibabel reads only the bytes it needs and never
    reaches the checksum: a flipped byte gave silently wrong voxels)."""
    import nibabel as nib

    if not path.name.lower().endswith(".gz"):
        return _load(path)
    try:
        data = gzip.decompress(path.read_bytes())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: volume file not found") from None
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: unreadable NIfTI file: corrupt gzip data ({e}); the file is "
                        "damaged or truncated: download or copy it again") from None
    size = int.from_bytes(data[:4], "little") if len(data) >= 4 else 0
    if size not in (348, 540):
        size = int.from_bytes(data[:4], "big") if len(data) >= 4 else 0
    klass = {348: nib.Nifti1Image, 540: nib.Nifti2Image}.get(size)
    if klass is None:
        raise DataError(f"{path}: unreadable NIfTI file (no NIfTI-1 or NIfTI-2 header inside "
                        "the gzip data)")
    try:
        return klass.from_bytes(data)
    except Exception as e:  # nibabel's HeaderDataError, ValueError...
        raise DataError(f"{path}: unreadable NIfTI file ({type(e).__name__}: {e})") from None


def volume_affine(path: Path) -> np.ndarray:
    """The voxel-to-world affine (4, 4) from the header."""
    return np.asarray(_load(path).affine, np.float64)


def volume_header(path: Path) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """``(shape (X, Y, Z), voxel_mm (slice, row, col))`` from the header alone."""
    img = _load(path)
    shape = tuple(int(n) for n in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise DataError(f"{path}: a {len(shape)}D volume of shape {shape}; kvseg reads 3D "
                        "volumes (one channel)")
    z = [float(v) for v in img.header.get_zooms()[:3]]
    return shape, (z[2], z[0], z[1])


def read_volume(path: Path, dtype=np.float32) -> np.ndarray:
    """The voxels as (D, H, W) (slices first, see the module docstring), scaled by the header's
    slope and intercept, as ``dtype`` (``None``: as stored); a truncated or corrupt file is a
    :class:`DataError` naming it (a ``.nii.gz`` whose gzip checksum fails: "corrupt")."""
    img = _load_checked(path)
    try:
        data = np.asanyarray(img.dataobj)
    except (OSError, EOFError, ValueError, zlib.error) as e:
        raise DataError(f"{path}: unreadable NIfTI data ({type(e).__name__}: {e})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{path}: a {data.ndim}D volume; kvseg reads 3D volumes")
    data = np.ascontiguousarray(data.transpose(2, 0, 1))
    return data if dtype is None else data.astype(dtype, copy=False)


def write_label_volume(path: Path, labels: np.ndarray, like: Path) -> None:
    """Write class indices (D, H, W) as a uint8 NIfTI on the voxel grid of the volume ``like``
    (its affine and header), atomically; ``.nii.gz`` is gzip-compressed."""
    import nibabel as nib

    ref = _load(like)
    img = nib.Nifti1Image(np.ascontiguousarray(labels.transpose(1, 2, 0)).astype(np.uint8),
                          ref.affine, header=ref.header)
    img.set_data_dtype(np.uint8)
    img.header.set_slope_inter(1, 0)
    data = img.to_bytes()
    atomic_write_bytes(path, gzip.compress(data, 6) if path.name.endswith(".gz") else data)


class NiftiDataset(SliceSet):
    """The slices of image + label volume pairs (see the module docstring).

    Args:
        root: the dataset folder (for the cache and messages).
        pairs: the volumes, with their label volumes and groups.
        spec: classes, label values, window, split (``classes`` ``None``: ``class_1..class_K``
            from the largest label value, every label volume read once).
        task: ``auto`` (multi-class: label volumes are exclusive; one class: multi-label),
            ``multiclass`` or ``multilabel``.
        split, fold, n_folds, img_size, context, augment, cache, cache_dir, exclude: as in
            :class:`~kvseg.data.slices.SliceSet`.
    """

    def __init__(self, root: str | os.PathLike, pairs: Sequence[VolumePair], *,
                 spec: DatasetSpec, task: str = "auto", split: str = "all", fold: int = 0,
                 n_folds: int = 5, img_size: int = 256, context: int = 0, augment: bool = False,
                 cache: bool = True, cache_dir: str | os.PathLike | None = None,
                 exclude: Sequence[str] = ()) -> None:
        if not pairs:
            raise DataError(f"{root}: no volumes")
        if spec.channels == 3:
            raise DataError(f"{spec.source}: channels: 3 is for colour images, not volumes")
        self.pairs = sorted(pairs, key=lambda p: p.id)
        if spec.classes is None:
            spec = _with_inferred_classes(spec, self.pairs, Path(root))
        task = resolve_task(spec, task, True, str(root))
        self.spec = spec
        records, blocks = self._records()
        files = [str(f) for p in self.pairs for f in (p.image, p.label) if f is not None]
        super().__init__(root, records, blocks, spec=spec, classes=spec.classes, task=task,
                         in_channels=1, preprocess={"channels": 1, "window": spec.window},
                         split=split, fold=fold, n_folds=n_folds, img_size=img_size,
                         context=context, augment=augment, cache=cache, cache_dir=cache_dir,
                         exclude=exclude, key_files=files,
                         salt={"values": spec.label_values(), "window": spec.window,
                               "background": spec.background_labels})

    def _records(self) -> tuple[list[SliceRef], list[tuple[int, int]]]:
        records: list[SliceRef] = []
        blocks = []
        for p in self.pairs:
            shape, voxel = volume_header(p.image)
            if p.label is not None:
                _check_same_grid(p.image, p.label, shape)
            start = len(records)
            records += [SliceRef(f"{p.id}_slice{k:04d}", p.id, p.group, k, shape[0], shape[1],
                                 voxel, str(p.image)) for k in range(shape[2])]
            blocks.append((start, len(records)))
        return records, blocks

    def _labels(self, b: int) -> np.ndarray | None:
        label = self.pairs[b].label
        if label is None:
            return None
        return to_class_index(read_volume(label, None), self.spec, label)

    def _prepare_block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        pair = self.pairs[b]
        volume = read_volume(pair.image)
        labels = self._labels(b)
        s, k = self.img_size, len(self.classes)
        images = np.empty((len(volume), s, s), np.uint16)
        masks = np.zeros((len(volume), s, s), self._dtype)
        for z, plane in enumerate(volume):
            try:
                x = prepare_slices(plane[None], s, window=self.spec.window)[0]
            except DataError as e:
                raise DataError(f"{pair.image}: slice {z}: {e}") from None
            images[z] = torch.round(x * 65535).to(torch.int32).numpy().astype(np.uint16)
            if labels is not None:
                masks[z] = encode_mask(labels[z], None, self.task, k, s)
        return images, masks

    def full_mask(self, key: int | str) -> np.ndarray:
        """Ground truth of a slice at original size: uint8 (K, height, width) in {0, 1}."""
        ref = self._ref(key)
        labels = self._labels(int(self._block_of[ref.index]))
        if labels is None:
            raise DataError(f"{ref.path}: no label volume")
        return (np.arange(1, len(self.classes) + 1)[:, None, None]
                == labels[ref.slice][None]).astype(np.uint8)


#: Largest difference (mm) between an image's and its label volume's affine entries.
AFFINE_TOLERANCE_MM = 1e-3


def _check_same_grid(image: Path, label: Path, shape: tuple[int, int, int]) -> None:
    """A label volume must lie on its image's voxel grid: same shape, and the same affine
    within :data:`AFFINE_TOLERANCE_MM` (a label drawn on another grid would be misplaced)."""
    label_shape = volume_header(label)[0]
    if label_shape != shape:
        raise DataError(f"{label}: label volume of shape {label_shape} but image {image} is "
                        f"{shape}")
    a, b = volume_affine(image), volume_affine(label)
    diff = float(np.abs(a - b).max())
    if not diff <= AFFINE_TOLERANCE_MM + 1e-5 * float(np.abs(a).max()):
        raise DataError(f"{label}: its affine differs from its image's {image} by up to "
                        f"{diff:.4g} mm (tolerance {AFFINE_TOLERANCE_MM} mm): the labels lie on "
                        "another voxel grid; resample them onto the image's grid")


def _with_inferred_classes(spec: DatasetSpec, pairs: Sequence[VolumePair],
                           root: Path) -> DatasetSpec:
    background = set(spec.background_labels)

    def top(p: VolumePair) -> int:
        if p.label is None:
            return 0
        values = set(np.unique(read_volume(p.label, None)).tolist()) - background
        return int(max(values, default=0))

    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
        k = max(pool.map(top, pairs), default=0)
    if k <= 0:
        raise DataError(f"{root}: every label volume is empty (only 0"
                        f"{', and background_labels' if background else ''}): there is no class "
                        "to learn; name the classes in dataset.yaml if that is what you mean")
    if k > 254:
        raise DataError(f"{root}: label values up to {k}; name the classes in dataset.yaml")
    log.info("%s: no class names (dataset.yaml): %d class(es) from the label volumes", root, k)
    return replace(spec, classes=tuple(f"class_{i}" for i in range(1, k + 1)))


__all__ = ["AFFINE_TOLERANCE_MM", "NIFTI_SUFFIXES", "NiftiDataset", "VolumePair", "is_nifti",
           "nifti_files", "nifti_stem", "read_volume", "volume_affine", "volume_header",
           "write_label_volume"]
