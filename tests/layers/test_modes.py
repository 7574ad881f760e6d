"""The attention-mode registry: one class per mode, chosen by name; names, labels, suffixes."""

from __future__ import annotations

import copy
import inspect
import io

import pytest
import torch

import kvseg
from kvseg.errors import ConfigError
from kvseg.layers import (
    ATTENTION_LAYERS,
    MODE_LABELS,
    MODES,
    PAPER_MODES,
    Attention,
    KVAttention,
    KVPosAttention,
    KVPosBias,
    KVRelPosAttention,
    ModeSpec,
    QKVAttention,
    SharedKVAttention,
    SharedQVAttention,
    SingleAttention,
    TransformerBlock,
    attention_layer,
    mode_label,
    mode_spec,
    mode_suffix,
    resolve_modes,
)
from kvseg.models.cvt import ConvAttention, CvTBlock


def test_names_labels_suffixes():
    assert MODES == ("qkv", "kv", "kv_pos", "shared_kv", "shared_qv", "single", "kv_relpos")
    assert PAPER_MODES == MODES[:3]  # the paper's order, first
    assert MODE_LABELS == {"qkv": "QKV", "kv": "KV", "kv_pos": "KV-pos", "shared_kv": "Q−K=V",
                           "shared_qv": "Q=V−K", "single": "Q=K=V", "kv_relpos": "KV-relpos"}
    assert [mode_label(m) for m in PAPER_MODES] == ["QKV", "KV", "KV-pos"]
    assert [mode_suffix(m) for m in MODES] == ["qkv", "kv", "kvpos", "sharedkv", "sharedqv",
                                               "single", "kvrelpos"]
    assert ATTENTION_LAYERS == {"qkv": QKVAttention, "kv": KVAttention,
                                "kv_pos": KVPosAttention, "shared_kv": SharedKVAttention,
                                "shared_qv": SharedQVAttention, "single": SingleAttention,
                                "kv_relpos": KVRelPosAttention}
    facts = {m: (mode_spec(m).query, mode_spec(m).value, mode_spec(m).key_bias,
                 mode_spec(m).rel_pos) for m in MODES}
    assert facts == {"qkv": ("q", "v", False, False), "kv": ("k", "v", False, False),
                     "kv_pos": ("k", "v", True, False), "shared_kv": ("q", "k", False, False),
                     "shared_qv": ("q", "q", False, False), "single": ("k", "k", False, False),
                     "kv_relpos": ("k", "v", False, True)}
    assert {m: mode_spec(m).projections for m in MODES} == {
        "qkv": ("q", "k", "v"), "kv": ("k", "v"), "kv_pos": ("k", "v"), "shared_kv": ("q", "k"),
        "shared_qv": ("q", "k"), "single": ("k",), "kv_relpos": ("k", "v")}
    assert [m for m in MODES if mode_spec(m).shared_query] == ["kv", "kv_pos", "single",
                                                               "kv_relpos"]
    assert {kvseg.models.model_info(f"setr_{mode_suffix(m)}")["mode"] for m in MODES} == set(MODES)


def test_mode_selection():
    assert resolve_modes(None) == PAPER_MODES
    assert resolve_modes("all") == resolve_modes(["all"]) == MODES
    assert resolve_modes(["single", "kv"]) == ("kv", "single")  # registry order
    with pytest.raises(ConfigError, match="mode='kvpos'"):
        resolve_modes(["kvpos"])
    with pytest.raises(ConfigError, match="'all' cannot be combined"):
        resolve_modes(["all", "kv"])
    with pytest.raises(ConfigError, match="V = Q without a query projection"):
        ModeSpec("odd", "odd", query="k", value="q")


@pytest.mark.parametrize("mode", MODES)
def test_attention_builds_the_registered_class(mode):
    attn = Attention(16, 2, mode, grid_size=(3, 3))
    assert type(attn) is attention_layer(mode) and isinstance(attn, Attention)
    assert attn.mode == mode and type(attn).spec.name == mode
    assert type(Attention(16, 2, mode=mode, grid_size=(3, 3))) is attention_layer(mode)
    direct = attention_layer(mode)(16, 2, grid_size=(3, 3))  # the class itself, mode omitted
    assert type(direct) is attention_layer(mode)
    assert [k for k, _ in direct.state_dict().items()] == list(attn.state_dict())
    assert type(Attention(16, 2)) is QKVAttention  # the default mode


@pytest.mark.parametrize("bad", ["kvpos", "KV-pos", "qk", "", None])
def test_unknown_mode_is_a_config_error_naming_it(bad):
    with pytest.raises(ConfigError, match=f"mode={bad!r}"):
        Attention(16, 2, bad)
    with pytest.raises(ConfigError, match=f"mode={bad!r}"):
        ConvAttention(16, 2, bad)
    with pytest.raises(ConfigError, match=f"mode={bad!r}"):
        mode_label(bad)


def test_user_errors_are_config_errors():
    with pytest.raises(ConfigError, match="num_heads=3"):
        Attention(16, 3, "kv")
    with pytest.raises(ConfigError, match="num_heads=5"):
        ConvAttention(16, 5, "kv")
    with pytest.raises(ConfigError, match="pos_dim=1"):
        KVPosBias(1)
    with pytest.raises(ConfigError, match="mode='qkv'"):
        KVAttention(16, 2, "qkv")  # a mode class is its mode only


@pytest.mark.parametrize("mode", MODES)
def test_copy_and_pickle_keep_the_class_and_the_outputs(mode):
    torch.manual_seed(0)
    attn = Attention(16, 2, mode, grid_size=(3, 3)).eval()
    x = torch.randn(1, 9, 16)
    buf = io.BytesIO()
    torch.save(attn, buf)
    buf.seek(0)
    for other in (copy.deepcopy(attn), torch.load(buf, weights_only=False)):
        assert type(other) is type(attn)
        torch.testing.assert_close(other(x), attn(x))


def test_a_new_mode_is_a_class_and_a_registry_row(monkeypatch):
    """A mode defined outside the module works in token and CvT attention without other edits."""

    class KVBiasAttention(KVAttention):  # a hypothetical eighth mode
        spec = ModeSpec("kv_bias", "KV-bias", query="k", key_bias=True)

    monkeypatch.setitem(ATTENTION_LAYERS, "kv_bias", KVBiasAttention)
    attn = Attention(16, 2, "kv_bias", pos_dim=10)
    assert type(attn) is KVBiasAttention and attn.pos.pos_dim == 10
    assert mode_label("kv_bias") == "KV-bias" and mode_suffix("kv_bias") == "kvbias"
    assert attn(torch.randn(1, 9, 16)).shape == (1, 9, 16)
    conv = ConvAttention(16, 2, "kv_bias", pos_dim=10)
    assert not hasattr(conv, "proj_q") and conv.pos is not None
    assert conv(torch.randn(1, 16, 16), 4, 4).shape == (1, 16, 16)


@pytest.mark.parametrize("forward", [TransformerBlock.forward, CvTBlock.forward,
                                     kvseg.models.SegmentationModel.forward])
def test_blocks_and_models_do_not_thread_return_attention(forward):
    """Attention maps come from hooks on the attention modules, not through every forward."""
    assert "return_attention" not in inspect.signature(forward).parameters
