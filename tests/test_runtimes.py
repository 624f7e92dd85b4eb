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
from diff_fastener_jax.errors import TrainingStackMissing, UserError

HAS_OPENVINO = runtimes.installed("openvino")
needs_openvino = pytest.mark.skipif(
    not HAS_OPENVINO, reason="openvino is not installed (pip install 'diff-fastener-jax[openvino]')"
)

# Run first in a subprocess: JAX and the rest of the training stack (the `train` extra) become
# unimportable, as on an inspection PC that has only the `runtime` extra installed. Importing one of
# them raises what a missing package raises.
NO_JAX = textwrap.dedent("""
    import sys

    class _NotInstalled:
        def find_spec(self, name, path=None, target=None):
            top = name.split(".")[0]
            if top in ("jax", "jaxlib", "flax", "optax", "orbax", "grain", "sklearn", "scipy", "matplotlib"):
                raise ModuleNotFoundError(f"No module named {top!r}", name=top)

    sys.meta_path.insert(0, _NotInstalled())
""")
# What only the training stack installs, by distribution name (the `train` extra).
TRAINING_DISTRIBUTIONS = {"jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "scikit-learn"}
TRAIN_EXTRA = "pip install 'diff-fastener-jax[train]'"


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


def _required(*extras: str) -> set[str]:
    """The distributions `pip install 'diff-fastener-jax[extras]'` asks for (canonical names), from the
    installed package's metadata, following its references to its own extras (dev -> train)."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    requirements = [Requirement(r) for r in requires("diff-fastener-jax")]
    todo, seen, names = [None, *extras], set(), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for r in requirements:
            if (r.marker is None) if extra is None else (r.marker is not None and r.marker.evaluate({"extra": extra})):
                if canonicalize_name(r.name) == "diff-fastener-jax":
                    todo += sorted(r.extras)
                else:
                    names.add(canonicalize_name(r.name))
    return names


def test_the_runtime_extra_installs_no_training_stack():
    stale = "the installed metadata differs from pyproject.toml? pip install --no-deps -e ."
    base = _required()
    assert {"numpy", "pillow", "absl-py", "ml-collections"} <= base, stale
    for extras in ((), ("runtime",), ("runtime", "serve"), ("openvino",)):
        assert not _required(*extras) & TRAINING_DISTRIBUTIONS, (extras, stale)
    assert "onnxruntime" in _required("runtime") and "onnxruntime" not in base
    for extras in (("train",), ("dev",), ("cuda12",), ("export",)):
        assert {"jax", "flax", "optax", "orbax-checkpoint"} <= _required(*extras), (extras, stale)


def _run_without_jax(args: list[str], tmp_path, *, module: str | None = None):
    """`diff-fastener args...` (or `python -m <module> args...`) in a fresh interpreter without the
    training stack."""
    if module is None:
        run = "from diff_fastener_jax.__main__ import console_main\nsys.argv = ['diff-fastener', *sys.argv[1:]]\n"
        run += "sys.exit(console_main())\n"
    else:  # what `python -m` does
        run = f"import runpy\nrunpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n"
    return subprocess.run(
        [sys.executable, "-c", NO_JAX + run, *map(str, args)],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "command,module,args",
    [
        ("diff-fastener train", None, ["train", "--config", "configs/demo.py:smoke", "--workdir", "{run}"]),
        (
            "python -m diff_fastener_jax.train",
            "diff_fastener_jax.train",
            ["--config", "configs/demo.py:smoke", "--workdir", "{run}"],
        ),
        ("python -m diff_fastener_jax.export", "diff_fastener_jax.export", ["--workdir", "{run}", "--out", "{out}"]),
        ("diff-fastener models", None, ["models", "--config", "configs/demo.py:smoke"]),
        # a command that is a package's __main__: the package is imported before the command starts
        ("python -m diff_fastener_jax.models", "diff_fastener_jax.models", ["--config", "configs/demo.py:smoke"]),
    ],
    ids=["console", "module", "module-flags", "console-package", "module-package"],
)
def test_training_commands_without_jax_end_with_one_error_line(command, module, args, tmp_path):
    run, out = tmp_path / "run", tmp_path / "out"
    proc = _run_without_jax([a.format(run=run, out=out) for a in args], tmp_path, module=module)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [
        f"error: {command} needs the training stack (jax, flax, ...), and jax is not installed here: {TRAIN_EXTRA}"
    ]
    assert not run.exists() and not out.exists()


def test_only_a_missing_training_package_is_the_train_extra_error():
    found = TrainingStackMissing.from_import_error("diff-fastener x", ModuleNotFoundError("no flax", name="flax"))
    assert found.module == "flax" and str(found).endswith(TRAIN_EXTRA)
    for exc in (
        ModuleNotFoundError("a submodule of an installed jax: a bug", name="jax.nonexistent"),
        ModuleNotFoundError("not the training stack", name="fastapi"),
        ImportError("jax is broken"),
    ):
        assert TrainingStackMissing.from_import_error("diff-fastener x", exc) is None


def test_predict_on_a_training_run_without_jax_names_the_train_extra(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")  # a training run folder (not an export: no params.npz)
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(images / "a.png")
    proc = _run_without_jax(["predict", "--workdir", run, "--images", images, "--out", tmp_path / "out"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    error, hint = proc.stderr.splitlines()
    assert (
        error
        == f"error: scoring a training run needs the training stack (jax, flax, ...), and jax is not installed here: {TRAIN_EXTRA}"
    )
    assert hint.startswith("hint: or export it") and "--model FOLDER" in hint
    assert not (tmp_path / "out").exists()


# Messages of a pip that cannot reach the package index.
OFFLINE = re.compile(
    r"NewConnectionError|Failed to establish a new connection|NameResolutionError|Failed to resolve|"
    r"Name or service not known|Temporary failure in name resolution|Network is unreachable|No route to host|"
    r"ProxyError|ConnectTimeout|ReadTimeoutError|ConnectionError"
)


def test_runtime_extra_alone_scores_an_export_without_jax(folder, paths, reference, tmp_path):
    """`pip install 'diff-fastener-jax[runtime]'` into a fresh virtual environment (no system site
    packages), then `diff-fastener predict --model` there: no JAX, the JAX runtime's scores."""
    source = tmp_path / "source"  # the package alone: pip builds here, not in the checkout
    shutil.copytree(
        os.path.join(ROOT, "diff_fastener_jax"),
        source / "diff_fastener_jax",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), source / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    python = str(venv / "bin" / "python")
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            python,
            "install",
            "-q",
            "--no-compile",
            "--retries",
            "2",
            "--timeout",
            "60",
            f"{source}[runtime]",
        ],
        cwd=str(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    offline = install.returncode != 0 and OFFLINE.search(install.stderr + install.stdout)
    if offline:
        pytest.skip(f"pip cannot reach the package index to install '.[runtime]' (no network: {offline.group(0)})")
    assert install.returncode == 0, install.stderr[-3000:]

    probe = "import importlib.util as u, diff_fastener_jax as d; print(d.__file__, [m for m in ('jax', 'flax', 'optax', 'sklearn') if u.find_spec(m)])"
    proc = subprocess.run(
        [python, "-c", probe], cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    where, found = proc.stdout.split(" ", 1)
    assert where.startswith(str(venv)) and found.strip() == "[]", proc.stdout

    images = tmp_path / "incoming"
    images.mkdir()
    for i, p in enumerate(paths):
        shutil.copy(p, images / f"{i}_{os.path.basename(p)}")
    command = [
        str(venv / "bin" / "diff-fastener"),
        "predict",
        "--model",
        str(folder),
        "--images",
        str(images),
        "--out",
        str(tmp_path / "out"),
    ]
    proc = subprocess.run(command, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "out" / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(paths)
    for row in rows:
        i = int(os.path.basename(row["path"]).split("_")[0])
        assert abs(float(row["score"]) - float(reference.scores[i])) < 1e-4, row
    proc = subprocess.run(
        [
            str(venv / "bin" / "diff-fastener"),
            "train",
            "--config",
            os.path.join(ROOT, "configs", "demo.py:smoke"),
            "--workdir",
            str(tmp_path / "run"),
        ],
        cwd=str(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error: diff-fastener train needs the training stack")
    assert not (tmp_path / "run").exists()


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


@pytest.mark.parametrize("separate", [False, True], ids=["round_robin", "separate"])
def test_deploy_benchmark_compares_runtimes_on_an_export(folder, tmp_path, separate):
    out, scores_dir = tmp_path / "record.json", tmp_path / "scores"
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
            "--scores-dir",
            str(scores_dir),
            *(["--separate"] if separate else []),
        ],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("| jax |") == 1 and proc.stdout.count("| onnx |") == 1
    with open(out) as f:
        record = json.load(f)
    assert record["runtimes"] == ["jax", "onnx"] and record["input"]["height"] == 32
    assert record.get("separate_processes", False) is separate
    jax_scores, onnx_scores = (np.load(scores_dir / f"{name}_batch2.npy") for name in ("jax", "onnx"))
    assert jax_scores.shape == (2,) and onnx_scores.shape == (2,)
    assert record["results"]["jax"]["2"]["max_abs_score_diff_vs_jax"] == 0.0
    row = record["results"]["onnx"]["2"]  # the diff is the parent's, from both processes' saved scores
    assert row["max_abs_score_diff_vs_jax"] == pytest.approx(float(np.abs(onnx_scores - jax_scores).max()))
    assert row["max_abs_score_diff_vs_jax"] <= 1e-3
    for name in ("jax", "onnx"):
        assert record["results"][name]["2"]["images_per_s"] > 0
    assert record["fastest"]["2"] in ("jax", "onnx")


def test_deploy_benchmark_separate_checks_scores_in_the_parent(folder, tmp_path):
    # The children measure with the default tolerance; only the parent's comparison of their saved
    # scores sees this one (the smoke model's runtimes agree exactly, so it takes a negative bound).
    out = tmp_path / "record.json"
    script = os.path.join(ROOT, "benchmarks", "deploy.py")
    flags = ["--batches", "2", "--repeats", "1", "--runtimes", "jax", "--separate", "--tolerance", "-1"]
    proc = subprocess.run(
        [sys.executable, script, "--model", str(folder), *flags, "--out", str(out)],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert "error: jax scores differ from JAX's by 0.00e+00 > -1 at batch 2" in proc.stderr
    assert "jax: measuring in a child process" in proc.stderr and not out.exists()
