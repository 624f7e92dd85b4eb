"""config.py: one flatten, one unknown-key check with "did you mean", typed overrides, saved configs."""

import json
import re

import ml_collections
import pytest
from helpers import SMOKE_CONFIG, tiny_config

from diff_fastener_jax import config as C
from diff_fastener_jax.config_schema import base_config


def test_flatten_nested_dicts_and_configdicts():
    nested = ml_collections.ConfigDict({"a": 1, "b": {"c": (1, 2), "d": {"e": "x"}}})
    assert C.flatten(nested) == {"a": 1, "b.c": (1, 2), "b.d.e": "x"}
    assert C.flatten({"a": {"b": 2}}) == {"a.b": 2}
    assert set(C.known_keys()) == set(C.flatten(base_config()))


@pytest.mark.parametrize(
    "typo,suggestion",
    [
        ("data.rooot", "data.root"),
        ("eval.thresold", "eval.threshold"),
        ("train.top_k", "infer.top_k"),  # right leaf, wrong section
    ],
)
def test_unknown_keys_get_a_did_you_mean_hint(typo, suggestion):
    with pytest.raises(C.ConfigError, match=f"unknown config key {typo}") as err:
        C.apply_overrides(tiny_config(), {typo: "1"})
    assert suggestion in err.value.hint


def test_overrides_are_typed_by_the_current_value():
    config = tiny_config()
    C.apply_overrides(
        config,
        {
            "train.num_steps": "12",
            "optim.lr_recon": "1e-3",
            "train.tensorboard": "true",
            "model.channel_mults": "[1, 2]",
            "data.category": "123",
            "data.root": "/x",
        },
    )
    assert config.train.num_steps == 12 and isinstance(config.train.num_steps, int)
    assert config.optim.lr_recon == 1e-3 and config.train.tensorboard is True
    assert config.model.channel_mults == (1, 2)
    assert config.data.category == "123"  # a string key stays a string
    C.apply_overrides(config, {"optim.lr_seg": 1})  # an int for a float key
    assert isinstance(config.optim.lr_seg, float)
    for key, value in [
        ("train.num_steps", "abc"),
        ("train.num_steps", "1.5"),
        ("train.tensorboard", "maybe"),
        ("model.channel_mults", "3"),
        ("data.root", 3),
    ]:
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
    for key, allowed in [
        ("model.activation", C.ACTIVATIONS),
        ("model.dtype", C.DTYPES),
        ("infer.method", C.INFER_METHODS),
        ("infer.map", C.ANOMALY_MAPS),
    ]:
        for value in allowed:
            C.validate_config(tiny_config(**{key: value}))
        with pytest.raises(C.ConfigError, match=re.escape(f"{key}: 'nope' is not one of {', '.join(allowed)}")):
            C.validate_config(tiny_config(**{key: "nope"}))


def test_allowed_values_are_defined_once_in_the_schema_and_match_what_the_code_implements():
    import ast
    import os

    from diff_fastener_jax import config_schema as S
    from diff_fastener_jax.data.demo import FRAMINGS
    from diff_fastener_jax.models.layers import ACTIVATIONS

    assert tuple(ACTIVATIONS) == S.ACTIVATIONS
    assert FRAMINGS is S.DEMO_FRAMINGS
    assert C.DTYPES is S.DTYPES and C.ATTENTION_IMPLS is S.ATTENTION_IMPLS and C.REMAT_MODES is S.REMAT_MODES
    # No other module of the package assigns a name the schema's constants have.
    names = {n for n in dir(S) if n.isupper() and isinstance(getattr(S, n), (tuple, dict))}
    package = os.path.dirname(S.__file__)
    for folder, _, files in os.walk(package):
        for f in files:
            path = os.path.join(folder, f)
            if not f.endswith(".py") or path == S.__file__:
                continue
            tree = ast.parse(open(path).read())
            assigned = {
                t.id
                for node in tree.body
                if isinstance(node, (ast.Assign, ast.AnnAssign))
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                if isinstance(t, ast.Name)
            }
            assert not assigned & names - {"ACTIVATIONS"}, (path, assigned & names)


def test_cutpaste_prob_must_be_a_probability():
    C.validate_config(tiny_config(**{"data.cutpaste_prob": 0.5}))
    with pytest.raises(C.ConfigError, match=r"data.cutpaste_prob: must be in \[0, 1\], got 1.5"):
        C.validate_config(tiny_config(**{"data.cutpaste_prob": 1.5}))


def test_seg_head_prior_must_be_an_open_probability():
    C.validate_config(tiny_config(**{"model.seg_head_prior": 0.01}))
    for bad in (0.0, 1.0):
        with pytest.raises(C.ConfigError, match=r"model.seg_head_prior: must be in \(0, 1\)"):
            C.validate_config(tiny_config(**{"model.seg_head_prior": bad}))


def test_validation_is_one_function_per_section():
    for section in ("data", "model", "diffusion", "loss", "optim", "train", "infer", "eval"):
        assert callable(getattr(C, f"validate_{section}")), section
    C.validate_model(tiny_config())
    with pytest.raises(C.ConfigError, match="model.num_heads: must be positive"):
        C.validate_model(tiny_config(**{"model.num_heads": 0}))


