"""kvseg: 2D medical image segmentation with pure and hybrid Transformers in QKV, KV and KV-pos
attention (Hwa, Holmes, Drechsler, BVM 2025; Borji, Key-Value Transformer, 2023).

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


def list_models() -> list[str]:
    """The names of the nine registered variants (three families × three attention modes)."""
    from kvseg.models.registry import list_models as _list

    return _list()


__all__ = ["__version__", "create_model", "list_models"]
