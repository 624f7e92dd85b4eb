"""The programs that score a preprocessed batch: in-process JAX, ONNX Runtime or OpenVINO.

Every one is a callable `model(images, class_ids=None) -> (anomaly_map (N, H, W), score (N,),
denoise_step (N,))` on numpy arrays, images float32 (N, H, W, 3) in [-1, 1], class_ids int32 (N,) for
a unified multi-category model. `Detector.load(path, runtime=...)` picks one:

  "jax"       the jitted inference program on params.npz (or a training run's checkpoint)
  "onnx"      model.onnx in an onnxruntime InferenceSession (CPU): needs neither JAX nor Flax
  "openvino"  model.xml/model.bin (else model.onnx, converted when loaded) compiled by OpenVINO for CPU
  "auto"      "jax" where JAX and Flax import, else "onnx" where onnxruntime does and the folder has
              model.onnx, else "openvino"

This module imports no JAX at module level: the "onnx" and "openvino" paths run on a machine that has
only numpy, pillow and onnxruntime (or openvino) installed.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np

from diff_fastener_jax.errors import TRAIN_EXTRA, TrainingStackMissing, UserError

RUNTIMES = ("auto", "jax", "onnx", "openvino")
# The --runtime flag's help, for every command that takes it (predict, serve)
RUNTIME_FLAG_HELP = (
    "what scores the images: jax, onnx (model.onnx in onnxruntime), openvino, or auto (JAX if installed, "
    "else ONNX Runtime, else OpenVINO)"
)
ONNX_FILE = "model.onnx"
OPENVINO_FILE, OPENVINO_WEIGHTS = "model.xml", "model.bin"
ONNX_INPUTS = ("images", "class_ids")  # class_ids only for a unified multi-category model
ONNX_OUTPUTS = ("anomaly_map", "score")
# OpenVINO's CPU plugin defaults to bfloat16 arithmetic where the CPU has it; float32 keeps its scores
# within 1e-3 of JAX's (bfloat16 moved the smoke model's scores by about 2e-3).
OPENVINO_PRECISION = "f32"

# What each runtime imports, and the extra that installs it.
_MODULES = {"jax": ("jax", "flax"), "onnx": ("onnxruntime",), "openvino": ("openvino",)}
_EXTRAS = {
    "jax": TRAIN_EXTRA,
    "onnx": "pip install 'diff-fastener-jax[runtime]'",
    "openvino": "pip install 'diff-fastener-jax[openvino]'",
}


def installed(runtime: str) -> bool:
    """Whether `runtime`'s Python packages can be imported here (without importing them)."""
    return _first_missing(runtime) is None


def _first_missing(runtime: str) -> str | None:
    """The first of `runtime`'s modules that cannot be imported here (found without importing), or None."""
    for module in _MODULES[runtime]:
        try:
            if importlib.util.find_spec(module) is None:
                return module
        except (ImportError, ValueError):
            return module
    return None


def resolve(runtime: str, folder: str | None) -> str:
    """The concrete runtime ("jax", "onnx" or "openvino") for `runtime` (one of RUNTIMES) on the export
    folder `folder` (None: a training run, which only JAX reads). UserError when it cannot run here."""
    if runtime not in RUNTIMES:
        raise UserError(f"runtime {runtime!r} is not one of {', '.join(RUNTIMES)}")
    missing_jax = _first_missing("jax")
    if folder is None and runtime in ("auto", "jax") and missing_jax:
        raise TrainingStackMissing(
            "scoring a training run",
            missing_jax,
            hint="or export it where JAX is installed (diff-fastener export --workdir RUN --out FOLDER) "
            "and score that folder: --model FOLDER",
        )
    if runtime == "auto":
        if not missing_jax:
            return "jax"
        has_onnx = folder is not None and os.path.isfile(os.path.join(folder, ONNX_FILE))
        has_ir = folder is not None and os.path.isfile(os.path.join(folder, OPENVINO_FILE))
        if has_onnx and installed("onnx"):
            return "onnx"
        if (has_ir or has_onnx) and installed("openvino"):
            return "openvino"
        raise UserError(
            f"{folder}: no runtime can score it here: JAX is not installed, and neither onnxruntime with "
            f"{ONNX_FILE} nor openvino with {OPENVINO_FILE} or {ONNX_FILE} is available",
            hint=f"{_EXTRAS['onnx']} (for an export with --formats stablehlo,onnx), or {TRAIN_EXTRA}",
        )
    if not installed(runtime):
        raise UserError(f"runtime {runtime!r} is not installed here", hint=_EXTRAS[runtime])
    if folder is None and runtime != "jax":
        raise UserError(
            f"runtime {runtime!r} reads an export folder, not a training run",
            hint="export the run first: diff-fastener export --workdir RUN --out FOLDER",
        )
    return runtime


