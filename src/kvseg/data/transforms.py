"""Preprocessing shared by training and prediction, the inverse resize, and augmentation.

``prepare_slices`` is the ONE preprocessing: the dataset (and its cache) and ``kvseg predict``
both call it, so a model sees the same numbers at training and at inference time.

1. per slice (per channel): ``x = clip((x - p_low) / (p_high - p_low), 0, 1)`` with the 0.5th
   and 99.5th intensity percentiles of that slice at its original resolution (robust to the few
   very bright pixels of MRI; a constant slice becomes all zeros). Two variants, chosen by the
   dataset: ``window=(lo, hi)`` uses a fixed intensity window instead of the percentiles (CT in
   Hounsfield units, e.g. ``(-125, 275)``), and ``joint=True`` takes the percentiles over all
   channels together (an RGB image keeps its colour balance);
2. resize to ``img_size × img_size`` with bilinear interpolation (``align_corners=False``,
   antialiased when shrinking). Non-square slices (360×310) are stretched to the square; the
   inverse :func:`resize_to_original` undoes it for the masks.

Augmentation (training only) is done in torch on the prepared tensors, with the global torch
RNG, so a seeded DataLoader (its per-worker seeds derive from the torch seed) is deterministic.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from kvseg.errors import DataError

P_LOW, P_HIGH = 0.5, 99.5


def normalize_slices(stack: np.ndarray | torch.Tensor, *,
                     window: tuple[float, float] | None = None,
                     joint: bool = False) -> torch.Tensor:
    """Percentile-normalise each channel of a (C, H, W) stack to [0, 1] (float32).

    Args:
        stack: raw intensities (C, H, W).
        window: ``(lo, hi)``: ``clip((x - lo) / (hi - lo), 0, 1)`` instead of the percentiles
            (a CT window in Hounsfield units).
        joint: one pair of percentiles over all channels (RGB), not one per channel.

    Raises :class:`~kvseg.errors.DataError` if a pixel is NaN or infinite (one such pixel would
    make the percentiles NaN and the whole slice zeros); callers put the file name in front.
    """
    arr = stack.float().cpu().numpy() if torch.is_tensor(stack) else np.asarray(stack, np.float32)
    if arr.ndim != 3:
        raise ValueError(f"expected a (C, H, W) stack, got shape {tuple(arr.shape)}")
    finite = np.isfinite(arr)
    if not finite.all():
        bad = (~finite).reshape(arr.shape[0], -1).sum(axis=1)
        c = int(np.flatnonzero(bad)[0])
        where = f" in channel {c}" if arr.shape[0] > 1 else ""
        raise DataError(f"{int(bad[c])} non-finite pixel value(s) (NaN or inf){where}; expected "
                        "finite intensities")
    c = arr.shape[0]
    if window is not None:
        q = np.array([[float(window[0])] * c, [float(window[1])] * c])
    elif joint:
        q = np.repeat(np.percentile(arr, (P_LOW, P_HIGH))[:, None], c, axis=1)
    else:  # numpy's partition-based percentile is ~4x faster than torch.quantile's sort
        q = np.percentile(arr.reshape(c, -1), (P_LOW, P_HIGH), axis=1)
    x = torch.from_numpy(np.ascontiguousarray(arr))
    lo, hi = (torch.from_numpy(v.astype(np.float32)) for v in q)  # each (C,)
    scale = hi - lo
    ok = scale > 1e-6
    out = (x - lo[:, None, None]) / torch.where(ok, scale, torch.ones_like(scale))[:, None, None]
    out = out.clamp_(0.0, 1.0)
    out[~ok] = 0.0
    return out


def _resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear resize of (C, h, w) float to (C, height, width); antialiased when shrinking."""
    if x.shape[-2:] == (height, width):
        return x.clone()
    shrink = height < x.shape[-2] or width < x.shape[-1]
    return F.interpolate(x[None], size=(height, width), mode="bilinear", align_corners=False,
                         antialias=shrink)[0]


def prepare_slices(stack: np.ndarray, img_size: int, *,
                   window: tuple[float, float] | None = None,
                   joint: bool = False) -> torch.Tensor:
    """Raw slices (C, H, W) (any numeric dtype, e.g. uint16) -> float32 (C, img_size, img_size).

    Per-slice percentile normalisation to [0, 1] (or a fixed ``window``; ``joint`` percentiles
    for RGB: :func:`normalize_slices`), then bilinear resize to a square (see module docstring).
    Used by the dataset and by prediction alike. A NaN or infinite pixel is a
    :class:`~kvseg.errors.DataError` (:func:`normalize_slices`).
    """
    if int(img_size) < 1:
        raise ValueError(f"img_size must be positive, got {img_size}")
    x = normalize_slices(stack, window=window, joint=joint)
    return _resize(x, int(img_size), int(img_size)).clamp_(0.0, 1.0)


