r"""Latency and throughput of the CPU runtimes of an exported detector: JAX, ONNX Runtime, OpenVINO.

  python benchmarks/deploy.py --config configs/demo.py [--batches 1,8] [--repeats 5] [--out FILE]
  python benchmarks/deploy.py --model exported/demo   # an export folder with model.onnx
  python benchmarks/deploy.py --model exported/default --separate   # one runtime in memory at a time

With --config it exports the config's inference program with freshly initialised parameters (seed 0;
speed does not depend on their values) into a temporary folder: model.onnx (dynamic batch),
model.xml/.bin (OpenVINO, when installed), params.npz. Each runtime then scores the same seeded random
batch through `Detector` (JAX: the jitted program compiled for exactly that batch size; ONNX Runtime
and OpenVINO: the exported files, CPU). Per batch size: one warm-up call each, a check that every
runtime's scores are within --tolerance of JAX's (exit 1 otherwise), then --repeats rounds that call
the runtimes in turn (round robin: a shared machine's changing load hits them alike); the median call
is reported as milliseconds per call and images per second. Prints a table and writes a JSON record.
Needs the package installed (pip install -e '.[export]'; openvino for its column).

With --separate each runtime is measured in a child process of its own (this script on the same folder
with --runtimes NAME), one after the other, so only one runtime's model is in memory at a time; the
parent compares the children's saved scores (same seeded images) and merges their records. This loses
the round-robin interleaving: a host load that changes between the children favours one runtime, so
it is opt-in, for models too large to hold three times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

RUNTIME_ORDER = ("jax", "onnx", "openvino")


def untrained_export(config_spec: str, folder: str, openvino: bool) -> dict:
    """Writes an export folder for `config_spec` with initialised (untrained) parameters; returns facts."""
    import jax

    from diff_fastener_jax.config import apply_overrides, load_config, validate_config
    from diff_fastener_jax.deploy import detector as api
    from diff_fastener_jax.deploy import export
    from diff_fastener_jax.deploy import threshold as D
    from diff_fastener_jax.models import init_params

    config = load_config(config_spec)
    apply_overrides(config, {"model.dtype": "float32"})  # every runtime computes in float32 on a CPU
    validate_config(config, check_data=False)
    params = jax.tree_util.tree_map(np.asarray, init_params(config, jax.random.key(0)))
    record = D.detector_record(config, {"value": None, "source": "untrained parameters (benchmark)"}, None)
    t = time.perf_counter()
    record["onnx"] = export.export_onnx(config, params, os.path.join(folder, export.ONNX_FILE))
    facts = {"onnx_export_s": round(time.perf_counter() - t, 1)}
    if openvino:
        t = time.perf_counter()
        record["openvino"] = export.export_openvino(folder)
        facts["openvino_convert_s"] = round(time.perf_counter() - t, 1)
    api.save_params(os.path.join(folder, api.PARAMS_FILE), params)
    with open(os.path.join(folder, api.CONFIG_FILE), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    D.write(os.path.join(folder, D.DETECTOR_FILE), record)
    return facts


def jax_detector(folder: str, batch: int):
    """The JAX runtime on the folder's params.npz, compiled for exactly `batch` images (no padding)."""
    from diff_fastener_jax.config import apply_overrides, config_from_json
    from diff_fastener_jax.deploy import detector as api
    from diff_fastener_jax.deploy import threshold as D

    config = apply_overrides(config_from_json(os.path.join(folder, api.CONFIG_FILE)), {"infer.batch_size": batch})
    return api.Detector(config, api.load_params(os.path.join(folder, api.PARAMS_FILE)), D.read(folder), threshold=0.0)


def score_diffs(scores: dict, names: list[str], batch: int, tolerance: float) -> dict[str, float]:
    """{runtime: largest score difference from JAX's} (from the first runtime's without JAX); exits over `tolerance`."""
    reference = scores["jax"] if "jax" in scores else scores[names[0]]  # (B,)
    diffs = {name: float(np.abs(scores[name] - reference).max()) for name in names}
    for name, diff in diffs.items():
        if diff > tolerance:
            sys.exit(f"error: {name} scores differ from JAX's by {diff:.2e} > {tolerance:g} at batch {batch}")
    return diffs


def measure(
    folder: str, names: list[str], batches: list[int], repeats: int, tolerance: float, scores_dir: str | None = None
) -> dict:
    """{runtime: {batch: {median_ms, images_per_s, max_abs_score_diff_vs_jax, ...}}} on one random batch.

    With `scores_dir`, each runtime's warm-up scores are saved there as <runtime>_batch<B>.npy.
    """
    from diff_fastener_jax import Detector

    exported = {name: Detector.load(folder, runtime=name, threshold=0.0) for name in names if name != "jax"}
    results: dict[str, dict] = {name: {} for name in names}
    for batch in batches:
        dets = {name: (jax_detector(folder, batch) if name == "jax" else exported[name]) for name in names}
        h, w, c = dets[names[0]].height, dets[names[0]].width, dets[names[0]].channels
        images = np.random.default_rng(batch).uniform(-1, 1, (batch, h, w, c)).astype(np.float32)
        scores = {}
        print(f"batch {batch}: warm-up and check ...", file=sys.stderr, flush=True)
        for name, det in dets.items():  # warm-up: compilation, allocation
            t = time.perf_counter()
            scores[name] = det.infer(images)[1]
            results[name][batch] = {"first_call_s": round(time.perf_counter() - t, 3)}
            if scores_dir:
                np.save(os.path.join(scores_dir, f"{name}_batch{batch}.npy"), scores[name])
        for name, diff in score_diffs(scores, names, batch, tolerance).items():
            results[name][batch]["max_abs_score_diff_vs_jax"] = diff
        times: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(repeats):
            for name, det in dets.items():
                t = time.perf_counter()
                det.infer(images)
                times[name].append(time.perf_counter() - t)
        for name, ts in times.items():
            median = statistics.median(ts)
            results[name][batch] |= {
                "median_ms": round(1000 * median, 2),
                "images_per_s": round(batch / median, 3),
                "calls_ms": [round(1000 * t, 2) for t in ts],
            }
    return results