@pytest.mark.parametrize("value", [0, -5, -2])
def test_num_steps_is_positive_or_the_epochs_sentinel(value):
    with pytest.raises(
        C.ConfigError, match=f"train.num_steps: must be positive, or -1 to derive it from train.num_epochs; got {value}"
    ) as err:
        C.validate_config(tiny_config(**{"train.num_steps": value}))
    assert "--config.train.num_steps=100" in err.value.hint
    C.validate_config(tiny_config(**{"train.num_steps": C.NUM_STEPS_FROM_EPOCHS, "train.num_epochs": 2}))
    with pytest.raises(C.ConfigError, match="train.num_epochs: must be positive when train.num_steps=-1"):
        C.validate_config(tiny_config(**{"train.num_steps": -1, "train.num_epochs": 0}))


def test_ill_typed_override_hint_suggests_a_valid_value():
    with pytest.raises(C.ConfigError, match="train.num_steps: expected int, got 'abc'") as err:
        C.apply_overrides(tiny_config(), {"train.num_steps": "abc"})
    assert err.value.hint == "e.g. --config.train.num_steps=100"
    # the value the hint suggests is valid, also under the smoke config's and the demo recipe's schedules
    C.validate_config(tiny_config(**{"train.num_steps": C.example_value("train.num_steps")}))
    C.validate_config(
        tiny_config(
            **{
                "optim.schedule": "warmup_cosine",
                "optim.warmup_steps": 4,
                "train.num_steps": C.example_value("train.num_steps"),
            }
        )
    )
    for key in C.known_keys():  # every key's example passes the schema's own checks of that key
        if key in ("data.fold", "data.root", "data.category"):
            continue
        C.apply_overrides(tiny_config(), {key: C.example_value(key)})


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("train.batch_size", -4, "train.batch_size: must be positive, got -4"),
        ("train.batch_size", 0, "train.batch_size: must be positive, got 0"),
        ("train.batch_size", 6, "train.batch_size: 6 is not divisible by 2 x 4 devices"),
        ("train.batch_size", 3, "train.batch_size: 3 must be even"),
        ("train.checkpoint_every", 0, "train.checkpoint_every: must be positive"),
        ("train.eval_every", -1, "train.eval_every: must be >= 0"),
        ("train.val_batches", -1, "train.val_batches: must be >= 0"),
        ("seed", -1, "seed: must be >= 0"),
        ("data.prefetch", 0, "data.prefetch: must be positive"),
        ("data.num_folds", 1, "data.num_folds: must be >= 2"),
        ("data.fold", -2, r"data.fold: must be -1 \(no fold split\) or in"),
        ("data.folder_test_fraction", 1.0, r"data.folder_test_fraction: must be in \[0, 1\)"),
        ("data.demo_n_test", 0, "data.demo_n_test: must be positive"),
        ("model.dropout", 1.0, r"model.dropout: must be in \[0, 1\)"),
        ("model.channel_mults", (1, 0), "model.channel_mults: must be a non-empty tuple of positive sizes"),
        ("diffusion.T", 1, "diffusion.T: must be >= 2"),
        ("diffusion.beta_start", 0.0, r"diffusion.beta_start: must be in \(0, 1\)"),
        ("diffusion.beta_end", 1e-5, "diffusion.beta_end: must be in"),
        ("diffusion.guidance_w", -1.0, "diffusion.guidance_w: must be >= 0"),
        ("loss.focal_alpha", 1.5, r"loss.focal_alpha: must be in \[0, 1\]"),
        ("loss.smoothl1_beta", -1.0, "loss.smoothl1_beta: must be >= 0"),
        ("optim.lr_recon", 0.0, "optim.lr_recon: must be positive"),
        ("optim.clip", -1.0, "optim.clip: must be >= 0"),
        ("infer.adaptive_fusion_gain", 0.0, "infer.adaptive_fusion_gain: must be positive"),
        ("infer.seed", -1, "infer.seed: must be >= 0"),
        ("eval.threshold", -0.5, "eval.threshold: must be >= 0 .* or -1.0"),
        ("eval.aupro_limit", 0.0, r"eval.aupro_limit: must be in \(0, 1\]"),
        ("eval.num_panels", -1, "eval.num_panels: must be >= 0"),
    ],
)
def test_numeric_ranges_name_the_key_and_the_right_reason(key, value, message):
    with pytest.raises(C.ConfigError, match=message):
        C.validate_config(tiny_config(**{key: value}), num_devices=4)