def load(runtime: str, folder: str, record: dict):
    """The model of the export folder `folder` for the concrete non-JAX `runtime` ("onnx", "openvino")."""
    if runtime == "onnx":
        return OnnxRuntimeModel(folder, record)
    if runtime == "openvino":
        return OpenVinoModel(folder, record)
    raise ValueError(f"load: runtime {runtime!r} is not an exported-file runtime")


def _fixed_step(record: dict) -> int:
    """The diffusion step every reconstruction of an exported model starts from: the exported programs
    are the fixed-step methods (the adaptive method's loop has no ONNX conversion)."""
    return int(record["inference"]["t_big"])


def _missing(folder: str, name: str, record: dict) -> UserError:
    skipped = (record.get("onnx") or {}).get("skipped")
    return UserError(
        f"{folder}: no {name}" + (f" ({skipped})" if skipped else ""),
        hint="export with --formats stablehlo,onnx (or ...,openvino), or use runtime='jax'",
    )


def run_in_chunks(call, images: np.ndarray, class_ids: np.ndarray | None, batch: int | None):
    """(anomaly_map (N, H, W), score (N,)) from `call(images, class_ids)`, in chunks of `batch` images
    (None: all at once), the last chunk padded with copies of its last image (a fixed-batch model)."""
    images = np.asarray(images, np.float32)
    n_all = images.shape[0]
    step = n_all if not batch else batch
    maps, scores = [], []
    for i0 in range(0, n_all, max(step, 1)):
        chunk = images[i0 : i0 + step]
        ids = None if class_ids is None else np.asarray(class_ids[i0 : i0 + step], np.int32)
        n = chunk.shape[0]
        if batch and n < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, 0)])
            ids = None if ids is None else np.concatenate([ids, np.repeat(ids[-1:], batch - n)])
        amap, score = call(chunk, ids)
        maps.append(np.asarray(amap)[:n])
        scores.append(np.asarray(score)[:n])
    return np.concatenate(maps), np.concatenate(scores)


class _ExportedModel:
    """What the ONNX Runtime and OpenVINO models share: the class-id check, chunking, denoise steps."""

    runtime = ""
    takes_class_ids = False
    batch: int | None = None  # a fixed batch size, or None for a dynamic one

    def __init__(self, record: dict):
        self._step = _fixed_step(record)

    def _run(self, images: np.ndarray, class_ids: np.ndarray | None):
        raise NotImplementedError

    def __call__(self, images: np.ndarray, class_ids: np.ndarray | None = None):
        if self.takes_class_ids != (class_ids is not None):
            raise ValueError(f"this {self.runtime} model {'takes' if self.takes_class_ids else 'takes no'} class ids")
        maps, scores = run_in_chunks(self._run, images, class_ids, self.batch)
        return maps, scores, np.full(scores.shape, self._step, np.int32)


