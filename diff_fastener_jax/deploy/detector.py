"""The Python API for applying a trained detector: `Detector.load(path)`, `det.predict(images)`.

  from diff_fastener_jax import Detector

  det = Detector.load("exported/")            # an export folder, or a training workdir
  out = det.predict(["a.png", "b.tif"])        # paths, or uint8/uint16 arrays of any size
  out.scores, out.labels, out.anomaly_maps[0], out.masks[0]

No training data is needed: the threshold and the input contract come from `detector.json`.
`Detector.load(folder, runtime="onnx")` (or "openvino") scores an export folder without JAX installed:
this module imports JAX only for the "jax" runtime (see deploy/runtimes.py).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence, Union

import ml_collections
import numpy as np
from PIL import Image

from diff_fastener_jax.config import class_names
from diff_fastener_jax.data import image_io
from diff_fastener_jax.deploy import runtimes
from diff_fastener_jax.deploy import threshold as D
from diff_fastener_jax.errors import UserError

PARAMS_FILE = "params.npz"
CONFIG_FILE = "config.json"

ImageInput = Union[str, os.PathLike, np.ndarray, Image.Image]


@dataclasses.dataclass
class Prediction:
    """What `Detector.predict` returns for N images."""

    scores: np.ndarray  # (N,) float32 image scores
    labels: np.ndarray  # (N,) bool: score > threshold
    anomaly_maps: list[np.ndarray]  # N float32 (h_i, w_i) maps in [0, 1] at each input's own size
    masks: list[np.ndarray]  # N bool (h_i, w_i): anomaly_map > pixel_threshold
    threshold: float  # the model's one threshold (or the override)
    denoise_steps: np.ndarray  # (N,) int32: the diffusion step each reconstruction started from
    thresholds: np.ndarray  # (N,) each image's own (its category's, for a unified model)


def save_params(path: str, params) -> None:
    """Parameters as one .npz, keys 'recon/...', 'seg/...' (the flattened pytree paths)."""
    from flax import traverse_util

    flat = traverse_util.flatten_dict(D.host_params(params), sep="/")
    np.savez(path, **flat)


def load_params(path: str):
    """The parameter pytree saved by `save_params`."""
    from flax import traverse_util

    with np.load(path) as z:
        return traverse_util.unflatten_dict({k: z[k] for k in z.files}, sep="/")


def resize_map(amap: np.ndarray, height: int, width: int) -> np.ndarray:
    """An anomaly map (h, w) bilinearly resized to (height, width), float32."""
    if amap.shape == (height, width):
        return np.asarray(amap, np.float32)
    img = Image.fromarray(np.asarray(amap, np.float32), mode="F").resize((width, height), Image.BILINEAR)
    return np.asarray(img, np.float32)


def _input_shape(record: dict, config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """(H, W, C) the model takes: detector.json's input contract (no JAX needed to read it)."""
    spec = record.get("input")
    if spec:
        return int(spec["height"]), int(spec["width"]), int(spec["channels"])
    from diff_fastener_jax.inference import model_image_shape

    return model_image_shape(config)


def _per_image(categories, n: int) -> list[str]:
    """One category name for all n images, or a list of n names, as a list of n names."""
    names = [categories] * n if isinstance(categories, str) else list(categories)
    if len(names) != n:
        raise UserError(f"{len(names)} categories for {n} images")
    return names


