"""Volume layouts: the Synapse multi-organ CT set, ACDC cardiac MRI, the Decathlon layout, and a
plain ``images/`` + ``masks/`` folder of NIfTI volumes. Each finds its image / label pairs and
brings its defaults (:class:`~kvseg.data.spec.DatasetSpec`), which ``dataset.yaml`` overrides.

Synapse (Multi-Atlas Labeling Beyond the Cranial Vault, the BTCV abdomen CT set, 30 labelled
scans), as downloaded: ``img/img0001.nii.gz`` + ``label/label0001.nii.gz`` (also found under
``Training/`` or ``RawData/Training/``), or repackaged in the Decathlon layout
(``imagesTr/img0001.nii.gz`` + ``labelsTr/label0001.nii.gz``). The label volumes hold 13 organs
(1 spleen, 2 right kidney, 3 left kidney, 4 gallbladder, 5 esophagus, 6 liver, 7 stomach,
8 aorta, 9 inferior vena cava, 10 portal and splenic vein, 11 pancreas, 12 right adrenal,
13 left adrenal); like TransUNet, kvseg keeps 8 (aorta, gallbladder, left and right kidney,
liver, pancreas, spleen, stomach; the other five read as background), windows the CT at
[-125, 275] HU, and validates on TransUNet's 12 test cases (``lists_Synapse/test_vol.txt``:
0001-0004, 0008, 0022, 0025, 0029, 0032, 0035, 0036, 0038) when they are all present.

ACDC (Automated Cardiac Diagnosis Challenge, cine MRI): ``patientXXX/patientXXX_frameYY.nii.gz``
+ ``patientXXX_frameYY_gt.nii.gz`` (the end-diastolic and end-systolic frames; ``_4d`` files are
ignored), the folder itself or its ``training/``. Labels 1 right ventricle (``rv``),
2 myocardium (``myo``), 3 left ventricle (``lv``); both frames of a patient stay in one fold.

Decathlon (MSD) / nnU-Net: ``imagesTr/NAME.nii.gz`` (or ``NAME_0000.nii.gz``) +
``labelsTr/NAME.nii.gz``; class names from ``dataset.json``'s ``labels``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path

from kvseg.data.folder import MissingMaskError, warn_other_files
from kvseg.data.nifti import NiftiDataset, VolumePair, is_nifti, nifti_files, nifti_stem
from kvseg.data.spec import DatasetSpec, read_spec
from kvseg.errors import ConfigError, DataError

log = logging.getLogger(__name__)

#: Label values of the Synapse (BTCV) label volumes.
SYNAPSE_LABELS = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "gallbladder": 4,
                  "esophagus": 5, "liver": 6, "stomach": 7, "aorta": 8,
                  "inferior_vena_cava": 9, "portal_splenic_vein": 10, "pancreas": 11,
                  "adrenal_right": 12, "adrenal_left": 13}
#: TransUNet's 8 organs, in its class order.
TRANSUNET_ORGANS = ("aorta", "gallbladder", "kidney_left", "kidney_right", "liver", "pancreas",
                    "spleen", "stomach")
SYNAPSE = DatasetSpec(
    classes=TRANSUNET_ORGANS, values=tuple((SYNAPSE_LABELS[c],) for c in TRANSUNET_ORGANS),
    background_labels=tuple(v for c, v in SYNAPSE_LABELS.items() if c not in TRANSUNET_ORGANS),
    window=(-125.0, 275.0), split="transunet", source="the synapse layout")
ACDC = DatasetSpec(classes=("rv", "myo", "lv"), group=r"^(patient\d+)", source="the acdc layout")
#: Named splits a dataset.yaml (or a layout) may ask for.
NAMED_SPLITS = {"transunet": {"val": [f"img{n:04d}" for n in
                                      (1, 2, 3, 4, 8, 22, 25, 29, 32, 35, 36, 38)]}}


# --------------------------------------------------------------------------- finding
def _first(candidates: list[Path], ok) -> Path | None:
    return next((c for c in candidates if c.is_dir() and ok(c)), None)


def synapse_base(root: Path) -> Path | None:
    """The folder holding ``img/`` and ``label/`` of the Synapse download, if any."""
    return _first([root, root / "Training", root / "RawData" / "Training"],
                  lambda b: (b / "img").is_dir() and (b / "label").is_dir()
                  and any(p.name.startswith("img") for p in nifti_files(b / "img")))


def acdc_base(root: Path) -> Path | None:
    """The folder holding ACDC's ``patientXXX/`` folders with ground truth, if any."""
    return _first([root, root / "training", root / "database" / "training"],
                  lambda b: any(b.glob("patient*/patient*_frame*_gt.nii*")))


