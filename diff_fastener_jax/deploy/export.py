"""Exporting a trained run as a self-contained folder: StableHLO program, ONNX model, parameters, detector.json."""

from __future__ import annotations

import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np

from diff_fastener_jax.config import class_names
from diff_fastener_jax.deploy import detector as api  # noqa
from diff_fastener_jax.deploy import threshold as D
from diff_fastener_jax.errors import UserError
from diff_fastener_jax.inference import make_infer_program, model_image_shape

STABLEHLO_FILE = "model.stablehlo"


ONNX_FILE = "model.onnx"


ONNX_INPUT, ONNX_OUTPUTS = "images", ("anomaly_map", "score")


# Platforms model.stablehlo is lowered for (it then runs on either without the Python model code).
EXPORT_PLATFORMS = ("cpu", "cuda")


def map_and_score_program(config, *, fuse_passes: bool = True):
    """`f(params, images[, class_ids]) -> (anomaly_map (N, H, W), score (N,))`: what both exported files
    compute (class_ids (N,) int32 only for a unified multi-category model, `config.class_names` order)."""
    infer = make_infer_program(config, fuse_passes=fuse_passes)

    def f(params, images, *class_ids):
        out = infer(params, images, *class_ids)
        return out.anomaly_map, out.score

    return f


def export_stablehlo(config, params, platforms=EXPORT_PLATFORMS) -> tuple[bytes, dict]:
    """(serialised jax.export.Exported, facts) of (params, images[N symbolic]) -> (anomaly_map, score)."""
    h, w, c = model_image_shape(config)
    param_specs = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), params)
    (n,) = jax.export.symbolic_shape("N")
    args = [jax.ShapeDtypeStruct((n, h, w, c), jnp.float32)]
    inputs = "(params pytree of params.npz, images float32 (N, H, W, 3)"
    if class_names(config):
        args.append(jax.ShapeDtypeStruct((n,), jnp.int32))
        inputs += f", class_ids int32 (N,): index into {class_names(config)}"
    fn = jax.jit(map_and_score_program(config))
    try:
        exp = jax.export.export(fn, platforms=platforms)(param_specs, *args)
    except Exception:  # noqa: BLE001 - a platform this JAX cannot lower for: fall back to the local one
        platforms = (jax.default_backend(),)
        exp = jax.export.export(fn, platforms=platforms)(param_specs, *args)
    return bytes(exp.serialize()), {"batch": "symbolic N", "platforms": list(exp.platforms),
                                    "inputs": inputs + ")",
                                    "outputs": "(anomaly_map float32 (N, H, W), score float32 (N,))"}


def load_stablehlo(folder: str):
    """`f(images) -> (anomaly_map, score)` running the folder's model.stablehlo on its params.npz."""
    with open(os.path.join(folder, STABLEHLO_FILE), "rb") as fh:
        exp = jax.export.deserialize(bytearray(fh.read()))
    params = jax.device_put(api.load_params(os.path.join(folder, api.PARAMS_FILE)))
    call = jax.jit(exp.call)  # compiled once per batch size, like the in-process program
    if len(exp.in_avals) > len(jax.tree_util.tree_leaves(params)) + 1:  # a unified model: class ids too
        return lambda images, class_ids: call(params, jnp.asarray(images, jnp.float32), jnp.asarray(class_ids, jnp.int32))
    return lambda images: call(params, jnp.asarray(images, jnp.float32))


def export_onnx(config, params, path: str, batch: int = 1) -> dict:
    """Writes model.onnx (parameters embedded as constants) for a FIXED batch of `batch` images.

    jax2onnx 0.17.1 cannot give the segmentation net's bilinear upsampling a symbolic batch size, so
    the ONNX batch is fixed: pad a short batch with copies of its last image (`onnx_predict` does).
    """
    from jax2onnx import to_onnx

    h, w, c = model_image_shape(config)
    if class_names(config):
        raise UserError("ONNX export of a unified multi-category model is not supported yet",
                        hint="use model.stablehlo (it takes class_ids), or pass --noonnx")
    program = map_and_score_program(config, fuse_passes=False)
    const = jax.tree_util.tree_map(jnp.asarray, params)
    to_onnx(lambda images: program(const, images), inputs=[(batch, h, w, c)], model_name="diff_fastener",
            input_names=[ONNX_INPUT], output_names=list(ONNX_OUTPUTS), return_mode="file", output_path=path)
    import onnx

    return {"opset": int(onnx.load(path, load_external_data=False).opset_import[0].version), "batch": batch,
            "input": f"{ONNX_INPUT} float32 ({batch}, {h}, {w}, {c}) in [-1, 1] (fixed batch: pad short ones)",
            "outputs": f"{ONNX_OUTPUTS[0]} float32 ({batch}, {h}, {w}); {ONNX_OUTPUTS[1]} float32 ({batch},)"}