class Detector:
    """A trained Diff-Fastener model with its threshold, ready to score images."""

    def __init__(
        self, config: ml_collections.ConfigDict, params, record: dict, *, threshold: float | None = None, model=None
    ):
        """`model`: a deploy.runtimes model (ONNX Runtime, OpenVINO); None runs the JAX program on `params`."""
        self.config = config
        self.record = record
        self._threshold_override = threshold is not None
        t = threshold if threshold is not None else (record.get("threshold") or {}).get("value")
        self.threshold = None if t is None else float(t)
        self.pixel_threshold = float(record.get("pixel_threshold", D.PIXEL_THRESHOLD))
        self.height, self.width, self.channels = _input_shape(record, config)
        self.categories = class_names(config)  # [] for a one-category model
        if model is None and not self._threshold_override:  # the JAX program computes in this machine's dtype
            D.check_threshold_dtype(record.get("threshold") or {}, config, "this detector")
        self._model = runtimes.JaxModel(config, params) if model is None else model
        self.runtime = self._model.runtime

    @classmethod
    def load(
        cls, path: str, *, checkpoint: int | None = None, threshold: float | None = None, runtime: str = "auto"
    ) -> Detector:
        """From an export folder (detector.json, config.json, params.npz) or a training workdir (its
        checkpoint `checkpoint`, default the selected step, else the latest, and detector.json). `threshold` overrides the stored one.

        `runtime` (deploy.runtimes.RUNTIMES): "jax" (the in-process program), "onnx" (model.onnx in
        onnxruntime), "openvino" (model.xml, else model.onnx, in OpenVINO), or "auto": JAX where it is
        installed, else ONNX Runtime, else OpenVINO. Only "jax" reads a training workdir."""
        from diff_fastener_jax.config import config_from_json

        path = os.fspath(path)
        if os.path.isfile(os.path.join(path, PARAMS_FILE)):
            if checkpoint is not None:
                raise UserError(f"{path} is an export folder: it holds one checkpoint, --checkpoint does not apply")
            record = D.read(path)
            config = config_from_json(os.path.join(path, CONFIG_FILE))
            runtime = runtimes.resolve(runtime, path)
            if runtime != "jax":
                return cls(config, None, record, threshold=threshold, model=runtimes.load(runtime, path, record))
            return cls(config, load_params(os.path.join(path, PARAMS_FILE)), record, threshold=threshold)
        if os.path.isfile(os.path.join(path, CONFIG_FILE)):
            runtimes.resolve(runtime, None)
            from diff_fastener_jax.training.run_loading import load_run_config, load_run_params

            config = load_run_config(path)
            params, step = load_run_params(path, config, checkpoint)
            from diff_fastener_jax.deploy import normal_map

            if normal_map.missing(config, params):
                raise UserError(
                    f"{path}: infer.normal_map is {config.infer.normal_map!r}, but the run holds no normal map "
                    f"fitted for step {step}",
                    hint="training writes normal_map.npy with detector.json at its end; export the run "
                    "(python -m diff_fastener_jax.export fits one) and load the export folder",
                )
            if os.path.isfile(os.path.join(path, D.DETECTOR_FILE)):
                record = D.read(path)
            else:
                record = D.detector_record(config, {"value": None, "source": "no detector.json in the run"}, step)
            if record.get("checkpoint_step") != step:
                record = D.detector_record(
                    config,
                    {
                        "value": None,
                        "source": f"detector.json was calibrated for step {record.get('checkpoint_step')}, not {step}",
                    },
                    step,
                )
            return cls(config, params, record, threshold=threshold)
        raise UserError(
            f"{path}: neither an export folder ({PARAMS_FILE}) nor a training run ({CONFIG_FILE})",
            hint="pass the --out folder of `python -m diff_fastener_jax.export` or a training --workdir",
        )

    @property
    def metadata(self) -> dict:
        """detector.json's record without the full config (for /metadata and logs), plus the threshold in
        use and the category names a multi-category model takes ([] for a one-category model)."""
        return {k: v for k, v in self.record.items() if k != "config"} | {
            "threshold_value": self.threshold,
            "categories": list(self.categories),
        }

    def read(self, item: ImageInput, where: str = "image") -> Image.Image:
        """One input (path, array or PIL image) -> a decoded PIL image at its own size."""
        if isinstance(item, (str, os.PathLike)):
            img = image_io.open_image(os.fspath(item))
        elif isinstance(item, Image.Image):
            img = item
        elif isinstance(item, np.ndarray):
            img = image_io.array_to_pil(item, where)
        else:
            raise UserError(f"{where}: expected a path, a numpy array or a PIL image, got {type(item).__name__}")
        return img

    def _prepare(self, items) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """(batch float32 (N, H, W, 3) in [-1, 1], [(h_i, w_i)] original sizes)."""
        if isinstance(items, np.ndarray) and items.dtype == np.float32 and items.ndim == 4:
            if items.shape[1:] != (self.height, self.width, self.channels):
                raise UserError(
                    f"a float32 batch must be preprocessed (N, {self.height}, {self.width}, "
                    f"{self.channels}) in [-1, 1], got {items.shape}",
                    hint="pass paths or uint8/uint16 arrays, or use det.preprocess()",
                )
            return items, [(self.height, self.width)] * items.shape[0]
        if isinstance(items, (str, os.PathLike, Image.Image)) or (isinstance(items, np.ndarray) and items.ndim <= 3):
            items = [items]
        batch, sizes = [], []
        for i, item in enumerate(items):
            img = self.read(item, where=str(item) if isinstance(item, (str, os.PathLike)) else f"image {i}")
            sizes.append((img.size[1], img.size[0]))
            batch.append(image_io.image_to_float(image_io.prepare_image(img, (self.height, self.width))))
        if not batch:
            return np.zeros((0, self.height, self.width, self.channels), np.float32), []
        return np.stack(batch), sizes

    def preprocess(self, images: Sequence[ImageInput] | ImageInput) -> np.ndarray:
        """Paths or arrays (8/16-bit, grey/RGB, any size) -> float32 (N, H, W, 3) in [-1, 1]: the batch the
        model, model.stablehlo and model.onnx take, read by the same function as the training images."""
        return self._prepare(images)[0]

    def class_ids(self, categories, n: int) -> np.ndarray | None:
        """Class ids (n,) for a unified model from one category name or one per image; None otherwise."""
        if not self.categories:
            if categories is not None and any(c not in ("", None) for c in np.atleast_1d(categories)):
                raise UserError(f"this model was trained on one category; it takes no category (got {categories!r})")
            return None
        if categories is None:
            raise UserError(
                f"this model covers several categories ({', '.join(self.categories)}): give each image's category",
                hint="e.g. --category " + self.categories[0],
            )
        names = _per_image(categories, n)
        unknown = sorted(set(names) - set(self.categories))
        if unknown:
            raise UserError(f"unknown category {unknown[0]!r}", hint=f"this model knows {', '.join(self.categories)}")
        return np.asarray([self.categories.index(c) for c in names], np.int32)

    def infer(self, batch: np.ndarray, categories=None) -> tuple[np.ndarray, np.ndarray]:
        """(anomaly_map (N, H, W), score (N,)) for a preprocessed batch, in chunks of infer.batch_size.
        `categories`: a name, or one per image, for a unified multi-category model."""
        return self._infer_batch(batch, categories)[:2]

    def _infer_batch(self, batch: np.ndarray, categories=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(anomaly_map (N, H, W), score (N,), denoise_step (N,))."""
        ids = self.class_ids(categories, batch.shape[0])
        if batch.shape[0] == 0:
            return (
                np.zeros((0, self.height, self.width), np.float32),
                np.zeros((0,), np.float32),
                np.zeros((0,), np.int32),
            )
        return self._model(batch, ids)

    def thresholds_for(self, categories, n: int) -> np.ndarray:
        """Each image's threshold (n,): a given override, else its category's calibrated one (unified
        models), else the model's one threshold."""
        if self._threshold_override or not self.categories:
            return np.full(n, self.threshold, np.float64)
        per_image = D.threshold_for(self.record["threshold"], _per_image(categories, n), self.threshold)
        return np.broadcast_to(np.asarray(per_image, np.float64), (n,)).copy()  # one value when none per category

    def predict(self, images: Sequence[ImageInput] | ImageInput, categories=None) -> Prediction:
        """Scores, labels (score > its threshold), anomaly maps resized back to each input's size, binary
        masks. `categories`: a name, or one per image, for a unified multi-category model (its images are
        judged against their own category's threshold)."""
        if self.threshold is None:
            raise UserError(
                f"this detector has no threshold ({self.record['threshold'].get('source')})",
                hint="pass threshold=X to Detector.load, or calibrate with "
                "`python -m diff_fastener_jax.evaluate --workdir RUN --recalibrate`",
            )
        batch, sizes = self._prepare(images)
        amaps, scores, steps = self._infer_batch(batch, categories)
        thresholds = self.thresholds_for(categories, len(scores))
        maps = [resize_map(m, h, w) for m, (h, w) in zip(amaps, sizes)]
        return Prediction(
            scores=scores.astype(np.float32),
            labels=D.is_anomalous(scores, thresholds),
            anomaly_maps=maps,
            masks=[D.is_anomalous(m, self.pixel_threshold) for m in maps],
            threshold=self.threshold,
            denoise_steps=steps.astype(np.int32),
            thresholds=thresholds,
        )

    def __repr__(self) -> str:
        return (
            f"Detector({self.height}x{self.width}, method={self.config.infer.method}, "
            f"threshold={self.threshold}, runtime={self.runtime})"
        )
