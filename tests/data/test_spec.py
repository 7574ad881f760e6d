"""dataset.yaml: every key checked, bad values named with the file; label values -> classes."""

from __future__ import annotations

import numpy as np
import pytest

from kvseg.data.spec import DatasetSpec, parse_spec, read_spec, to_class_index
from kvseg.errors import ConfigError, DataError


def test_a_full_spec_parses():
    spec = parse_spec({"classes": {"a": 1, "b": [2, 4]}, "background_labels": [3],
                       "task": "multiclass", "channels": 1, "window": [-125, 275],
                       "split": {"val": ["x", 7]}, "group": r"^(\d+)_", "seed": 3,
                       "spacing": [0.5, 0.25], "mask_threshold": None} | {}, "d.yaml")
    assert spec.classes == ("a", "b") and spec.values == ((1,), (2, 4))
    assert spec.window == (-125.0, 275.0) and spec.split == {"val": ["x", "7"]}
    assert spec.group_of("12_a") == "12" and spec.spacing == (0.5, 0.25)
    raw = np.array([[0, 1, 2], [3, 4, 0]])
    np.testing.assert_array_equal(to_class_index(raw, spec, "m.png"), [[0, 1, 2], [0, 2, 0]])


@pytest.mark.parametrize("data, words", [
    ({"colour": 1}, "unknown key 'colour'"),
    ({"classes": []}, "classes: .*expected a list of names"),
    ({"classes": ["a", "a"]}, "names must be unique"),
    ({"classes": ["background"]}, "not 'background'"),
    ({"classes": {"a": 1, "b": 1}}, "a label value names two classes"),
    ({"classes": {"a": 0}}, "classes.a: 0: expected label values 1..65535"),
    ({"task": "binary"}, "task: 'binary': expected multiclass or multilabel"),
    ({"channels": 2}, "channels: 2: expected 1 or 3"),
    ({"window": [275, -125]}, "window: .*low < high"),
    ({"spacing": [0, 1]}, r"spacing: .*\[row_mm, col_mm\] > 0"),
    ({"split": {"test": ["a"]}}, "split: .*expected"),
    ({"group": "("}, "group: '\\(': not a regular expression"),
    ({"classes": ["a", "b"], "mask_threshold": 100}, "mask_threshold: only for a dataset of one"),
    # seeds numpy and torch cannot take were a traceback (default_rng(-1): ValueError)
    ({"seed": -1}, r"seed: -1: expected an integer 0\.\.4294967295"),
    ({"seed": 2**32}, r"seed: 4294967296: expected an integer 0\.\.4294967295"),
    ({"seed": 2**70}, "seed: .*expected an integer"),
    ({"seed": 1.5}, "seed: 1.5: expected an integer"),
    ({"mask_threshold": -1}, "mask_threshold: -1: expected an integer"),
    # a background value that is also a class value was silently read as the class
    ({"classes": ["a", "b", "c"], "background_labels": [3]},
     "background_labels: 3 is also the value of a class"),
    ({"classes": {"a": [1, 5]}, "background_labels": [5]}, "background_labels: 5 is also"),
    ({"mask_threshold": 127, "background_labels": [9]},
     "background_labels: not used with mask_threshold"),
])
def test_bad_specs_name_the_file_and_the_key(data, words):
    with pytest.raises(ConfigError, match=f"^d.yaml: .*{words}"):
        parse_spec(data, "d.yaml")


def test_read_spec_overrides_the_layout_defaults_key_by_key(tmp_path):
    base = DatasetSpec(classes=("x",), window=(0.0, 1.0))
    assert read_spec(tmp_path, base) is base
    (tmp_path / "dataset.yaml").write_text("window: [-1, 1]\n")
    spec = read_spec(tmp_path, base)
    assert spec.classes == ("x",) and spec.window == (-1.0, 1.0)
    (tmp_path / "dataset.yaml").write_text("window: [oops\n")
    with pytest.raises(ConfigError, match="dataset.yaml: not valid YAML"):
        read_spec(tmp_path)


def test_classes_over_a_layouts_background_labels_take_those_values():
    """Synapse reads 5 (esophagus) as background; a dataset.yaml naming it as a class wins."""
    from kvseg.data.medical import SYNAPSE

    spec = parse_spec({"classes": {"liver": 6, "esophagus": 5}}, "d.yaml", SYNAPSE)
    assert 5 not in spec.background_labels and 9 in spec.background_labels
    np.testing.assert_array_equal(to_class_index(np.array([5, 6, 9]), spec, "l.nii"), [2, 1, 0])


def test_label_values_outside_the_classes_name_the_file():
    spec = DatasetSpec(classes=("a",))
    ok = to_class_index(np.array([0, 1, 255]), spec, "m.png")  # one class: 0/255 masks read
    np.testing.assert_array_equal(ok, [0, 1, 1])
    for raw, bad in ((np.array([0, 2]), 2), (np.array([-1, 0]), -1), (np.array([300]), 300)):
        with pytest.raises(DataError, match=f"^m.png: label value {bad} is not a class"):
            to_class_index(raw, spec, "m.png")
    with pytest.raises(DataError, match="fractional"):
        to_class_index(np.array([0.5]), spec, "m.nii.gz")
    with pytest.raises(DataError, match="lossy"):
        to_class_index(np.array([0, 128]), spec, "m.jpg")
    spec = DatasetSpec(classes=("a",), mask_threshold=100)
    np.testing.assert_array_equal(to_class_index(np.array([0, 100, 101]), spec, "m.jpg"),
                                  [0, 0, 1])
