"""Tiny generated datasets in the folder and volume layouts (imported by the data and e2e tests).

Every image holds bright discs; the masks are exactly those discs, so what a reader decodes can
be compared with what was drawn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from PIL import Image


def discs(shape: tuple[int, int], k: int, seed: int) -> np.ndarray:
    """A label map (H, W) uint8 with one disc per class 1..k (later classes on top)."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    labels = np.zeros(shape, np.uint8)
    for c in range(1, k + 1):
        cy, cx = rng.uniform(0.25, 0.75) * h, rng.uniform(0.25, 0.75) * w
        r = rng.uniform(0.12, 0.22) * min(h, w)
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = c
    return labels


def _image(labels: np.ndarray, seed: int, rgb: bool, bits: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 1000)
    top = 255 if bits == 8 else 4000
    x = labels.astype(np.float64) * top / (labels.max() + 1) + rng.uniform(0, top * 0.2,
                                                                             labels.shape)
    x = np.clip(x, 0, top)
    if rgb:
        return np.stack([x, x * 0.6, 255 - x], axis=-1).astype(np.uint8)
    return x.astype(np.uint8 if bits == 8 else np.uint16)


def write_folder(root: Path, *, n: int = 6, k: int = 1, shape=(20, 24), suffix: str = ".png",
                 rgb: bool = False, bits: int = 8, per_class: bool = False,
                 binary_255: bool = False, spec: dict | None = None,
                 names: list[str] | None = None) -> Path:
    """``root/images`` + ``root/masks`` with ``n`` images of ``k`` classes.

    Label masks (``masks/NAME.png``, value = class) unless ``per_class``
    (``masks/class_c/NAME.png``, 0/255); ``binary_255`` writes a one-class label mask as 0/255.
    ``spec`` is written as ``dataset.yaml``. Returns ``root``.
    """
    names = names or [f"img{i:02d}" for i in range(n)]
    for i, name in enumerate(names):
        labels = discs(shape, k, i)
        img = _image(labels, i, rgb, bits)
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / "images" / f"{name}{suffix}")
        if per_class:
            for c in range(1, k + 1):
                path = root / "masks" / f"class_{c}" / f"{name}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(((labels == c) * 255).astype(np.uint8)).save(path)
        else:
            (root / "masks").mkdir(parents=True, exist_ok=True)
            mask = (labels > 0) * 255 if binary_255 else labels
            Image.fromarray(mask.astype(np.uint8)).save(root / "masks" / f"{name}.png")
    if spec is not None:
        (root / "dataset.yaml").write_text(yaml.safe_dump(spec))
    return root


def _nifti(path: Path, data: np.ndarray, zooms=(0.8, 0.7, 2.5)) -> None:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, np.diag([*zooms, 1.0]))
    img.header.set_zooms((*zooms, *([1.0] * (data.ndim - 3))))
    nib.save(img, str(path))


def volume(shape=(24, 20, 6), values=(1, 2), seed: int = 0, hu: bool = False):
    """``(image (X, Y, Z) float32, labels (X, Y, Z) int16)``: a disc of each label value per
    slice, drifting across slices."""
    x, y, z = shape
    labels = np.zeros(shape, np.int16)
    for k in range(z):
        lab = discs((x, y), len(values), seed * 100 + k)
        for i, v in enumerate(values, start=1):
            labels[..., k][lab == i] = v
    rng = np.random.default_rng(seed)
    base = -900.0 if hu else 0.0
    image = base + labels.astype(np.float32) * (60 if hu else 300) + rng.normal(0, 20, shape)
    return image.astype(np.float32), labels


def write_synapse(root: Path, cases=(1, 2, 3), shape=(24, 20, 6)) -> Path:
    """Synapse raw layout: ``img/img000N.nii.gz`` + ``label/label000N.nii.gz`` (BTCV values
    1..13 drawn: spleen 1, kidneys 2/3, esophagus 5 (not a TransUNet class), liver 6)."""
    for n in cases:
        image, labels = volume(shape, values=(1, 2, 3, 5, 6), seed=n, hu=True)
        _nifti(root / "img" / f"img{n:04d}.nii.gz", image)
        _nifti(root / "label" / f"label{n:04d}.nii.gz", labels)
    return root


def write_acdc(root: Path, patients=(1, 2, 3), shape=(20, 18, 5)) -> Path:
    """ACDC layout: ``patientXXX/patientXXX_frame01.nii.gz`` + ``_gt`` (and frame 12), plus a
    ``_4d`` file that must be ignored."""
    for p in patients:
        folder = root / f"patient{p:03d}"
        for frame in (1, 12):
            image, labels = volume(shape, values=(1, 2, 3), seed=p * 10 + frame)
            _nifti(folder / f"patient{p:03d}_frame{frame:02d}.nii.gz", image, (1.5, 1.5, 10.0))
            _nifti(folder / f"patient{p:03d}_frame{frame:02d}_gt.nii.gz", labels.astype(np.uint8),
                   (1.5, 1.5, 10.0))
        _nifti(folder / f"patient{p:03d}_4d.nii.gz", np.zeros((*shape, 2), np.float32))
    return root
