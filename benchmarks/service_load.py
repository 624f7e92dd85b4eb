r"""Latency and memory of the HTTP service under concurrent good and hostile requests.

  python benchmarks/service_load.py --model exported/demo [--requests 24] [--concurrency 8] [--size 256]

Starts `python -m diff_fastener_jax.serve` on a free loopback port with its default limits, waits
until it is healthy, then sends --requests POST /predict requests, --concurrency at a time: every
second one is a good image (a random --size x --size PNG, one in four with ?heatmap=true), the
others hostile (a 13000 x 13000 PNG header, a 21 MB body with and without Content-Length, a
truncated PNG, a wrong form field, 17 files, a text file). Prints one JSON line: the status of every
kind of request, p50/p95 latency of the good and of all requests (ms, client side), and the server's
peak resident memory (VmHWM, MB) before and after the burst.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import statistics
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
from PIL import Image


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels and holds one row of them."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * (1 + 3 * 1024)))


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) / 1024.0 for line in f if line.startswith("VmHWM:"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="an export folder")
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--size", type=int, default=256, help="side of the good images (px)")
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "diff_fastener_jax.serve",
            "--model",
            args.model,
            "--port",
            str(port),
            "--log_level",
            "warning",
        ]
    )
    try:
        while True:
            if server.poll() is not None:
                raise SystemExit(f"server exited with {server.returncode}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        rss_idle = peak_rss_mb(server.pid)
        rng = np.random.default_rng(0)
        good = [png(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)) for _ in range(4)]
        big = b"\0" * (21 * 2**20)
        truncated = good[0][: len(good[0]) // 2]
        part = (
            (
                b'--x\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
                b"Content-Type: image/png\r\n\r\n"
            )
            + big
            + b"\r\n--x--\r\n"
        )

        def chunked():  # no Content-Length
            for i in range(0, len(part), 2**16):
                yield part[i : i + 2**16]

        hostile = {
            "bomb_header": lambda: {
                "files": [("file", ("bomb.png", png_header(13000, 13000), "image/png"))],
                "params": {"heatmap": "true"},
            },
            "oversize": lambda: {"files": [("file", ("big.png", big, "image/png"))]},
            "oversize_chunked": lambda: {
                "content": chunked(),
                "headers": {"content-type": "multipart/form-data; boundary=x"},
            },
            "truncated": lambda: {"files": [("file", ("cut.png", truncated, "image/png"))]},
            "wrong_field": lambda: {"files": [("image", ("a.png", good[0], "image/png"))]},
            "too_many_files": lambda: {"files": [("file", (f"{i}.png", good[0], "image/png")) for i in range(17)]},
            "not_an_image": lambda: {"files": [("file", ("notes.txt", b"plain text", "text/plain"))]},
        }
        jobs = []
        for i in range(args.requests):
            if i % 2 == 0:
                kw = {"files": [("file", ("good.png", good[(i // 2) % 4], "image/png"))]}
                jobs.append(("good", kw | ({"params": {"heatmap": "true"}} if i % 4 == 0 else {})))
            else:
                name = list(hostile)[(i // 2) % len(hostile)]
                jobs.append((name, hostile[name]))

        def send(job):
            kind, kw = job
            kw = kw() if callable(kw) else kw
            t = time.perf_counter()
            try:
                with httpx.Client(timeout=600) as c:
                    status = c.post(url + "/predict", **kw).status_code
            except httpx.TransportError as e:  # the server may close a refused upload while it is sent
                status = type(e).__name__
            return kind, status, 1000 * (time.perf_counter() - t)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            answers = list(pool.map(send, jobs))
        wall = time.perf_counter() - t0
        alive = server.poll() is None and httpx.get(url + "/health", timeout=10).status_code == 200
        rss_peak = peak_rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(30)

    def pct(xs, q):
        return float(np.percentile(xs, q)) if xs else None

    good_ms = [ms for kind, _, ms in answers if kind == "good"]
    all_ms = [ms for _, _, ms in answers]
    statuses: dict = {}
    for kind, status, _ in answers:
        statuses.setdefault(kind, []).append(status)
    print(
        json.dumps(
            {
                "requests": args.requests,
                "concurrency": args.concurrency,
                "good_image_px": args.size,
                "statuses": {k: sorted(set(map(str, v))) for k, v in statuses.items()},
                "server_alive": alive,
                "good_ms_p50": pct(good_ms, 50),
                "good_ms_p95": pct(good_ms, 95),
                "all_ms_p50": pct(all_ms, 50),
                "all_ms_p95": pct(all_ms, 95),
                "all_ms_median": statistics.median(all_ms),
                "wall_s": wall,
                "server_peak_rss_mb_idle": rss_idle,
                "server_peak_rss_mb": rss_peak,
                "model": os.path.abspath(args.model),
                "host": platform.node(),
                "cpus": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
