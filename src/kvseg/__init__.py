"""kvseg: 2D medical image segmentation with pure and hybrid Transformers in QKV, KV and KV-pos
attention (Hwa, Holmes, Drechsler, BVM 2025; Borji, Key-Value Transformer, 2023), and the other
projection-sharing modes (shared_kv, shared_qv, single, kv_relpos).

The front door::

    import kvseg
    model = kvseg.create_model("setr_kv", size="micro", img_size=64)
    kvseg.list_models()
"""

from __future__ import annotations

__version__ = "0.1.0"


def create_model(name: str, **kwargs):
    """Build a registered variant by name; see :func:`kvseg.models.registry.create_model`."""
    from kvseg.models.registry import create_model as _create

    return _create(name, **kwargs)


def list_models(modes="all") -> list[str]:
    """The registered variants (three families × every attention mode), the paper's nine
    (QKV, KV, KV-pos) first; see :func:`kvseg.models.registry.list_models` for ``modes``."""
    from kvseg.models.registry import list_models as _list

    return _list(modes)


__all__ = ["__version__", "create_model", "list_models"]
