"""Preprocessing, its inverse, and augmentation."""

from __future__ import annotations

import numpy as np
import torch

from kvseg.data.transforms import (
    apply_affine,
    augment,
    prepare_slices,
    random_affine,
    resize_mask,
    resize_to_original,
)


def test_prepare_matches_numpy_percentile_normalisation_at_native_size():
    rng = np.random.default_rng(0)
    stack = rng.gamma(2.0, 800.0, (2, 40, 40)).astype(np.uint16)
    out = prepare_slices(stack, 40)
    assert out.dtype == torch.float32 and out.shape == (2, 40, 40)
    for c in range(2):
        x = stack[c].astype(np.float64)
        lo, hi = np.percentile(x, 0.5), np.percentile(x, 99.5)
        ref = np.clip((x - lo) / (hi - lo), 0, 1)
        np.testing.assert_allclose(out[c].numpy(), ref, atol=1e-5)


def test_constant_slice_becomes_zeros_and_range_is_unit():
    stack = np.stack([np.full((30, 50), 1234, np.uint16),
                      np.arange(1500, dtype=np.uint16).reshape(30, 50)])
    out = prepare_slices(stack, 16)
    assert out.shape == (2, 16, 16)
    assert (out[0] == 0).all()
    assert out.min() >= 0 and out.max() <= 1 and out[1].max() > 0.9


def test_resize_to_original_inverts_the_square_resize_for_a_non_square_mask():
    mask = np.zeros((1, 310, 360), np.uint8)
    mask[0, 100:220, 50:300] = 1  # 120 rows x 250 columns
    small = resize_mask(mask, 128)
    assert small.shape == (1, 128, 128)
    # rows are squeezed by 310/128, columns by 360/128
    assert abs(small.sum(dim=2).amax().item() - 250 * 128 / 360) <= 2
    assert abs(small.sum(dim=1).amax().item() - 120 * 128 / 310) <= 2
    back = resize_to_original(small, 310, 360)
    assert back.shape == (1, 310, 360) and back.dtype == torch.float32
    inter = ((back >= 0.5) & torch.from_numpy(mask.astype(bool))).sum().item()
    union = ((back >= 0.5) | torch.from_numpy(mask.astype(bool))).sum().item()
    assert inter / union > 0.97
    as_bool = resize_to_original(small.bool(), 310, 360)
    assert as_bool.dtype == torch.bool and as_bool.shape == (1, 310, 360)


def test_horizontal_flip_matrix_flips_exactly():
    torch.manual_seed(0)
    theta = random_affine(max_rotate=0, max_scale=0, max_shift=0, hflip_p=1.0)
    image = torch.rand(2, 9, 11)
    mask = (torch.rand(3, 9, 11) > 0.5).float()
    img2, mask2 = apply_affine(image, mask, theta)
    assert torch.allclose(img2, image.flip(-1), atol=1e-6)
    assert torch.equal(mask2, mask.flip(-1))


def test_image_and_mask_get_the_same_geometric_transform():
    mask = torch.zeros(3, 64, 64)
    mask[0, 10:30, 20:50] = 1
    mask[1, 40:60, 5:25] = 1
    mask[2, 25:45, 30:40] = 1
    for seed in range(5):
        torch.manual_seed(seed)
        theta = random_affine(max_rotate=15, max_scale=0.15, max_shift=0.1)
        img2, mask2 = apply_affine(mask.clone(), mask, theta)  # the image IS the mask
        assert torch.equal((img2 >= 0.5).float(), mask2)
        assert mask2.sum() > 0 and not torch.equal(mask2, mask)


def test_augment_is_deterministic_under_the_torch_seed():
    image, mask = torch.rand(3, 32, 32), (torch.rand(3, 32, 32) > 0.7).float()
    torch.manual_seed(3)
    a = augment(image, mask)
    torch.manual_seed(3)
    b = augment(image, mask)
    torch.manual_seed(4)
    c = augment(image, mask)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].min() >= 0 and a[0].max() <= 1
    assert set(a[1].unique().tolist()) <= {0.0, 1.0}
