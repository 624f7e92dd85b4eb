"""Scoring an export folder with ONNX Runtime or OpenVINO (no JAX on the scoring side), the dynamic-batch
and multi-category ONNX models, and model.stablehlo called without this package."""

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from helpers import ROOT, perturbed, subprocess_env, tiny_config
from ship_support import smoke_export, smoke_test_images

from diff_fastener_jax import Detector
from diff_fastener_jax.deploy import export, runtimes
from diff_fastener_jax.errors import UserError

HAS_OPENVINO = runtimes.installed("openvino")
needs_openvino = pytest.mark.skipif(
    not HAS_OPENVINO, reason="openvino is not installed (pip install 'diff-fastener-jax[openvino]')"
)

# Run first in a subprocess: JAX and the training stack become unimportable, as on an inspection PC
# that has only the `runtime` extra installed. Any import of them fails the command.
NO_JAX = textwrap.dedent("""
    import sys

    class _NotInstalled:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("jax", "jaxlib", "flax", "optax", "orbax", "grain", "sklearn"):
                raise ImportError(f"{name} is not installed here")

    sys.meta_path.insert(0, _NotInstalled())
""")


@pytest.fixture(scope="module")
def folder(tmp_path_factory, smoke_run):
    return smoke_export(tmp_path_factory, smoke_run)


@pytest.fixture(scope="module")
def paths(smoke_run):
    found = smoke_test_images(smoke_run, 10)
    assert len(found) == 10
    return found


@pytest.fixture(scope="module")
def reference(folder, paths):
    """The JAX runtime's prediction for the 10 test images."""
    det = Detector.load(folder, runtime="jax")
    assert det.runtime == "jax"
    return det.predict(paths)


def test_runtime_names_and_where_they_apply(tmp_path):
    assert runtimes.resolve("auto", str(tmp_path)) == "jax"  # JAX is installed in the test environment
    with pytest.raises(UserError, match="'tensorrt' is not one of auto, jax, onnx, openvino"):
        runtimes.resolve("tensorrt", str(tmp_path))
    with pytest.raises(UserError, match="reads an export folder, not a training run"):
        runtimes.resolve("onnx", None)
    with pytest.raises(UserError, match="no model.onnx"):
        runtimes.OnnxRuntimeModel(str(tmp_path), {"inference": {"t_big": 3}})


def test_a_fixed_batch_model_gets_padded_chunks():
    seen = []

    def call(images, class_ids):  # a model whose batch is fixed at 4
        assert images.shape[0] == 4 and class_ids.shape == (4,)
        seen.append(class_ids.copy())
        return images[..., 0] + class_ids[:, None, None], images.mean(axis=(1, 2, 3)) + class_ids

    images = np.random.default_rng(0).uniform(-1, 1, (6, 2, 2, 3)).astype(np.float32)
    ids = np.arange(6, dtype=np.int32)
    maps, scores = runtimes.run_in_chunks(call, images, ids, 4)
    assert maps.shape == (6, 2, 2) and scores.shape == (6,)
    np.testing.assert_allclose(scores, images.mean(axis=(1, 2, 3)) + ids, rtol=1e-6)
    np.testing.assert_array_equal(seen[1], [4, 5, 5, 5])  # the last chunk repeats its last image


def test_onnx_runtime_detector_scores_a_batch_of_10_like_jax(folder, paths, reference):
    det = Detector.load(folder, runtime="onnx")
    assert det.runtime == "onnx" and det._model.batch is None  # a dynamic batch: one call for all 10
    out = det.predict(paths)
    assert out.scores.shape == (10,)
    np.testing.assert_allclose(out.scores, reference.scores, atol=1e-5)
    for a, b in zip(out.anomaly_maps, reference.anomaly_maps):
        np.testing.assert_allclose(a, b, atol=1e-4)
    np.testing.assert_array_equal(out.labels, reference.labels)
    np.testing.assert_array_equal(out.denoise_steps, reference.denoise_steps)