def is_msd(root: Path) -> bool:
    return ((root / "imagesTr").is_dir() and (root / "labelsTr").is_dir()
            and bool(nifti_files(root / "imagesTr")))


def is_volume_folder(root: Path) -> bool:
    return ((root / "images").is_dir() and (root / "masks").is_dir()
            and bool(nifti_files(root / "images")))


# --------------------------------------------------------------------------- pairs
def _match(images_dir: Path, labels_dir: Path, key) -> list[VolumePair]:
    """Pair the volumes of ``images_dir`` with those of ``labels_dir`` by ``key``; an image
    without a label volume (or the other way round) is an error, other files a warning."""
    images, labels = nifti_files(images_dir), nifti_files(labels_dir)
    warn_other_files(images_dir, images, "NIfTI volumes")
    warn_other_files(labels_dir, labels, "NIfTI volumes")
    by_key = {key(p): p for p in labels}
    pairs = []
    for img in images:
        label = by_key.pop(key(img), None)
        if label is None:
            raise MissingMaskError(f"{img}: no label volume for this image in {labels_dir}")
        vid = re.sub(r"_0000$", "", nifti_stem(img))
        pairs.append(VolumePair(vid, img, label, vid))
    if by_key:
        raise MissingMaskError(f"{next(iter(by_key.values()))}: label volume without an image")
    return pairs


def _key(path: Path) -> str:
    return re.sub(r"^(img|image|label)", "", re.sub(r"_0000$", "", nifti_stem(path)))


def synapse_pairs(base: Path) -> list[VolumePair]:
    return _match(base / "img", base / "label", _key)


def msd_pairs(root: Path) -> list[VolumePair]:
    return _match(root / "imagesTr", root / "labelsTr", _key)


def folder_pairs(root: Path) -> list[VolumePair]:
    return _match(root / "images", root / "masks", nifti_stem)


def acdc_pairs(base: Path) -> list[VolumePair]:
    """Every frame with its ground truth; a frame without one (``patientXXX_frameYY.nii.gz``
    and no ``_gt``) is an error naming it (the ``_4d`` series is not a frame)."""
    for frame in acdc_images(base):
        vid = nifti_stem(frame)
        if vid.endswith("_4d") or re.search(r"_frame\d+$", vid) is None:
            continue
        if not any(frame.with_name(f"{vid}_gt{s}").is_file() for s in (".nii.gz", ".nii")):
            raise MissingMaskError(f"{frame}: no ground truth for this frame (expected "
                                   f"{frame.with_name(vid + '_gt.nii.gz')})")
    pairs = []
    for gt in sorted(base.glob("patient*/patient*_frame*_gt.nii*")):
        vid = nifti_stem(gt)[: -len("_gt")]
        image = next((gt.with_name(vid + s) for s in (".nii.gz", ".nii")
                      if gt.with_name(vid + s).is_file()), None)
        if image is None:
            raise MissingMaskError(f"{gt}: ground truth without its frame {vid}.nii.gz")
        pairs.append(VolumePair(vid, image, gt, gt.parent.name))
    return pairs


def acdc_images(base: Path) -> list[Path]:
    """ACDC frames (no ground truth, no 4D files), for prediction."""
    return sorted(p for p in base.glob("patient*/patient*_frame*.nii*")
                  if is_nifti(p) and not nifti_stem(p).endswith("_gt"))