def resize_mask(mask: np.ndarray | torch.Tensor, img_size: int) -> torch.Tensor:
    """Full-resolution 0/1 masks (K, H, W) -> float32 (K, img_size, img_size) in {0, 1}.

    The same bilinear (antialiased) resampling as the image, then a 0.5 threshold, so image and
    mask stay aligned (both use pixel-centre coordinates).
    """
    m = torch.as_tensor(np.asarray(mask, dtype=np.float32) if not torch.is_tensor(mask)
                        else mask.float())
    return (_resize(m, int(img_size), int(img_size)) >= 0.5).float()


def resize_labels(labels: np.ndarray, num_labels: int, img_size: int) -> np.ndarray:
    """A label map (H, W) with values 0..num_labels-1 -> uint8 (img_size, img_size).

    The one-hot planes go through the image's resampling (:func:`resize_mask`'s geometry) and
    the most likely label wins, so the labels stay exclusive (no pixel gets two classes or none).
    """
    onehot = np.arange(num_labels, dtype=np.int64)[:, None, None] == np.asarray(labels)[None]
    planes = _resize(torch.from_numpy(onehot.astype(np.float32)), int(img_size), int(img_size))
    return planes.argmax(0).to(torch.uint8).numpy()


def resize_to_original(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Map a (C, S, S) prediction back to the slice's original (C, height, width) pixels.

    Float input (probabilities / logits) is resized bilinearly (``align_corners=False``, the
    inverse of :func:`prepare_slices`' geometry); threshold afterwards. Bool / integer masks are
    resized the same way and thresholded at 0.5, keeping their dtype.
    """
    if x.ndim != 3:
        raise ValueError(f"expected a (C, S, S) tensor, got shape {tuple(x.shape)}")
    if x.is_floating_point():
        return _resize(x, int(height), int(width))
    out = _resize(x.float(), int(height), int(width)) >= 0.5
    return out.to(x.dtype)


# --------------------------------------------------------------------------- augmentation
def random_affine(max_rotate: float = 10.0, max_scale: float = 0.1, max_shift: float = 0.06,
                  hflip_p: float = 0.5, vflip_p: float = 0.0) -> torch.Tensor:
    """Draw a 2×3 affine matrix in normalised coordinates from the global torch RNG.

    Rotation in degrees, relative scale and shift (fraction of the half-size), random flips.
    """
    r = torch.rand(6)
    angle = math.radians((2 * r[0].item() - 1) * max_rotate)
    scale = 1.0 + (2 * r[1].item() - 1) * max_scale
    tx, ty = ((2 * r[2].item() - 1) * max_shift * 2, (2 * r[3].item() - 1) * max_shift * 2)
    sx = -1.0 if r[4].item() < hflip_p else 1.0
    sy = -1.0 if r[5].item() < vflip_p else 1.0
    c, s = math.cos(angle) / scale, math.sin(angle) / scale
    return torch.tensor([[c * sx, -s * sy, tx], [s * sx, c * sy, ty]], dtype=torch.float32)


def apply_affine(image: torch.Tensor, mask: torch.Tensor,
                 theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Warp image (C, S, S) and mask (K, S, S) with the same affine ``theta`` (2×3).

    Both bilinear with zero padding; the mask is re-binarised at 0.5, so a mask rendered into an
    image channel would warp to exactly the same pixels.
    """
    grid = F.affine_grid(theta[None], [1, 1, *image.shape[-2:]], align_corners=False)
    image = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros",
                          align_corners=False)[0]
    mask = F.grid_sample(mask[None], grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False)[0]
    return image, (mask >= 0.5).float()


def intensity_jitter(image: torch.Tensor, max_gamma: float = 0.25, max_contrast: float = 0.1,
                     max_brightness: float = 0.05) -> torch.Tensor:
    """Random gamma, contrast and brightness, the same for every channel; stays in [0, 1]."""
    r = torch.rand(3)
    gamma = math.exp((2 * r[0].item() - 1) * math.log1p(max_gamma))
    contrast = 1.0 + (2 * r[1].item() - 1) * max_contrast
    brightness = (2 * r[2].item() - 1) * max_brightness
    return (image.clamp(0, 1).pow(gamma) * contrast + brightness).clamp_(0.0, 1.0)


def augment(image: torch.Tensor, mask: torch.Tensor,
            exclusive: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Training augmentation: flip + small affine (shared by image and mask), then jitter.

    ``exclusive``: ``mask`` is one-hot with background in channel 0 (multi-class); it is warped
    as probabilities, the area outside the image counts as background, and the most likely
    class wins, so it stays one-hot.
    """
    if not exclusive:
        image, mask = apply_affine(image, mask, random_affine())
        return intensity_jitter(image), mask
    theta = random_affine()
    grid = F.affine_grid(theta[None], [1, 1, *image.shape[-2:]], align_corners=False)
    image, mask = (F.grid_sample(t[None], grid, mode="bilinear", padding_mode="zeros",
                                 align_corners=False)[0] for t in (image, mask))
    mask[0] += 1.0 - mask.sum(0)  # zero padding: background
    mask = F.one_hot(mask.argmax(0), mask.shape[0]).permute(2, 0, 1).float()
    return intensity_jitter(image), mask
