"""Exporting a trained run as a self-contained folder: StableHLO program, ONNX model, parameters, detector.json."""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from diff_fastener_jax.config import class_names
from diff_fastener_jax.deploy import detector as api  # noqa
from diff_fastener_jax.deploy import normal_map, runtimes
from diff_fastener_jax.deploy import threshold as D
from diff_fastener_jax.errors import UserError
from diff_fastener_jax.inference import make_infer_program, model_image_shape

STABLEHLO_FILE = "model.stablehlo"


ONNX_FILE = runtimes.ONNX_FILE


ONNX_INPUT, ONNX_OUTPUTS = runtimes.ONNX_INPUTS[0], runtimes.ONNX_OUTPUTS

# What `export --formats` may name; params.npz, config.json and detector.json are always written.
EXPORT_FORMATS = ("stablehlo", "onnx", "openvino")
DEFAULT_FORMATS = ("stablehlo", "onnx")


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
    return bytes(exp.serialize()), {
        "batch": "symbolic N",
        "platforms": list(exp.platforms),
        "inputs": inputs + ")",
        "outputs": "(anomaly_map float32 (N, H, W), score float32 (N,))",
        "params": param_layout(params),
    }


def param_layout(params) -> list[dict]:
    """The parameters in the order model.stablehlo takes them (its first inputs, `jax.tree_util` order):
    [{"name": the params.npz key, "shape", "dtype"}]. With `jax.tree_util.tree_unflatten(exp.in_tree,
    [npz[p["name"]] for p in layout] + [images])` a caller rebuilds the arguments without this package."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    return [
        {
            "name": "/".join(str(getattr(k, "key", k)) for k in path),
            "shape": list(np.shape(x)),
            "dtype": str(np.asarray(x).dtype),
        }
        for path, x in leaves
    ]


def load_stablehlo(folder: str):
    """`f(images) -> (anomaly_map, score)` running the folder's model.stablehlo on its params.npz."""
    with open(os.path.join(folder, STABLEHLO_FILE), "rb") as fh:
        exp = jax.export.deserialize(bytearray(fh.read()))
    params = jax.device_put(api.load_params(os.path.join(folder, api.PARAMS_FILE)))
    call = jax.jit(exp.call)  # compiled once per batch size, like the in-process program
    if len(exp.in_avals) > len(jax.tree_util.tree_leaves(params)) + 1:  # a unified model: class ids too
        return lambda images, class_ids: call(
            params, jnp.asarray(images, jnp.float32), jnp.asarray(class_ids, jnp.int32)
        )
    return lambda images: call(params, jnp.asarray(images, jnp.float32))


def export_onnx(config, params, path: str, batch: int | None = None) -> dict:
    """Writes model.onnx (parameters embedded as constants): inputs `images` float32 (B, H, W, 3) in
    [-1, 1] and, for a unified multi-category model, `class_ids` int32 (B,); outputs `anomaly_map`
    (B, H, W) and `score` (B,). B is symbolic (any batch) unless `batch` fixes it."""
    import logging

    from jax2onnx import to_onnx

    logging.getLogger("onnx_ir.serde").setLevel(logging.ERROR)  # one line per shape constant otherwise
    h, w, c = model_image_shape(config)
    (sym,) = jax.export.symbolic_shape("B")
    b = sym if not batch else int(batch)
    specs = [jax.ShapeDtypeStruct((b, h, w, c), jnp.float32)]
    unified = bool(class_names(config))
    if unified:
        specs.append(jax.ShapeDtypeStruct((b,), jnp.int32))
    program = map_and_score_program(config, fuse_passes=False)
    const = jax.tree_util.tree_map(jnp.asarray, params)
    to_onnx(
        lambda images, *class_ids: program(const, images, *class_ids),
        inputs=specs,
        model_name="diff_fastener",
        input_names=list(runtimes.ONNX_INPUTS[: len(specs)]),
        output_names=list(ONNX_OUTPUTS),
        return_mode="file",
        output_path=path,
    )
    import onnx

    dim = "B" if not batch else str(batch)
    inputs = [f"{ONNX_INPUT} float32 ({dim}, {h}, {w}, {c}) in [-1, 1]"]
    if unified:
        inputs.append(f"{runtimes.ONNX_INPUTS[1]} int32 ({dim},): index into {class_names(config)}")
    # jax2onnx keeps a large model's weights in a `<name>.data` file beside it (ONNX external data).
    files = [os.path.basename(p) for p in (path, path + ".data") if os.path.exists(p)]
    return {
        "opset": int(onnx.load(path, load_external_data=False).opset_import[0].version),
        "files": files,
        "batch": "dynamic B" if not batch else int(batch),
        "inputs": inputs,
        "outputs": f"{ONNX_OUTPUTS[0]} float32 ({dim}, {h}, {w}); {ONNX_OUTPUTS[1]} float32 ({dim},)",
    }