def test_predict_and_serve_run_without_jax(folder, paths, reference, tmp_path):
    images = tmp_path / "incoming"
    images.mkdir()
    for i, p in enumerate(paths[:4]):
        shutil.copy(p, images / f"{i}_{os.path.basename(p)}")
    script = NO_JAX + textwrap.dedent(f"""
        import json
        from fastapi.testclient import TestClient
        from diff_fastener_jax import Detector
        from diff_fastener_jax.deploy.service import create_app

        det = Detector.load({str(folder)!r})  # auto: JAX is missing, so ONNX Runtime
        with open({paths[0]!r}, "rb") as f:
            answer = TestClient(create_app(det)).post("/predict", files={{"file": ("a.png", f, "image/png")}})
        print("SERVE", json.dumps({{"runtime": det.runtime, "status": answer.status_code,
                                    "score": answer.json().get("score")}}))
        sys.argv = ["diff-fastener", "predict", "--model", {str(folder)!r}, "--images", {str(images)!r},
                    "--out", {str(tmp_path / "out")!r}]
        from diff_fastener_jax.__main__ import console_main
        sys.exit(console_main())
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = json.loads(re.search(r"^SERVE (.*)$", proc.stdout, re.M).group(1))
    assert served["runtime"] == "onnx" and served["status"] == 200
    assert abs(served["score"] - float(reference.scores[0])) < 1e-4
    with open(tmp_path / "out" / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    for row in rows:
        i = int(os.path.basename(row["path"]).split("_")[0])
        assert abs(float(row["score"]) - float(reference.scores[i])) < 1e-4, row


def _docs_example(heading: str) -> str:
    """The first ```python block below `heading` in docs/deployment.md."""
    with open(os.path.join(ROOT, "docs", "deployment.md")) as f:
        text = f.read()
    section = text[text.index(heading) :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_stablehlo_example_in_the_docs_runs_without_the_package(folder, paths, reference, tmp_path):
    det = Detector.load(folder, runtime="onnx")  # preprocessing only
    np.save(tmp_path / "images.npy", det.preprocess(paths[:3]))
    code = _docs_example("## StableHLO without the package") + textwrap.dedent("""
        assert not any(m.startswith("diff_fastener_jax") for m in sys.modules)
        print("SCORES", json.dumps(np.asarray(score).tolist()))
    """)
    env = subprocess_env()
    env["PYTHONPATH"] = ""  # only the installed packages; the example must not need this checkout
    proc = subprocess.run(
        [sys.executable, "-c", code, str(folder), str(tmp_path / "images.npy")],
        cwd=str(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = json.loads(re.search(r"^SCORES (.*)$", proc.stdout, re.M).group(1))
    np.testing.assert_allclose(scores, reference.scores[:3], atol=1e-5)


@pytest.fixture(scope="module")
def unified(tmp_path_factory):
    """A two-category model (untrained, perturbed weights) as model.onnx, with the JAX program's outputs
    for 10 images of both categories."""
    import jax

    from diff_fastener_jax.models import init_params

    config = tiny_config(**{"data.category": "fastener,fastener_bar"})
    params = perturbed(jax.tree_util.tree_map(np.asarray, init_params(config, jax.random.key(0))), seed=1)
    folder = str(tmp_path_factory.mktemp("unified_onnx"))
    facts = export.export_onnx(config, params, os.path.join(folder, export.ONNX_FILE))
    images = np.random.default_rng(2).uniform(-1, 1, (10, 32, 32, 3)).astype(np.float32)
    ids = (np.arange(10) % 2).astype(np.int32)
    ref = [np.asarray(o) for o in jax.jit(export.map_and_score_program(config))(params, images, ids)]
    return folder, facts, images, ids, ref, {"inference": {"t_big": int(config.diffusion.eval_t_big)}}


def test_unified_model_onnx_takes_class_ids(unified):
    folder, facts, images, ids, (ref_map, ref_score), record = unified
    assert facts["batch"] == "dynamic B" and "class_ids int32 (B,)" in facts["inputs"][1]
    model = runtimes.OnnxRuntimeModel(folder, record)
    assert model.takes_class_ids
    amap, score, steps = model(images, ids)
    np.testing.assert_allclose(amap, ref_map, atol=1e-4)
    np.testing.assert_allclose(score, ref_score, atol=1e-5)
    assert (steps == record["inference"]["t_big"]).all()
    other, _, _ = model(images, 1 - ids)  # the class ids change the result
    assert np.abs(other - amap).max() > 1e-4
    with pytest.raises(ValueError, match="takes class ids"):
        model(images)


def test_export_formats_are_checked():
    assert export.check_formats("stablehlo, onnx,openvino") == ("stablehlo", "onnx", "openvino")
    with pytest.raises(UserError, match="unknown format 'tflite'"):
        export.check_formats("stablehlo,tflite")
    with pytest.raises(UserError, match="converted from the ONNX file"):
        export.check_formats("stablehlo,openvino")


@needs_openvino
def test_openvino_ir_scores_like_jax(folder, paths, reference, tmp_path):
    copy = shutil.copytree(folder, tmp_path / "export")
    facts = export.export_openvino(str(copy))
    assert os.path.isfile(copy / "model.xml") and os.path.isfile(copy / "model.bin")
    assert facts["files"] == ["model.xml", "model.bin"]
    det = Detector.load(str(copy), runtime="openvino")
    assert det.runtime == "openvino" and det._model.batch is None
    out = det.predict(paths)
    np.testing.assert_allclose(out.scores, reference.scores, atol=1e-3)


@needs_openvino
def test_openvino_unified_model(unified):
    folder, _, images, ids, (ref_map, ref_score), record = unified
    model = runtimes.OpenVinoModel(folder, record)  # model.onnx, converted when loaded
    amap, score, _ = model(images, ids)
    np.testing.assert_allclose(score, ref_score, atol=1e-3)
    np.testing.assert_allclose(amap, ref_map, atol=1e-2)


def test_deploy_benchmark_compares_runtimes_on_an_export(folder, tmp_path):
    out = tmp_path / "record.json"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "deploy.py"),
            "--model",
            str(folder),
            "--batches",
            "2",
            "--repeats",
            "1",
            "--runtimes",
            "jax,onnx",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| jax |" in proc.stdout and "| onnx |" in proc.stdout
    with open(out) as f:
        record = json.load(f)
    assert record["runtimes"] == ["jax", "onnx"] and record["input"]["height"] == 32
    for name in ("jax", "onnx"):
        row = record["results"][name]["2"]
        assert row["max_abs_score_diff_vs_jax"] <= 1e-3 and row["images_per_s"] > 0
    assert record["fastest"]["2"] in ("jax", "onnx")