def test_every_numeric_key_has_its_range_checked():
    """A far out-of-range value of any numeric key (ints and floats, sentinels included) fails
    validation naming that key."""
    numeric = {k: v for k, v in C.known_keys().items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert len(numeric) > 50
    unchecked = []
    for key, default in numeric.items():
        bad = type(default)(-(10**6))
        try:
            C.validate_config(tiny_config(**{key: bad}))
        except C.ConfigError as e:
            if key.rsplit(".", 1)[-1] not in str(e):
                unchecked.append((key, str(e)))
        else:
            unchecked.append((key, "accepted"))
    assert not unchecked, unchecked


def test_a_saved_config_with_a_dropped_key_loads(tmp_path):
    config = tiny_config()
    saved = json.loads(config.to_json_best_effort())
    for dropped in C.DROPPED_KEYS:
        section, leaf = dropped.split(".")
        saved[section][leaf] = 10000
    path = tmp_path / "config.json"
    path.write_text(json.dumps(saved))
    back = C.config_from_json(str(path))
    assert C.flatten(back) == C.flatten(config)
    assert "eval.pixel_bins" in C.DROPPED_KEYS and "eval.pixel_bins" not in C.known_keys()


def test_a_saved_config_with_a_renamed_key_loads_under_the_new_name(tmp_path):
    for old_value, value in ((True, "subtract"), (False, "off")):
        saved = json.loads(tiny_config().to_json_best_effort())
        del saved["infer"]["normal_map"]
        saved["infer"]["subtract_normal_map"] = old_value
        path = tmp_path / "config.json"
        path.write_text(json.dumps(saved))
        assert C.config_from_json(str(path)).infer.normal_map == value
    # on the command line the old key is an unknown key whose hint names the new one
    with pytest.raises(C.ConfigError, match="unknown config key infer.subtract_normal_map") as caught:
        C.check_keys(["infer.subtract_normal_map"])
    assert caught.value.hint == "infer.subtract_normal_map is now infer.normal_map (true -> subtract, false -> off)"


def test_a_trained_runs_config_refuses_auto():
    for key, choices in (
        ("data.foreground", "otsu or --config.data.foreground=full"),
        ("infer.normal_map", "subtract"),
    ):
        config = tiny_config(**{key: "auto"})
        with pytest.raises(C.ConfigError, match=f"--config.{key}=auto: decided when training starts") as caught:
            C.refuse_auto_on_trained_run(config)
        assert choices in caught.value.hint
    C.refuse_auto_on_trained_run(tiny_config(**{"data.foreground": "full", "infer.normal_map": "subtract"}))


def test_dropped_keys_are_read_nowhere():
    import os
    import subprocess

    from helpers import ROOT

    for key in C.DROPPED_KEYS:
        leaf = key.rsplit(".", 1)[-1]
        out = subprocess.run(
            ["grep", "-rln", leaf, "diff_fastener_jax", "configs"], cwd=ROOT, capture_output=True, text=True
        ).stdout.split()
        assert out == [os.path.join("diff_fastener_jax", "config_schema.py")], (key, out)


def test_resume_changes_name_what_changes_the_run():
    saved = tiny_config(**{"optim.schedule": "warmup_cosine", "train.num_steps": 10})
    same = tiny_config(
        **{
            "optim.schedule": "warmup_cosine",
            "train.num_steps": 10,
            "train.log_every": 7,
            "infer.batch_size": 2,
            "model.remat": "blocks",
        }
    )
    assert C.resume_changes(saved, same) == []  # logging, inference and remat do not change the run
    longer = tiny_config(
        **{"optim.schedule": "warmup_cosine", "train.num_steps": 20, "optim.lr_seg": 1e-3, "train.batch_size": 4}
    )
    assert C.resume_changes(json.loads(saved.to_json_best_effort()), longer) == [
        ("optim.lr_seg", saved.optim.lr_seg, 1e-3),
        ("train.batch_size", 8, 4),
        ("train.num_steps", 10, 20),
    ]
    # under a constant rate the step count only says where to stop
    constant = tiny_config(**{"train.num_steps": 10})
    assert C.resume_changes(constant, tiny_config(**{"train.num_steps": 20})) == []
    # a saved config with a dropped key, or without a key added since, compares on the keys both have
    old = C.flatten(constant) | {"eval.pixel_bins": 10000}
    del old["train.allow_resume_changes"]
    assert C.resume_changes(old, tiny_config(**{"train.num_steps": 20, "train.allow_resume_changes": True})) == []


def test_the_real_data_recipe_covers_256_px_images_by_5x5_overlapping_128_px_tiles():
    """configs/real_cpu.py as measured in docs/experiments.md: it validates, and its program scores a
    256 x 256 image by a 5 x 5 grid of 128 px tiles every 32 px, with no dataset needed."""
    import os

    from helpers import ROOT

    from diff_fastener_jax.inference import network_image_shape, tiling_record

    config = C.load_config(os.path.join(ROOT, "configs", "real_cpu.py"))
    C.validate_config(config, check_data=False)
    assert network_image_shape(config) == (128, 128, 3)
    record = tiling_record(config)
    assert record["tiles"] == [5, 5] and record["tile_stride"] == 32 and record["patch_size"] == 128
    assert not config.loss.anomaly_oriented_noise and config.train.num_steps == 700
    assert (config.data.foreground, config.infer.normal_map) == ("auto", "auto")
    assert (config.infer.score_region, config.infer.map_region) == ("foreground", "foreground")
    assert (config.infer.map, config.infer.chroma_weight, config.infer.score_chroma_weight) == (
        "segmentation+recon_error",
        0.0,
        2.0,
    )
