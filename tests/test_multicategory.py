"""One model for several categories: class-conditioned networks, mixed batches, per-category thresholds
and metrics, the category per image at prediction time."""

import csv
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import perturbed, tiny_config

from diff_fastener_jax import config as config_lib
from diff_fastener_jax.data import datasets, demo, pipeline
from diff_fastener_jax.errors import UserError
from diff_fastener_jax.models import build_models, count_params, init_params

CATEGORIES = "fastener,fastener_bar"


def _unified(**overrides):
    return tiny_config(**{"data.category": CATEGORIES, **overrides})


def _perturbed(params, scale=0.05):
    return perturbed(params, 7, scale)


def test_category_names_and_class_names():
    assert config_lib.category_names(" a, b ,c") == ["a", "b", "c"]
    assert config_lib.category_names("") == []
    assert config_lib.class_names(tiny_config()) == []  # one category: no class embedding
    assert config_lib.class_names(_unified()) == ["fastener", "fastener_bar"]
    with pytest.raises(config_lib.ConfigError, match="resolved only when a run starts"):
        config_lib.class_names(tiny_config(**{"data.category": "all"}))
    for bad, error in (("a,a", "twice"), ("all,a", "cannot be combined")):
        with pytest.raises(config_lib.ConfigError, match=error):
            config_lib.validate_config(tiny_config(**{"data.category": bad}))


@pytest.mark.parametrize("conditioning", ["channels", "film"])
def test_class_conditioning_adds_pinned_params_and_changes_the_output(conditioning):
    single = init_params(tiny_config(), jax.random.key(0))
    config = _unified(**{"model.seg_class_conditioning": conditioning})
    params = init_params(config, jax.random.key(0))
    m = config.model
    temb = 4 * m.base_channels
    assert count_params(params["recon"]) == count_params(single["recon"]) + 2 * temb  # Embed(2, 4 * base)
    seg_extra = (
        2 * 3 * 3 * m.seg_channels[0]
        if conditioning == "channels"  # one-hot planes into the 1st conv
        else sum(2 * 2 * ch for ch in m.seg_channels)
    )  # FiLM: (scale, shift) per level and class
    assert count_params(params["seg"]) == count_params(single["seg"]) + seg_extra

    recon, seg = build_models(config)
    params = _perturbed(params)  # FiLM starts at zero: perturb so the class matters from the start
    x = jax.random.normal(jax.random.key(1), (1, 32, 32, 3))
    t = jnp.array([500])
    recon_fn, seg_fn = jax.jit(recon.apply), jax.jit(seg.apply)  # one program each, not op by op
    eps = [recon_fn({"params": params["recon"]}, x, t, class_ids=jnp.array([c])) for c in (0, 1)]
    assert float(jnp.abs(eps[0] - eps[1]).max()) > 1e-4
    xs = jnp.concatenate([x, x], -1)
    prob = [seg_fn({"params": params["seg"]}, xs, class_ids=jnp.array([c])) for c in (0, 1)]
    assert float(jnp.abs(prob[0] - prob[1]).max()) > 1e-4
    with pytest.raises(ValueError, match="pass class_ids"):
        recon.apply({"params": params["recon"]}, x, t)


@pytest.fixture(scope="module")
def two_category_root(tmp_path_factory):
    config = _unified()
    return demo.ensure_demo_data(config.data, str(tmp_path_factory.mktemp("multi") / "demo"))


def test_two_categories_are_listed_split_and_tagged(two_category_root):
    config = _unified(**{"data.root": two_category_root})
    splits = datasets.list_splits(config.data, seed=0)
    for name in ("fastener", "fastener_bar"):
        one = datasets.list_splits(tiny_config(**{"data.root": two_category_root, "data.category": name}).data, 0)
        for split in ("train", "val", "test"):  # each category is split exactly as on its own
            mine = [s for s in splits[split] if s.category == name]
            assert [s.path for s in mine] == [s.path for s in one[split]]
    assert datasets.class_ids_of(config, splits["train"]) == [
        0 if s.category == "fastener" else 1 for s in splits["train"]
    ]
    everything = tiny_config(**{"data.root": two_category_root, "data.category": "all"})
    assert datasets.resolve_categories(everything.data) == ["fastener", "fastener_bar"]