class OnnxRuntimeModel(_ExportedModel):
    """model.onnx in an onnxruntime CPU session."""

    runtime = "onnx"

    def __init__(self, folder: str, record: dict, *, threads: int | None = None):
        import onnxruntime as ort

        super().__init__(record)
        path = os.path.join(folder, ONNX_FILE)
        if not os.path.isfile(path):
            raise _missing(folder, ONNX_FILE, record)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        inputs = self.session.get_inputs()
        self.takes_class_ids = len(inputs) > 1
        self.batch = inputs[0].shape[0] if isinstance(inputs[0].shape[0], int) else None

    def _run(self, images, class_ids):
        feed = {ONNX_INPUTS[0]: images} | ({} if class_ids is None else {ONNX_INPUTS[1]: class_ids})
        return self.session.run(list(ONNX_OUTPUTS), feed)


def convert_to_openvino(onnx_path: str, out_folder: str) -> dict:
    """Writes model.xml/model.bin (OpenVINO IR, float32 weights) converted from the ONNX file.

    Reads the ONNX file with OpenVINO's ONNX frontend (`Core.read_model`), the reader
    `openvino.convert_model` uses for ONNX: convert_model also sends usage telemetry from a forked
    process, and forking a process that runs JAX's threads can deadlock it."""
    import openvino as ov

    model = ov.Core().read_model(onnx_path)
    ov.save_model(model, os.path.join(out_folder, OPENVINO_FILE), compress_to_fp16=False)
    return {
        "version": ov.__version__,
        "files": [OPENVINO_FILE, OPENVINO_WEIGHTS],
        "from": os.path.basename(onnx_path),
        "inputs": [
            f"{p.get_any_name()} {p.get_element_type().get_type_name()} {p.get_partial_shape()}" for p in model.inputs
        ],
        "outputs": [p.get_any_name() for p in model.outputs],
    }


class OpenVinoModel(_ExportedModel):
    """model.xml (else model.onnx) compiled by OpenVINO for the CPU, float32 arithmetic."""

    runtime = "openvino"

    def __init__(self, folder: str, record: dict, *, precision: str = OPENVINO_PRECISION):
        import openvino as ov

        super().__init__(record)
        path = os.path.join(folder, OPENVINO_FILE)
        if not os.path.isfile(path):
            path = os.path.join(folder, ONNX_FILE)
        if not os.path.isfile(path):
            raise _missing(folder, f"{OPENVINO_FILE} or {ONNX_FILE}", record)
        self.compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": precision})
        names = [p.get_any_name() for p in self.compiled.inputs]
        self.takes_class_ids = ONNX_INPUTS[1] in names
        first = self.compiled.inputs[0].get_partial_shape()[0]
        self.batch = first.get_length() if first.is_static else None
        self._outputs = [self.compiled.output(name) for name in ONNX_OUTPUTS]

    def _run(self, images, class_ids):
        feed = {ONNX_INPUTS[0]: images} | ({} if class_ids is None else {ONNX_INPUTS[1]: class_ids})
        result = self.compiled(feed)
        return tuple(result[o] for o in self._outputs)


class JaxModel:
    """The jitted inference program on `params`, over every local device, in chunks of infer.batch_size
    (each chunk padded to that size, so one compilation serves every call)."""

    runtime = "jax"

    def __init__(self, config, params):
        from diff_fastener_jax.inference import prepare_inference

        self._infer, self._params, self._mesh = prepare_inference(config, params)
        self.batch = int(config.infer.batch_size)

    def __call__(self, images: np.ndarray, class_ids: np.ndarray | None = None):
        from diff_fastener_jax.inference import run_infer

        maps, scores, steps = [], [], []
        for i0 in range(0, images.shape[0], self.batch):
            out = run_infer(
                self._infer,
                self._params,
                images[i0 : i0 + self.batch],
                self._mesh,
                pad_to=self.batch,
                class_ids=None if class_ids is None else class_ids[i0 : i0 + self.batch],
            )
            maps.append(out.anomaly_map)
            scores.append(out.score)
            steps.append(out.denoise_step)
        return np.concatenate(maps), np.concatenate(scores), np.concatenate(steps)
