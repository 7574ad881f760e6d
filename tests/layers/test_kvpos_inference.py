"""KV-pos caches its key encoding, KV-relpos its bias index; one made under
``torch.inference_mode()`` must not leak into training (autograd refuses inference tensors:
"Inference tensors cannot be saved for backward")."""

from __future__ import annotations

import pytest
import torch

import kvseg
from kvseg.models.registry import model_info

KV_POS_MODELS = [m for m in kvseg.list_models()
                 if model_info(m)["mode"] in ("kv_pos", "kv_relpos")]


@pytest.mark.parametrize("name", KV_POS_MODELS)
def test_kv_pos_model_trains_after_predict(name):
    torch.manual_seed(0)
    model = kvseg.create_model(name, size="micro", img_size=32, in_channels=1)
    x = torch.rand(2, 1, 32, 32)
    model.predict(x)  # caches the encoding as an inference tensor
    model.train()
    loss = model(x).square().mean()
    loss.backward()  # raised RuntimeError before the fix
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # and back: inference mode and plain eval agree after training
    predicted = model.predict(x)
    with torch.no_grad():
        assert torch.equal(predicted, model.eval()(x))
