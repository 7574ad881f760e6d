"""The paired_init option: a KV run starts from the weights (and the random stream) of the QKV
run of the same seed; QKV runs are unchanged by it."""

from __future__ import annotations

import logging

import pytest
import torch

from helpers import train_options
from kvseg.config import RunConfig
from kvseg.errors import ConfigError
from kvseg.training import distributed as D
from kvseg.training import train as T


def _set_up(synth, tmp_path, model: str, **kw):
    """The trainer of ``model`` after its set-up (model built, loaders made), and the CPU RNG
    state right after it (what dropout and the first step draw from)."""
    config = T.load_config(None, train_options(synth, tmp_path / model, model=model, **kw))
    trainer = T._Trainer(config, D.DistInfo(), torch.device("cpu"))
    trainer.setup()
    return trainer, torch.get_rng_state()


@pytest.mark.parametrize("family", ["setr", "setr_conv", "setr_cvt"])
def test_a_paired_kv_run_starts_from_the_qkv_runs_weights_and_rng(synth, tmp_path, family):
    qkv, rng_qkv = _set_up(synth, tmp_path, f"{family}_qkv")
    kv, rng_kv = _set_up(synth, tmp_path, f"{family}_kv", paired_init=True)
    alone, _ = _set_up(synth, tmp_path / "alone", f"{family}_kv")
    ref, got, own = qkv.model.state_dict(), kv.model.state_dict(), alone.model.state_dict()
    shared = [k for k in got if k in ref]
    assert len(shared) > 0.8 * len(got)
    for key in shared:
        assert torch.equal(got[key], ref[key]), key
    # without the option some shared tensor starts elsewhere (the test needs the feature)
    assert any(not torch.equal(own[k], ref[k]) for k in shared)
    for key, value in got.items():
        if key.endswith((".kv.weight", ".kv.bias")):
            src = ref[key.replace(".kv.", ".qkv.")]
            d = src.shape[0] // 3
            assert torch.equal(value, src[d:3 * d]), key
    assert torch.equal(rng_kv, rng_qkv)  # the same dropout/drop-path stream from here on


def test_a_qkv_run_is_unchanged_by_the_option(synth, tmp_path):
    plain, rng_plain = _set_up(synth, tmp_path / "a", "setr_qkv")
    paired, rng_paired = _set_up(synth, tmp_path / "b", "setr_qkv", paired_init=True)
    a, b = plain.model.state_dict(), paired.model.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(rng_plain, rng_paired)


def test_a_paired_run_trains_and_says_what_it_copied(synth, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="kvseg.training.train"):
        T.train(T.load_config(None, train_options(synth, tmp_path / "r", model="setr_kvpos",
                                                  paired_init=True, epochs=1)))
    line = next(r.getMessage() for r in caplog.records if "paired init" in r.getMessage())
    assert "from setr_qkv" in line and "sliced out of qkv" in line and "own init kept" in line
    assert (tmp_path / "r" / "best.safetensors").is_file()


def test_the_option_is_validated_and_old_configs_default_to_off(synth, tmp_path):
    assert T.load_config(None, train_options(synth, tmp_path / "r")).paired_init is False
    with pytest.raises(ConfigError, match="paired_init"):
        T.load_config(None, train_options(synth, tmp_path / "r", paired_init="yes"))
    old = {"model": "setr_kv", "size": "micro", "img_size": 32, "in_channels": 1,
           "num_classes": 3}  # a run of a version without the option
    assert RunConfig.from_dict(old).paired_init is False
