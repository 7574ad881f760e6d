"""SETR's MLA head reads the encoder layers SETR specifies (behaviour, not only shapes)."""

from __future__ import annotations

import torch

import kvseg
from kvseg.layers.blocks import tokens_to_map
from kvseg.models.setr import mla_indices


def test_mla_indices_are_evenly_spaced_and_end_at_the_last_layer():
    assert mla_indices(12) == [2, 5, 8, 11]
    assert mla_indices(24) == [5, 11, 17, 23]  # SETR-MLA: layers 6, 12, 18, 24 of 24
    assert mla_indices(4) == [0, 1, 2, 3]


def test_mla_head_receives_blocks_2_5_8_11_at_depth_12():
    torch.manual_seed(0)
    model = kvseg.create_model("setr_kv", size="micro", depth=12, head="mla", img_size=32).eval()
    blocks = {}
    for i, block in enumerate(model.encoder.blocks):
        block.register_forward_hook(lambda m, args, out, i=i: blocks.__setitem__(i, out))
    received = []
    model.decoder.register_forward_pre_hook(lambda m, args: received.extend(args[0]))
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        model(x)
    h, w = 32 // 8, 48 // 8  # micro: patch 8
    assert len(blocks) == 12 and len(received) == 4
    want = [tokens_to_map(blocks[i], h, w) for i in (2, 5, 8, 11)]  # raw: the head normalises
    for got, expected in zip(received, want, strict=True):
        torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_mla_normalises_every_level_and_classifies_with_a_3x3_conv():
    """SETR-MLA (vit_mla.py norm_0..3, mmseg MLANeck): one LayerNorm per aggregated level, so
    rescaling any level's features leaves the head's output unchanged; no encoder final norm;
    the classifier is 3×3 (vit_mla_head.py ``cls``). PUP and naive keep the final norm, 1×1."""
    torch.manual_seed(0)
    model = kvseg.create_model("setr_kv", size="micro", head="mla", img_size=32).eval()
    assert model.encoder.norm is None and len(model.decoder.norms) == 4
    assert model.head.kernel_size == (3, 3) and model.head.padding == (1, 1)
    feats = [torch.randn(1, 96, 4, 6) for _ in range(4)]
    with torch.no_grad():
        ref = model.decoder(feats)
        for level in range(4):
            scaled = [f * (7.0 if i == level else 1.0) + (3.0 if i == level else 0.0)
                      for i, f in enumerate(feats)]
            torch.testing.assert_close(model.decoder(scaled), ref, atol=1e-4, rtol=1e-4)
    for head in ("pup", "naive"):
        other = kvseg.create_model("setr_kv", size="micro", head=head, img_size=32)
        assert other.encoder.norm is not None and other.head.kernel_size == (1, 1)