def test_training_batches_mix_categories_and_stay_half_synthetic(two_category_root):
    config = _unified(**{"data.root": two_category_root, "train.batch_size": 8})
    samples = datasets.list_splits(config.data, seed=0)["train"]
    ds = pipeline.build_train_dataset(config, seed=0, samples=samples)
    seen = set()
    for k in range(4):
        batch = ds[k]
        assert batch["class_id"].dtype == np.int32 and batch["class_id"].shape == (8,)
        np.testing.assert_array_equal(batch["is_synthetic"], np.tile([0.0, 1.0], 4))
        seen |= set(batch["class_id"].tolist())
    assert seen == {0, 1}


def test_the_infer_program_takes_class_ids_exactly_when_unified():
    from diff_fastener_jax.inference import make_infer_fn

    config = _unified()
    params = _perturbed(init_params(config, jax.random.key(0)))
    infer = make_infer_fn(config)
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
    a = infer(params, images, jnp.array([0, 0], jnp.int32))
    b = infer(params, images, jnp.array([0, 1], jnp.int32))
    np.testing.assert_allclose(np.asarray(a.score)[0], np.asarray(b.score)[0], rtol=1e-5)  # row 0 unchanged
    assert abs(float(a.score[1]) - float(b.score[1])) > 0  # row 1: another class, another score
    with pytest.raises(ValueError, match="pass class_ids"):
        infer(params, images)


@pytest.fixture(scope="module")
def unified_run(two_category_root, tmp_path_factory):
    from diff_fastener_jax.training.loop import train_and_evaluate

    workdir = str(tmp_path_factory.mktemp("unified") / "run")
    train_and_evaluate(_unified(**{"data.root": two_category_root, "data.category": "all"}), workdir, quiet=True)
    return workdir


def test_unified_run_calibrates_evaluates_and_predicts_per_category(unified_run, tmp_path):
    from diff_fastener_jax import Detector
    from diff_fastener_jax.deploy import predict
    from diff_fastener_jax.evaluation import evaluate

    saved = json.load(open(os.path.join(unified_run, "config.json")))
    assert saved["data"]["category"] == CATEGORIES  # 'all' resolved and fixed with the run
    record = json.load(open(os.path.join(unified_run, "detector.json")))["threshold"]
    assert set(record["per_category"]) == {"fastener", "fastener_bar"}

    out = str(tmp_path / "eval")
    result = evaluate.evaluate_workdir(unified_run, out, show_progress=False)
    assert set(result["per_category"]) == {"fastener", "fastener_bar"}
    for key, mean in result["per_category_mean"].items():
        assert mean == pytest.approx(np.mean([m[key] for m in result["per_category"].values()]))
    assert result["per_category"]["fastener"]["threshold"] == pytest.approx(record["per_category"]["fastener"])
    rows = list(csv.DictReader(open(os.path.join(out, "scores.csv"))))
    assert {r["category"] for r in rows} == {"fastener", "fastener_bar"}
    assert sum(m["num_images"] for m in result["per_category"].values()) == len(rows) == result["num_images"]
    assert "Per category (one unified model)" in open(os.path.join(out, "report.html")).read()

    det = Detector.load(unified_run)
    assert det.categories == ["fastener", "fastener_bar"]
    bar_relative = sorted(r["path"] for r in rows if r["category"] == "fastener_bar")[:2]  # to data.root
    bar_images = [os.path.join(saved["data"]["root"], p) for p in bar_relative]
    with pytest.raises(UserError, match="give each image's category"):
        det.predict(bar_images)
    with pytest.raises(UserError, match="unknown category"):
        det.predict(bar_images, "sleeper")
    pred = det.predict(bar_images, "fastener_bar")
    by_path = {r["path"]: float(r["score"]) for r in rows}
    np.testing.assert_allclose(pred.scores, [by_path[p] for p in bar_relative], atol=1e-5)
    np.testing.assert_allclose(pred.thresholds, record["per_category"]["fastener_bar"])
    # predict --category from_folder: each image's folder names its category.
    incoming = tmp_path / "incoming" / "fastener_bar"
    incoming.mkdir(parents=True)
    for p in bar_images:
        os.link(p, incoming / os.path.basename(p))
    res = predict.predict(
        det,
        sorted(str(p) for p in incoming.iterdir()),
        str(tmp_path / "pred"),
        show_progress=False,
        category=predict.FROM_FOLDER,
    )
    assert res["scored"] == 2
    pred_rows = list(csv.DictReader(open(tmp_path / "pred" / "scores.csv")))
    assert {r["category"] for r in pred_rows} == {"fastener_bar"}
    np.testing.assert_allclose([float(r["score"]) for r in pred_rows], pred.scores, atol=1e-5)
