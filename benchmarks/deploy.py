r"""Images/s of the three ways to run an exported detector: in-process JAX, model.stablehlo, model.onnx.

  JAX_PLATFORMS=cpu python benchmarks/deploy.py [--config configs/demo.py] [--batch 8] [--repeats 5]

Uses freshly initialised parameters (throughput does not depend on their values): exports the config's
inference program as StableHLO (jax.export) and ONNX (jax2onnx, fixed batch), checks that both agree
with JAX, then times each on the same random batch: one warm-up call each, then --repeats rounds that call
the three in turn (median per way).
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diff_fastener_jax.config_utils import load_config  # noqa: E402

from diff_fastener_jax.deploy import export  # noqa: E402
from diff_fastener_jax.inference import make_infer_fn, model_image_shape  # noqa: E402
from diff_fastener_jax.models import init_params  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.py")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    config = load_config(args.config)
    h, w, c = model_image_shape(config)
    params = jax.tree_util.tree_map(np.asarray, init_params(config, jax.random.key(0)))
    images = np.random.default_rng(0).uniform(-1, 1, (args.batch, h, w, c)).astype(np.float32)
    out = {"config": args.config, "image_size": h, "batch": args.batch, "device": jax.devices()[0].device_kind,
           "cpu_count": os.cpu_count(), "python": platform.python_version(), "jax": jax.__version__}

    infer = make_infer_fn(config)
    ref_map, ref_score = (np.asarray(o) for o in infer(params, images)[1:])
    jax_params = jax.device_put(params)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        blob, _ = export.export_stablehlo(config, params)
        out["stablehlo_export_s"] = time.perf_counter() - t
        call = jax.jit(jax.export.deserialize(bytearray(blob)).call)
        m, s = call(jax_params, images)
        out["stablehlo_max_abs_diff"] = float(max(np.abs(np.asarray(m) - ref_map).max(),
                                                  np.abs(np.asarray(s) - ref_score).max()))
        path = os.path.join(tmp, "model.onnx")
        t = time.perf_counter()
        export.export_onnx(config, params, path, batch=args.batch)
        out["onnx_export_s"] = time.perf_counter() - t
        import onnxruntime as ort

        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        m, s = sess.run(None, {"images": images})
        out["onnx_max_abs_diff"] = float(max(np.abs(m - ref_map).max(), np.abs(s - ref_score).max()))
        runs = {"jax": lambda: jax.block_until_ready(infer(jax_params, images)),
                "stablehlo": lambda: jax.block_until_ready(call(jax_params, images)),
                "onnx": lambda: sess.run(None, {"images": images})}
        times: dict[str, list[float]] = {k: [] for k in runs}
        for fn in runs.values():
            fn()  # warm-up (compilation, allocation)
        # Round robin, so a shared machine's changing load hits the three alike.
        for _ in range(args.repeats):
            for k, fn in runs.items():
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
        for k, ts in times.items():
            out[f"{k}_images_per_s"] = args.batch / statistics.median(ts)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