def msd_spec(root: Path) -> DatasetSpec:
    """Class names and values from ``dataset.json``'s ``labels`` (MSD ``{"1": "spleen"}`` or
    nnU-Net v2 ``{"spleen": 1}``); the Synapse defaults for ``img0001``-named volumes."""
    if all(re.fullmatch(r"img\d{4}", p.id) for p in msd_pairs(root)):
        return SYNAPSE
    path = root / "dataset.json"
    if not path.is_file():
        return DatasetSpec(source=str(root))
    try:
        labels = json.loads(path.read_text(encoding="utf-8"))["labels"]
        pairs = [(int(k), v) if str(k).isdigit() else (int(v), k) for k, v in labels.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"{path}: cannot read the class names ('labels': ...): {e}") from None
    named = [(v, str(n)) for v, n in sorted(pairs) if v != 0]
    return DatasetSpec(classes=tuple(n for _, n in named), values=tuple((v,) for v, _ in named),
                       source=str(path))


# --------------------------------------------------------------------------- build
def build_volumes(root: Path, pairs: list[VolumePair], base: DatasetSpec, o) -> NiftiDataset:
    """The dataset of ``pairs`` with ``base`` overridden by ``root/dataset.yaml``; ``o`` is the
    :class:`~kvseg.data.factory.DataOptions`."""
    spec = read_spec(root, base)
    if isinstance(spec.split, str):
        named = NAMED_SPLITS.get(spec.split)
        if named is None:
            raise ConfigError(f"{spec.source}: split {spec.split!r}: expected lists or one of "
                              f"{', '.join(NAMED_SPLITS)}")
        missing = sorted(set(named["val"]) - {p.id for p in pairs})
        if missing:
            log.warning("%s: split %s needs %s (not present); using folds instead", root,
                        spec.split, ", ".join(missing))
        spec = dataclasses.replace(spec, split=None if missing else named)
    if spec.group is not None:
        pairs = [dataclasses.replace(p, group=spec.group_of(p.id)) for p in pairs]
    return NiftiDataset(root, pairs, spec=spec, task=o.task, split=o.split, fold=o.fold,
                        n_folds=o.n_folds, img_size=o.img_size, context=o.context,
                        augment=o.augment, cache=o.cache, cache_dir=o.cache_dir,
                        exclude=[str(e) for e in o.exclude])


def build_synapse(o) -> NiftiDataset:
    base = synapse_base(o.data)
    if base is None:
        raise DataError(f"{o.data}: no Synapse layout (img/img*.nii.gz and label/)")
    return build_volumes(o.data, synapse_pairs(base), SYNAPSE, o)


def build_acdc(o) -> NiftiDataset:
    base = acdc_base(o.data)
    if base is None:
        raise DataError(f"{o.data}: no ACDC layout (patient*/patient*_frame*_gt.nii.gz)")
    return build_volumes(o.data, acdc_pairs(base), ACDC, o)


def build_msd(o) -> NiftiDataset:
    if not is_msd(o.data):
        raise DataError(f"{o.data}: no Decathlon layout (imagesTr/*.nii.gz and labelsTr/)")
    return build_volumes(o.data, msd_pairs(o.data), msd_spec(o.data), o)


def images_of(root: os.PathLike) -> list[Path]:
    """The image volumes of a volume layout (test images first, as for UW-Madison)."""
    root = Path(root)
    if is_msd(root):
        test = root / "imagesTs"
        return nifti_files(test) if test.is_dir() and nifti_files(test) else \
            nifti_files(root / "imagesTr")
    base = synapse_base(root)
    if base is not None:
        return nifti_files(base / "img")
    base = acdc_base(root)
    return acdc_images(base) if base is not None else []


__all__ = ["ACDC", "NAMED_SPLITS", "SYNAPSE", "SYNAPSE_LABELS", "TRANSUNET_ORGANS", "acdc_base",
           "acdc_pairs", "build_acdc", "build_msd", "build_synapse", "build_volumes",
           "folder_pairs", "images_of", "is_msd", "is_volume_folder", "msd_pairs", "msd_spec",
           "synapse_base", "synapse_pairs"]