def onnx_session(folder: str):
    """An onnxruntime session on the folder's model.onnx (CPU)."""
    import onnxruntime as ort

    return ort.InferenceSession(os.path.join(folder, ONNX_FILE), providers=["CPUExecutionProvider"])


def onnx_predict(session, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(anomaly_map (N, H, W), score (N,)) from an onnxruntime session, any N: chunks of the model's fixed
    batch, the last one padded with copies of its last image."""
    b = session.get_inputs()[0].shape[0]
    maps, scores = [], []
    for i0 in range(0, images.shape[0], b):
        chunk = np.asarray(images[i0:i0 + b], np.float32)
        n = chunk.shape[0]
        if n < b:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], b - n, 0)])
        amap, score = session.run(list(ONNX_OUTPUTS), {ONNX_INPUT: chunk})
        maps.append(amap[:n])
        scores.append(score[:n])
    return np.concatenate(maps), np.concatenate(scores)


def export_run(workdir: str, out: str, *, checkpoint: int | None = None, onnx: bool = True, onnx_batch: int = 1,
               log=print) -> dict:
    """Writes the export folder `out` for the run in `workdir`; returns its detector record."""
    from diff_fastener_jax.training.run_loading import load_run_config, load_run_params

    config = load_run_config(workdir)
    params, step = load_run_params(workdir, config, checkpoint)
    params = D.host_params(params)
    threshold = D.stored_threshold(workdir, step, config) or D.calibrate(config, params)
    record = D.detector_record(config, threshold, step)
    if os.path.abspath(out) == os.path.abspath(workdir):
        raise UserError("--out must differ from --workdir")
    os.makedirs(out, exist_ok=True)
    t = time.perf_counter()
    blob, record["stablehlo"] = export_stablehlo(config, params)
    with open(os.path.join(out, STABLEHLO_FILE), "wb") as fh:
        fh.write(blob)
    log(f"wrote {STABLEHLO_FILE} ({len(blob) / 1e6:.1f} MB, {time.perf_counter() - t:.1f} s)")
    if onnx and class_names(config):
        record["onnx"] = {"skipped": "ONNX export of a unified multi-category model is not supported yet "
                                     "(model.stablehlo takes the class ids)"}
        log(f"model.onnx skipped: {record['onnx']['skipped']}")
        onnx = False
    if onnx:
        t = time.perf_counter()
        try:
            record["onnx"] = export_onnx(config, params, os.path.join(out, ONNX_FILE), onnx_batch)
            log(f"wrote {ONNX_FILE} ({time.perf_counter() - t:.1f} s)")
        except Exception as e:  # noqa: BLE001 - e.g. a loop jax2onnx cannot convert (infer.method=adaptive)
            if os.path.exists(os.path.join(out, ONNX_FILE)):
                os.remove(os.path.join(out, ONNX_FILE))
            record["onnx"] = {"skipped": f"jax2onnx could not convert infer.method={config.infer.method!r}: "
                                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
            log(f"model.onnx skipped (model.stablehlo is complete): {record['onnx']['skipped']}")
    api.save_params(os.path.join(out, api.PARAMS_FILE), params)
    shutil.copyfile(os.path.join(workdir, api.CONFIG_FILE), os.path.join(out, api.CONFIG_FILE))
    D.write(os.path.join(out, D.DETECTOR_FILE), record)
    log(f"wrote {api.PARAMS_FILE}, {api.CONFIG_FILE}, {D.DETECTOR_FILE} -> {out}")
    return record