def onnx_session(folder: str):
    """An onnxruntime InferenceSession on the folder's model.onnx (CPU)."""
    import onnxruntime as ort

    return ort.InferenceSession(os.path.join(folder, ONNX_FILE), providers=["CPUExecutionProvider"])


def onnx_predict(runtime, images: np.ndarray, class_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(anomaly_map (N, H, W), score (N,)) from `runtime`, an onnxruntime InferenceSession (`onnx_session`), any N: one call
    for a dynamic batch; chunks of a fixed batch, the last one padded with copies of its last image.
    `class_ids` int32 (N,) for a unified multi-category model."""
    b = runtime.get_inputs()[0].shape[0]

    def call(chunk, ids):
        feed = {ONNX_INPUT: chunk} | ({} if ids is None else {runtimes.ONNX_INPUTS[1]: ids})
        return runtime.run(list(ONNX_OUTPUTS), feed)

    return runtimes.run_in_chunks(call, images, class_ids, b if isinstance(b, int) else None)


def export_openvino(folder: str) -> dict:
    """Writes model.xml/model.bin (OpenVINO IR) converted from the folder's model.onnx."""
    return runtimes.convert_to_openvino(os.path.join(folder, ONNX_FILE), folder)


def check_out_folder(out: str, workdir: str, overwrite: bool) -> None:
    """Refuses an --out that is the run itself, a file, or a non-empty folder (unless `overwrite`)."""
    if os.path.abspath(out) == os.path.abspath(workdir):
        raise UserError("--out must differ from --workdir")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file, not a folder")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise UserError(
            f"--out {out} is not empty", hint="pass --overwrite to replace that folder whole, or choose a new --out"
        )


def _sibling(out: str, kind: str) -> str:
    """A fresh hidden folder next to `out` (same filesystem, so renames are atomic)."""
    parent, name = os.path.split(os.path.abspath(out))
    return tempfile.mkdtemp(prefix=f".{name}.{kind}-", dir=parent)