def measure_separately(
    folder: str, names: list[str], batches: list[int], repeats: int, tolerance: float, scores_dir: str | None = None
) -> dict:
    """`measure`'s results with each runtime measured by a child process of its own, one after the other."""
    with tempfile.TemporaryDirectory() as tmp:
        scores_dir = scores_dir or tmp
        results = {}
        for name in names:
            out = os.path.join(tmp, f"{name}.json")
            command = [sys.executable, os.path.abspath(__file__), "--model", folder, "--runtimes", name]
            command += ["--batches", ",".join(map(str, batches)), "--repeats", str(repeats)]
            command += ["--out", out, "--scores-dir", scores_dir]
            print(f"{name}: measuring in a child process ...", file=sys.stderr, flush=True)
            code = subprocess.run(command, stdout=subprocess.DEVNULL).returncode  # its progress shows on stderr
            if code:
                sys.exit(f"error: the child process measuring {name} failed (exit {code})")
            with open(out) as f:
                results[name] = {int(b): row for b, row in json.load(f)["results"][name].items()}
        for batch in batches:
            scores = {name: np.load(os.path.join(scores_dir, f"{name}_batch{batch}.npy")) for name in names}
            for name, diff in score_diffs(scores, names, batch, tolerance).items():
                results[name][batch]["max_abs_score_diff_vs_jax"] = diff
    return results


def table(results: dict, batches: list[int]) -> str:
    """A markdown table: one row per runtime, latency (ms per call) and images/s per batch size."""
    head = (
        "| runtime | "
        + " | ".join(f"batch {b}: ms/call | batch {b}: images/s" for b in batches)
        + " | max score diff vs JAX |"
    )
    lines = [head, "|---|" + "---:|---:|" * len(batches) + "---:|"]
    for name, per_batch in results.items():
        cells = " | ".join(f"{per_batch[b]['median_ms']:.1f} | {per_batch[b]['images_per_s']:.2f}" for b in batches)
        diff = max(per_batch[b]["max_abs_score_diff_vs_jax"] for b in batches)
        lines.append(f"| {name} | {cells} | {diff:.1e} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="configs/<x>.py[:preset]: export it with untrained parameters")
    source.add_argument("--model", help="an export folder holding model.onnx")
    p.add_argument("--batches", default="1,8", help="batch sizes, comma-separated")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per batch size")
    p.add_argument("--runtimes", default=",".join(RUNTIME_ORDER), help="runtimes to compare, comma-separated")
    p.add_argument("--tolerance", type=float, default=1e-3, help="largest score difference from JAX allowed")
    p.add_argument("--out", help="JSON record to write")
    p.add_argument(
        "--keep",
        help="with --config: write the untrained export here and keep it (reused when it "
        "already holds one), instead of a temporary folder",
    )
    p.add_argument(
        "--separate",
        action="store_true",
        help="measure each runtime in a child process of its own, one after the other "
        "(one model in memory at a time; no round robin)",
    )
    p.add_argument("--scores-dir", help="save each runtime's scores per batch here as <runtime>_batch<B>.npy")
    args = p.parse_args()

    from diff_fastener_jax.deploy import runtimes

    batches = [int(b) for b in args.batches.split(",")]
    wanted = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    unknown = [r for r in wanted if r not in RUNTIME_ORDER]
    if unknown:
        p.error(f"unknown runtime {unknown[0]!r}; choose from {','.join(RUNTIME_ORDER)}")
    missing = [r for r in wanted if not runtimes.installed(r)]
    for r in missing:
        print(f"note: {r} is not installed here; its column is left out", file=sys.stderr)
    names = [r for r in wanted if r not in missing]
    record = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "batches": batches,
        "repeats": args.repeats,
        "runtimes": names,
        **({"separate_processes": True} if args.separate else {}),
        "host": {"cpu": _cpu_model(), "cpu_count": os.cpu_count(), "python": platform.python_version()},
        "versions": _versions(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        if args.config:
            record |= {"config": args.config, "params": "untrained (init_params, seed 0)"}
            folder = args.keep or tmp
            if not os.path.isfile(os.path.join(folder, "detector.json")):
                os.makedirs(folder, exist_ok=True)
                print(f"exporting {args.config} (untrained) to {folder} ...", file=sys.stderr, flush=True)
                record["export"] = untrained_export(args.config, folder, "openvino" in names)
        else:
            record |= {"model": args.model}
            folder = args.model
        with open(os.path.join(folder, "detector.json")) as f:
            record["input"] = json.load(f)["input"]
        if args.scores_dir:
            os.makedirs(args.scores_dir, exist_ok=True)
        run = measure_separately if args.separate else measure
        record["results"] = run(folder, names, batches, args.repeats, args.tolerance, args.scores_dir)
    record["fastest"] = {str(b): min(names, key=lambda n: record["results"][n][b]["median_ms"]) for b in batches}
    print(table(record["results"], batches))
    print("fastest: " + ", ".join(f"batch {b}: {n}" for b, n in record["fastest"].items()))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(record, f, indent=2)
        print(f"wrote {args.out}")
    return 0


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("diff-fastener-jax", "jax", "onnxruntime", "openvino", "numpy"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            pass
    return out


if __name__ == "__main__":
    sys.exit(main())
