"""kvseg: 2D medical image segmentation with pure and hybrid Transformers in QKV, KV and KV-pos
attention (Hwa, Holmes, Drechsler, BVM 2025; Borji, Key-Value Transformer, 2023), and the other
projection-sharing modes (shared_kv, shared_qv, single, kv_relpos).

The front door::

    import kvseg
    model = kvseg.create_model("setr_kv", size="micro", img_size=64)
    kvseg.list_models()
    model, report = kvseg.patch_attention(monai_unetr, "kv")  # KV inside a MONAI model
    model = kvseg.from_pretrained("PACKAGE_DIR")  # a model written by `kvseg package`
"""

from __future__ import annotations

from kvseg import _compat

__version__ = "0.1.0"

_compat.install()  # the 0.1.0 module paths (kvseg.stats, kvseg.train, ...) as aliases


def create_model(name: str, **kwargs):
    """Build a registered variant by name; see :func:`kvseg.models.registry.create_model`."""
    from kvseg.models.registry import create_model as _create

    return _create(name, **kwargs)


def list_models(modes="all", families=None) -> list[str]:
    """The registered variants (three families × every attention mode, then the reference
    families dynunet, unetr, swinunetr), the paper's nine (QKV, KV, KV-pos) first; see
    :func:`kvseg.models.registry.list_models` for ``modes`` and ``families``."""
    from kvseg.models.registry import list_models as _list

    return _list(modes, families)


def patch_attention(model, mode: str, rule: str = "sym", **kwargs):
    """Replace a third-party model's self-attention modules (MONAI's SABlock and Swin
    WindowAttention, the timm convention) in place with kvseg's in ``mode``; returns
    ``(model, report)``. See :func:`kvseg.models.patch.patch_attention`."""
    from kvseg.models.patch import patch_attention as _patch

    return _patch(model, mode, rule, **kwargs)


def from_pretrained(path, map_location="cpu"):
    """The model of a package folder written by ``kvseg package`` (``config.json`` +
    ``model.safetensors``) or of a training run folder (``best.safetensors``), in eval mode;
    see :func:`kvseg.inference.package.from_pretrained`."""
    from kvseg.inference.package import from_pretrained as _load

    return _load(path, map_location)


__all__ = ["__version__", "create_model", "from_pretrained", "list_models", "patch_attention"]
