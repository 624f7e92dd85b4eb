r"""The training input pipeline on Grain, and the fixed validation batches.

    MapDataset.range(N) -> seed -> shuffle -> repeat      one infinite, per-epoch reshuffled index stream
      -> batch(2)                                         pairs of normal images
      -> map(decode + resize)                             both images of the pair, uint8 (data.resize)
      -> random_map(crop + synthesis)                     data.patch_size > 0: a random P x P crop of
                                                          each; the 2nd gets a synthetic anomaly
      -> batch(B_local / 2) -> [process::processes]       this process's block of each global batch
      -> map(interleave) -> to_iter_dataset -> mp_prefetch(workers)

Batches are numpy dicts for THIS process (H = W = data.patch_size when patch training is on, else
the resized image size): image float32 (B_local, H, W, 3) in [-1, 1], mask float32
(B_local, H, W, 1), is_synthetic float32 (B_local,), class_id int32 (B_local,) (each row's category
in a unified multi-category run, else 0) (+ clean (B_local, H, W, 3), the rows before synthesis, when
loss.anomaly_oriented_noise is on). Row i is synthetic iff i is odd, so every contiguous even-sized
per-device chunk is half normal, half synthetic; the pairs are drawn from the pooled categories, so
batches mix categories.

Determinism: all randomness is keyed by the global pair index (grain's random_map seeds per element),
so batches do not depend on the worker count, and the concatenation of the processes' rows (in
process order) equals the single-process batch. The iterator's state is just the number of batches
consumed; `set_state` restarts the pipeline there (also with another worker count).

Throughput: python -m diff_fastener_jax.data.pipeline --bench [--size 256 --workers 0,1,2 --batch 8]
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import tempfile
import time
import weakref

import grain
import numpy as np

from diff_fastener_jax.config_schema import AUTO, parse_synthesis
from diff_fastener_jax.data import datasets, foreground_kind, image_io, patches
from diff_fastener_jax.data.sizing import resize_of
from diff_fastener_jax.data.synthesis import TextureBank, foreground_mask, synthesize_anomaly

STATE_VERSION = 1
CACHE_BYTES = 256 << 20  # per process (each grain worker has its own): decoded training images

# Iterators with worker processes still open; closed at exit so their shared-memory buffers are
# released before interpreter shutdown (otherwise Python warns about leaked shared_memory objects).
_OPEN_ITERATORS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_open_iterators() -> None:
    for it in list(_OPEN_ITERATORS):
        it.close()


# ---------------------------------------------------------------------------------------------------
# Pipeline stages (module-level classes so the spawned grain workers can unpickle them)


class _LoadPair:
    """(2,) sample indices -> {'normal', 'source'}: uint8 (H, W, 3) each, plus 'source_fg' bool (H, W)
    when the dataset supplies foreground masks (where the source's synthetic anomaly may go).

    Decoded, resized images are kept in a per-process cache (up to CACHE_BYTES): training revisits
    every image each epoch, and decoding full-size PNGs is about half the pipeline's CPU time."""

    def __init__(
        self,
        paths: list[str],
        size,
        foreground_paths: list[str | None] | None = None,
        class_ids: list[int] | None = None,
    ):
        self.paths, self.size = list(paths), size  # int, (H, W) or a sizing.Resize
        self.foreground_paths = list(foreground_paths) if foreground_paths else None
        self.class_ids = np.asarray(class_ids if class_ids is not None else [0] * len(self.paths), np.int32)
        self._cache: dict = {}
        self._cached_bytes = 0

    def __getstate__(self):  # workers start with an empty cache
        state = dict(self.__dict__)
        state["_cache"], state["_cached_bytes"] = {}, 0
        return state

    def _cached(self, key, load):
        value = self._cache.get(key)
        if value is None:
            value = load()
            if self._cached_bytes + value.nbytes <= CACHE_BYTES:
                value.setflags(write=False)  # shared by later batches: must never be modified
                self._cache[key] = value
                self._cached_bytes += value.nbytes
        return value

    def _load(self, i: int) -> np.ndarray:
        return self._cached(i, lambda: image_io.load_image(self.paths[i], self.size))

    def _foreground(self, i: int) -> np.ndarray:
        hw = self._load(i).shape[:2]  # the mask follows its image's size, whatever the resize rule
        return self._cached(("fg", i), lambda: image_io.load_mask(self.foreground_paths[i], hw)[..., 0] > 0)

    def __call__(self, idx: np.ndarray) -> dict:
        out = {
            "normal": self._load(int(idx[0])),
            "source": self._load(int(idx[1])),
            "class_id": self.class_ids[np.asarray(idx, np.int64)],
        }  # (2,) int32
        if self.foreground_paths is not None and self.foreground_paths[int(idx[1])] is not None:
            out["source_fg"] = self._foreground(int(idx[1]))
        return out


class _SynthesizePair:
    """Pair -> {'image' (2, H, W, 3), 'mask' (2, H, W, 1), 'is_synthetic' (2,) [, 'clean']}: row 0 is
    the normal image as is, row 1 the source image with a synthetic anomaly.

    With `patch_size` P > 0 both images are first cropped to P x P (H = W = P) with `rng`: the normal
    anywhere, the source where the crop holds foreground (the supplied mask, else `fg_mode` on the
    whole image), so its anomaly lands on the object; the foreground is cropped with it."""

    def __init__(
        self,
        fg_mode: str,
        texture_bank: TextureBank | None,
        with_clean: bool,
        cutpaste_prob: float = 0.0,
        families=(),
        patch_size: int = 0,
    ):
        self.fg_mode, self.texture_bank, self.with_clean = fg_mode, texture_bank, with_clean
        self.cutpaste_prob, self.families, self.patch_size = cutpaste_prob, tuple(families), int(patch_size)

    def _crop(self, pair: dict, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(normal (P, P, 3), source (P, P, 3), source foreground bool (P, P)) uint8 crops."""
        p, normal, source = self.patch_size, pair["normal"], pair["source"]
        normal = patches.crop(normal, patches.random_box(normal.shape[:2], p, rng), p)
        fg = pair.get("source_fg")
        if fg is None or not fg.any():
            fg = foreground_mask(image_io.image_to_float(source), self.fg_mode)
        box = patches.random_box(source.shape[:2], p, rng, anchor=fg)
        return normal, patches.crop(source, box, p), patches.crop(fg, box, p)

    def __call__(self, pair: dict, rng: np.random.Generator) -> dict:
        if self.patch_size:
            normal_u8, source_u8, source_fg = self._crop(pair, rng)
        else:
            normal_u8, source_u8, source_fg = pair["normal"], pair["source"], pair.get("source_fg")
        normal = image_io.image_to_float(normal_u8)
        source = image_io.image_to_float(source_u8)
        anomalous, mask, _ = synthesize_anomaly(
            source,
            rng,
            foreground=source_fg,
            texture_bank=self.texture_bank,
            fg_mode=self.fg_mode,
            cutpaste_prob=self.cutpaste_prob,
            families=self.families,
        )
        out = {
            "image": np.stack([normal, anomalous]),
            "mask": np.stack([np.zeros_like(mask), mask]),
            "is_synthetic": np.array([0.0, 1.0], np.float32),
            "class_id": np.asarray(pair["class_id"], np.int32),
        }  # each row keeps its own image's class
        if self.with_clean:
            out["clean"] = np.stack([normal, source])
        return out


def _synthesizer(config, bank: TextureBank | None) -> _SynthesizePair:
    """The synthesis step of a config (training and validation draw from the same distribution)."""
    return _SynthesizePair(
        str(config.data.foreground),
        bank,
        bool(config.get("loss", {}).get("anomaly_oriented_noise", False)),
        float(config.data.get("cutpaste_prob", 0.0)),
        parse_synthesis(config.data.get("synthesis", "")),
        int(config.data.get("patch_size", 0)),
    )


def check_patches_fit(config, samples) -> None:
    """Raises ConfigError naming data.patch_size when a sample, resized by the config's rule, is smaller
    than a training patch. Reads image headers only."""
    patch = int(config.data.get("patch_size", 0))
    if not patch:
        return
    rule = resize_of(config)
    if rule.fixed_hw is not None:
        patches.check_fits(rule.fixed_hw, patch, f"the images (data.image_size={config.data.image_size})")
        return
    from PIL import Image

    for s in samples:
        with Image.open(s.path) as img:
            patches.check_fits(rule.hw((img.height, img.width)), patch, s.path)


def _interleave(chunk: dict) -> dict:
    """(P, 2, ...) pairs -> (2P, ...) rows: normal, synthetic, normal, synthetic, ..."""
    return {k: np.ascontiguousarray(v.reshape((-1,) + v.shape[2:])) for k, v in chunk.items()}


# ---------------------------------------------------------------------------------------------------
# Train iterator


def _texture_bank(data_cfg) -> TextureBank | None:
    folder = str(data_cfg.get("texture_dir", "") or "")
    return TextureBank(folder) if folder else None


def local_batch_size(batch_size: int, process_count: int) -> int:
    """Rows per process; checks the global batch splits into even per-process halves."""
    if batch_size <= 0 or batch_size % 2:
        raise ValueError(f"train.batch_size={batch_size} must be a positive even number (half normal, half synthetic)")
    if batch_size % (2 * process_count):
        raise ValueError(f"train.batch_size={batch_size} must be divisible by 2 x {process_count} processes")
    return batch_size // process_count


def _resolved_foreground(config, samples):
    """`config` with data.foreground='auto' decided from `samples` (`train` passes it decided); the
    other 'auto' settings are left to training, since synthesis does not read them."""
    if config.data.foreground != AUTO:
        return config
    return foreground_kind.resolve(config, samples)[0]


def build_train_dataset(
    config, *, seed: int, process_index: int = 0, process_count: int = 1, samples=None
) -> grain.MapDataset:
    """The infinite MapDataset whose element k is this process's share of global batch k.

    `samples`: the 'train' split when the caller listed it already (else listed here)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")
    b_local = local_batch_size(int(config.train.batch_size), process_count)
    if samples is None:
        samples = datasets.list_samples(config.data, "train", seed=seed)
    check_patches_fit(config, samples)
    config = _resolved_foreground(config, samples)
    paths = [s.path for s in samples]
    foregrounds = [s.foreground_path for s in samples]
    ds = (
        grain.MapDataset.range(len(paths))
        .seed(seed)
        .shuffle()
        .repeat()
        .batch(2, drop_remainder=True)
        .map(
            _LoadPair(
                paths,
                resize_of(config),
                foregrounds if any(foregrounds) else None,
                datasets.class_ids_of(config, samples),
            )
        )
        .random_map(_synthesizer(config, _texture_bank(config.data)))
        .batch(b_local // 2, drop_remainder=True)
    )
    return ds[process_index::process_count].map(_interleave)


def _ensure_absl_flags_parsed() -> None:
    """Grain's mp_prefetch reads its absl flags (in the parent, to forward them to the workers); outside
    an absl app (pytest, notebooks, scripts) they are unparsed and reading them raises. Mark them
    parsed so every flag keeps its default; a no-op under absl.app.run."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class TrainIterator:
    """Iterator over this process's training batches with JSON-serialisable, worker-count-independent
    state ({'version', 'step', 'seed', 'batch_size', 'process_index', 'process_count'})."""

    def __init__(self, dataset: grain.MapDataset, *, num_workers: int, prefetch: int, meta: dict):
        self._dataset = dataset
        self._num_workers = int(num_workers)
        self._prefetch = max(1, int(prefetch))
        self._meta = dict(meta)
        self._step = 0
        self._it = None

    def _start(self) -> None:
        ds = self._dataset[self._step :] if self._step else self._dataset
        # Two threads per process: PIL decoding and large numpy ops release the GIL.
        threads = 2
        it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=self._prefetch))
        if self._num_workers > 0:
            _ensure_absl_flags_parsed()
            it_ds = it_ds.mp_prefetch(
                grain.MultiprocessingOptions(num_workers=self._num_workers, per_worker_buffer_size=self._prefetch)
            )
            _OPEN_ITERATORS.add(self)
        self._it = iter(it_ds)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._start()
        batch = next(self._it)
        if self._num_workers > 0:
            # Worker outputs are views of shared memory; copy them into ordinary arrays so nothing
            # downstream (e.g. a zero-copy device_put on CPU) keeps the segments alive until exit.
            batch = {k: np.array(v, copy=True, subok=False) for k, v in batch.items()}
        self._step += 1
        return batch

    def get_state(self) -> dict:
        """JSON-serialisable position in the batch sequence."""
        return {"version": STATE_VERSION, "step": self._step, **self._meta}

    def set_state(self, state: dict) -> None:
        """Continues from `state` (from `get_state`); refuses state of a differently seeded or batched run."""
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError(f"not an input-pipeline state from TrainIterator.get_state(): {state!r:.200}")
        for key in ("seed", "batch_size"):
            if key in state and state[key] != self._meta[key]:
                raise ValueError(
                    f"input-pipeline state has {key}={state[key]!r} but this run has "
                    f"{self._meta[key]!r}; resume with the original config"
                )
        self.close()
        self._step = int(state["step"])

    def close(self) -> None:
        """Stops the worker processes (if any); the next `next()` restarts at the current step."""
        if self._it is not None and hasattr(self._it, "close"):
            self._it.close()
        self._it = None
        _OPEN_ITERATORS.discard(self)


def make_train_iterator(
    config, *, seed: int, process_index: int = 0, process_count: int = 1, num_workers: int | None = None, samples=None
) -> TrainIterator:
    """Infinite iterator of this process's training batches (batch_size // process_count rows each).

    `num_workers` overrides config.data.num_workers (0 = in-process, no mp_prefetch).
    """
    ds = build_train_dataset(
        config, seed=seed, process_index=process_index, process_count=process_count, samples=samples
    )
    workers = int(config.data.num_workers if num_workers is None else num_workers)
    if workers < 0:
        raise ValueError(f"data.num_workers must be >= 0, got {workers}")
    meta = {
        "seed": int(seed),
        "batch_size": int(config.train.batch_size),
        "process_index": int(process_index),
        "process_count": int(process_count),
    }
    return TrainIterator(ds, num_workers=workers, prefetch=int(config.data.get("prefetch", 2)), meta=meta)


# ---------------------------------------------------------------------------------------------------
# Validation batches


def make_val_batches(config, *, seed: int, num_batches: int, samples=None) -> list[dict]:
    """`num_batches` fixed batches (train.batch_size rows, same dict format as training) built from the
    held-out normal validation images: even rows as they are, odd rows with a synthetic anomaly drawn
    deterministically from (seed, row pair). Validation images are reused cyclically when there are
    few. Returns [] when there are no validation images (data.val_fraction = 0). `samples`: the 'val'
    split when the caller listed it already."""
    if samples is None:
        samples = datasets.list_samples(config.data, "val", seed=seed)
    if not samples or num_batches <= 0:
        return []
    b = local_batch_size(int(config.train.batch_size), 1)
    check_patches_fit(config, samples)
    # `train` resolves data.foreground='auto' from the training normals first; any other caller gets the
    # same rule applied to the held-out normals of the same category
    config = _resolved_foreground(config, samples)
    n = len(samples)
    bank = _texture_bank(config.data)
    synth = _synthesizer(config, bank)
    foregrounds = [s.foreground_path for s in samples]
    load = _LoadPair(
        [s.path for s in samples],
        resize_of(config),
        foregrounds if any(foregrounds) else None,
        datasets.class_ids_of(config, samples),
    )

    batches = []
    for k in range(num_batches):
        pairs = []
        for j in range(k * b // 2, (k + 1) * b // 2):
            rng = np.random.default_rng([seed, 0x7A1, j])  # own stream, independent of training
            pairs.append(synth(load(np.array([j % n, (j + n // 2) % n])), rng))
        batches.append(_interleave({key: np.stack([p[key] for p in pairs]) for key in pairs[0]}))
    return batches


# ---------------------------------------------------------------------------------------------------
# Throughput benchmark


def benchmark(config, worker_counts, num_batches: int, seed: int = 0) -> list[dict]:
    """images/s of the training pipeline per worker count (the first batch, which includes worker
    start-up, is timed separately). For 0 workers also the CPU time per image (all threads of this
    process), which, unlike wall time, hardly depends on what else the machine is doing."""
    results = []
    for w in worker_counts:
        it = make_train_iterator(config, seed=seed, num_workers=w)
        t0 = time.perf_counter()
        next(it)
        t1, c1 = time.perf_counter(), time.process_time()
        for _ in range(num_batches):
            next(it)
        dt, dc = time.perf_counter() - t1, time.process_time() - c1
        it.close()
        n = num_batches * int(config.train.batch_size)
        ips = n / max(dt, 1e-9)
        r = {
            "workers": w,
            "size": int(config.data.image_size),
            "batch": int(config.train.batch_size),
            "batches": num_batches,
            "images_per_s": round(ips, 1),
            "images_per_s_per_worker": round(ips / max(1, w), 1),
            "first_batch_s": round(t1 - t0, 2),
        }
        if w == 0:
            r["cpu_ms_per_image"] = round(1000 * dc / n, 2)
        results.append(r)
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Training input pipeline tools.")
    p.add_argument("--bench", action="store_true", help="measure training-pipeline throughput")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--root", default="", help="MVTec-layout root to read (default: generated demo data)")
    p.add_argument("--category", default="fastener")
    p.add_argument("--foreground", default="otsu", choices=("otsu", "full"))
    a = p.parse_args(argv)
    if not a.bench:
        p.error("nothing to do: pass --bench")
    from diff_fastener_jax.config_schema import base_config

    config = base_config("mvtec")
    config.data.image_size = a.size
    config.data.category = a.category
    config.data.foreground = a.foreground
    config.train.batch_size = a.batch
    with tempfile.TemporaryDirectory() as tmp:
        if a.root:
            config.data.root = a.root
        else:
            from diff_fastener_jax.data.demo import generate_demo_dataset

            generate_demo_dataset(tmp, n_train=64, n_test=4, size=a.size, category=a.category)
            config.data.root = tmp
        print(json.dumps({"cpu_count": os.cpu_count(), "root": a.root or "generated demo"}), flush=True)
        for r in benchmark(config, [int(w) for w in a.workers.split(",")], a.batches):
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
