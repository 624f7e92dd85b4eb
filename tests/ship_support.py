"""One trained smoke model shared by the deployment tests (detector, export, predict, serve).

The trained model is conftest's `smoke_run` fixture (the whole suite trains it once);
`smoke_export(tmp_path_factory, run)` exports it once per pytest run (`helpers.shared_once`).
"""

import contextlib
import os
import socket
import subprocess
import sys
import time


def smoke_test_images(workdir: str, n: int | None = None) -> list[str]:
    """Paths of the smoke run's demo test images (sorted)."""
    from diff_fastener_jax.config import config_from_json
    from diff_fastener_jax.data import datasets

    config = config_from_json(os.path.join(workdir, "config.json"))
    samples = datasets.list_samples(config.data, "test", seed=config.seed)
    return [s.path for s in samples][:n]


def smoke_export(tmp_path_factory, run: str) -> str:
    """An export folder (model.stablehlo, model.onnx with a dynamic batch, params, detector.json)
    of the smoke run, written once per pytest run (across xdist workers, like the run itself)."""
    from helpers import shared_once

    from diff_fastener_jax.deploy.export import export_run

    return shared_once(tmp_path_factory, "smoke_export", lambda out: export_run(run, out, log=lambda *_: None))


def assert_onnx_matches(config, params, images, out, path: str) -> None:
    """model.onnx exported for `config` to `path` gives the program's outputs `out` (its map and
    scores) on `images`, within 1e-4."""
    import numpy as np
    import onnxruntime as ort

    from diff_fastener_jax.deploy.export import export_onnx

    export_onnx(config, params, path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    onnx_map, onnx_score = session.run(None, {session.get_inputs()[0].name: images})
    np.testing.assert_allclose(onnx_map, np.asarray(out.anomaly_map), atol=1e-4)
    np.testing.assert_allclose(onnx_score, np.asarray(out.score), atol=1e-4)


def assert_normal_map_fits_the_scored_map(split, same, returned, params) -> None:
    """Calibration of `split` (a score that reads another map than the program returns) fits the
    normal map and the threshold of `same` (one map: the score's), not those of `returned` (one map:
    the returned one). The configs score with infer.normal_map='subtract' on >= 2 held-out normals."""
    import numpy as np
    import pytest

    from diff_fastener_jax.deploy import threshold

    split_record, split_map = threshold.calibrate(split, params)
    same_record, same_map = threshold.calibrate(same, params)
    _, returned_map = threshold.calibrate(returned, params)
    assert split_map.shape == (32, 32) and split_record["normal_map"]["num_images"] >= 2
    np.testing.assert_allclose(split_map, same_map, atol=1e-6)
    assert split_record["value"] == pytest.approx(same_record["value"], abs=1e-6)
    assert np.abs(split_map - returned_map).max() > 1e-4


def png_header(width: int, height: int) -> bytes:
    """An 8-bit RGB PNG of width x height whose pixel data stops after the first row: a valid
    signature, IHDR and one short IDAT. `Image.open` reads its size from it: a few dozen bytes that
    declare any number of pixels (a decompression bomb to a header check)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    first_row = zlib.compress(b"\0" * (1 + 3 * min(width, 1024)))  # the start of the pixel data only
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", first_row)


def png_bytes(a) -> bytes:
    """A uint8 array encoded as PNG."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_service(folder: str, log_path, *args: str, env: dict | None = None):
    """`python -m diff_fastener_jax.serve --model folder` on 127.0.0.1 and a free port, `args` appended,
    its output in `log_path`; yields (base url, process) once /health answers; stopped afterwards."""
    import httpx
    import pytest

    url_port = free_port()
    log = open(log_path, "w+")
    command = [sys.executable, "-m", "diff_fastener_jax.serve", "--model", folder]
    command += ["--host", "127.0.0.1", "--port", str(url_port), *args]
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{url_port}"
    try:
        deadline = time.time() + 300  # JAX import, model load and warm-up compile on a loaded machine
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read()[-3000:]}")
            try:
                if httpx.get(url + "/health", timeout=2.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                pytest.fail("server did not become healthy")
            time.sleep(0.5)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
