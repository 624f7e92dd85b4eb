"""config.py: one flatten, one unknown-key check with "did you mean", typed overrides, saved configs."""

import json

import ml_collections
import pytest
from conftest import SMOKE_CONFIG, tiny_config

from diff_fastener_jax import config as C
from diff_fastener_jax.config_schema import base_config


def test_flatten_nested_dicts_and_configdicts():
    nested = ml_collections.ConfigDict({"a": 1, "b": {"c": (1, 2), "d": {"e": "x"}}})
    assert C.flatten(nested) == {"a": 1, "b.c": (1, 2), "b.d.e": "x"}
    assert C.flatten({"a": {"b": 2}}) == {"a.b": 2}
    assert set(C.known_keys()) == set(C.flatten(base_config()))


@pytest.mark.parametrize("typo,suggestion", [
    ("data.rooot", "data.root"),
    ("eval.thresold", "eval.threshold"),
    ("train.top_k", "infer.top_k"),  # right leaf, wrong section
])
def test_unknown_keys_get_a_did_you_mean_hint(typo, suggestion):
    with pytest.raises(C.ConfigError, match=f"unknown config key {typo}") as err:
        C.apply_overrides(tiny_config(), {typo: "1"})
    assert suggestion in err.value.hint


def test_overrides_are_typed_by_the_current_value():
    config = tiny_config()
    C.apply_overrides(config, {"train.num_steps": "12", "optim.lr_recon": "1e-3", "train.tensorboard": "true",
                               "model.channel_mults": "[1, 2]", "data.category": "123", "data.root": "/x"})
    assert config.train.num_steps == 12 and isinstance(config.train.num_steps, int)
    assert config.optim.lr_recon == 1e-3 and config.train.tensorboard is True
    assert config.model.channel_mults == (1, 2)
    assert config.data.category == "123"  # a string key stays a string
    C.apply_overrides(config, {"optim.lr_seg": 1})  # an int for a float key
    assert isinstance(config.optim.lr_seg, float)
    for key, value in [("train.num_steps", "abc"), ("train.num_steps", "1.5"), ("train.tensorboard", "maybe"),
                       ("model.channel_mults", "3"), ("data.root", 3)]:
        with pytest.raises(C.ConfigError, match=key):
            C.apply_overrides(tiny_config(), {key: value})


def test_config_from_json_round_trip_and_unknown_saved_key(tmp_path):
    config = tiny_config(**{"model.channel_mults": (1, 2), "data.root": "/data/x"})
    path = tmp_path / "config.json"
    path.write_text(config.to_json_best_effort())
    back = C.config_from_json(str(path))
    assert C.flatten(back) == C.flatten(config)
    saved = json.loads(path.read_text())
    saved["train"]["bacth_size"] = 4
    path.write_text(json.dumps(saved))
    with pytest.raises(C.ConfigError, match="unknown config key train.bacth_size") as err:
        C.config_from_json(str(path))
    assert "train.batch_size" in err.value.hint


def test_not_a_run_folder(tmp_path):
    with pytest.raises(C.ConfigError, match="is not a training run"):
        C.config_from_json(str(tmp_path / "config.json"))


def test_load_config_missing_file_names_the_config_files():
    with pytest.raises(C.ConfigError, match="configs/nope.py does not exist") as err:
        C.load_config(SMOKE_CONFIG.replace("demo.py", "nope.py").split(":")[0])
    assert "demo.py" in err.value.hint


def test_allowed_values_come_from_the_constants():
    for key, allowed in [("model.activation", C.ACTIVATIONS), ("model.dtype", C.DTYPES),
                         ("infer.method", C.INFER_METHODS), ("infer.map", C.ANOMALY_MAPS)]:
        for value in allowed:
            C.validate_config(tiny_config(**{key: value}))
        with pytest.raises(C.ConfigError, match=f"{key}: 'nope' is not one of {', '.join(allowed)}"):
            C.validate_config(tiny_config(**{key: "nope"}))


def test_allowed_values_match_what_the_code_implements():
    from diff_fastener_jax.models import DTYPE_NAMES
    from diff_fastener_jax.models.layers import ACTIVATIONS, ATTENTION_IMPLEMENTATIONS

    assert set(C.ACTIVATIONS) == set(ACTIVATIONS)
    assert set(C.DTYPES) == set(DTYPE_NAMES)
    assert set(C.ATTENTION_IMPLS) == set(ATTENTION_IMPLEMENTATIONS)
    from diff_fastener_jax.data.demo import FRAMINGS

    assert set(C.DEMO_FRAMINGS) == set(FRAMINGS)


def test_cutpaste_prob_must_be_a_probability():
    C.validate_config(tiny_config(**{"data.cutpaste_prob": 0.5}))
    with pytest.raises(C.ConfigError, match=r"data.cutpaste_prob: must be in \[0, 1\], got 1.5"):
        C.validate_config(tiny_config(**{"data.cutpaste_prob": 1.5}))


def test_seg_head_prior_must_be_an_open_probability():
    C.validate_config(tiny_config(**{"model.seg_head_prior": 0.01}))
    for bad in (0.0, 1.0):
        with pytest.raises(C.ConfigError, match=r"model.seg_head_prior: must be in \(0, 1\)"):
            C.validate_config(tiny_config(**{"model.seg_head_prior": bad}))