def publish(staging: str, out: str) -> None:
    """Moves the complete folder `staging` to `out`, replacing whatever `out` held as a whole.

    A directory cannot be renamed over a non-empty one, so the old folder first moves aside; a crash
    between the two renames leaves no `out` (never a mixture of two exports).
    """
    old = None
    if os.path.isdir(out):
        old = _sibling(out, "old")
        os.rename(out, os.path.join(old, "export"))
    os.rename(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_formats(formats) -> tuple[str, ...]:
    """`formats` (names of EXPORT_FORMATS, or one comma-separated string) as a tuple; UserError otherwise."""
    names = [f.strip() for f in (formats.split(",") if isinstance(formats, str) else formats) if f.strip()]
    unknown = [f for f in names if f not in EXPORT_FORMATS]
    if unknown or not names:
        raise UserError(
            f"--formats {','.join(names) or '(empty)'}: "
            + (f"unknown format {unknown[0]!r}" if unknown else "no format"),
            hint=f"choose from {','.join(EXPORT_FORMATS)}, e.g. --formats {','.join(DEFAULT_FORMATS)}",
        )
    if "openvino" in names and "onnx" not in names:
        raise UserError(
            "--formats: openvino is converted from the ONNX file; add onnx", hint="--formats stablehlo,onnx,openvino"
        )
    return tuple(dict.fromkeys(names))


def export_run(
    workdir: str,
    out: str,
    *,
    checkpoint: int | None = None,
    onnx: bool = True,
    onnx_batch: int | None = None,
    formats=DEFAULT_FORMATS,
    overwrite: bool = False,
    log=print,
) -> dict:
    """Writes the export folder `out` for the run in `workdir`; returns its detector record.

    `formats` (EXPORT_FORMATS): the programs to write; `onnx=False` drops onnx (and openvino) from
    them. `onnx_batch` fixes model.onnx's batch size (default: dynamic).

    Everything is written into a hidden sibling folder that is renamed to `out` once complete, so an
    interrupted export (even kill -9) leaves either no `out` or the previous complete one. A non-empty
    `out` is refused unless `overwrite`, which replaces it whole (no file of an older export survives).
    """
    from diff_fastener_jax.training.run_loading import load_run_config, load_run_params

    check_out_folder(out, workdir, overwrite)
    formats = tuple(f for f in check_formats(formats) if onnx or f not in ("onnx", "openvino"))
    if "openvino" in formats and not runtimes.installed("openvino"):
        raise UserError(
            "--formats openvino: the openvino package is not installed",
            hint="pip install 'diff-fastener-jax[openvino]'",
        )
    config = load_run_config(workdir)
    params, step = load_run_params(workdir, config, checkpoint)
    params = D.host_params(params)
    threshold = D.stored_threshold(workdir, step, config)
    if normal_map.missing(config, params):
        threshold = None  # the normal map is fitted with the threshold: both afresh
    if threshold is not None:  # the exported programs compute in this process's dtype
        D.check_threshold_dtype(threshold, config, f"{workdir}/{D.DETECTOR_FILE}")
    else:
        threshold, fitted = D.calibrate(config, params)
        if fitted is not None:  # travels in params.npz and inside both programs
            params = normal_map.attach(params, fitted)
    record = D.detector_record(config, threshold, step)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    for leftover in glob.glob(
        os.path.join(os.path.dirname(os.path.abspath(out)), f".{os.path.basename(os.path.abspath(out))}.*-*")
    ):
        shutil.rmtree(leftover, ignore_errors=True)  # what an earlier, killed export left behind
    staging = _sibling(out, "partial")
    try:
        _write_export(workdir, config, params, record, staging, formats, onnx_batch, log)
        publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"wrote {api.PARAMS_FILE}, {api.CONFIG_FILE}, {D.DETECTOR_FILE} -> {out}")
    return record


def _write_export(
    workdir: str, config, params, record: dict, out: str, formats: tuple[str, ...], onnx_batch: int | None, log
) -> None:
    """Every file of the export folder, into `out` (the staging folder); fills in `record`."""
    if "stablehlo" in formats:
        t = time.perf_counter()
        blob, record["stablehlo"] = export_stablehlo(config, params)
        with open(os.path.join(out, STABLEHLO_FILE), "wb") as fh:
            fh.write(blob)
        log(f"wrote {STABLEHLO_FILE} ({len(blob) / 1e6:.1f} MB, {time.perf_counter() - t:.1f} s)")
    if "onnx" in formats:
        t = time.perf_counter()
        try:
            record["onnx"] = export_onnx(config, params, os.path.join(out, ONNX_FILE), onnx_batch)
            log(f"wrote {ONNX_FILE} ({time.perf_counter() - t:.1f} s)")
        except Exception as e:  # noqa: BLE001 - e.g. a loop jax2onnx cannot convert (infer.method=adaptive)
            for leftover in (ONNX_FILE, ONNX_FILE + ".data"):
                if os.path.exists(os.path.join(out, leftover)):
                    os.remove(os.path.join(out, leftover))
            record["onnx"] = {
                "skipped": f"jax2onnx could not convert infer.method={config.infer.method!r}: "
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            }
            log(f"model.onnx skipped (model.stablehlo is complete): {record['onnx']['skipped']}")
    if "openvino" in formats:
        if os.path.exists(os.path.join(out, ONNX_FILE)):
            t = time.perf_counter()
            record["openvino"] = export_openvino(out)
            log(f"wrote {runtimes.OPENVINO_FILE}, {runtimes.OPENVINO_WEIGHTS} ({time.perf_counter() - t:.1f} s)")
        else:
            record["openvino"] = {"skipped": f"converted from {ONNX_FILE}, which was not written"}
    api.save_params(os.path.join(out, api.PARAMS_FILE), params)
    shutil.copyfile(os.path.join(workdir, api.CONFIG_FILE), os.path.join(out, api.CONFIG_FILE))
    D.write(os.path.join(out, D.DETECTOR_FILE), record)
