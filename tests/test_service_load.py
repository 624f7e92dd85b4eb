"""The service under a burst of concurrent good and hostile requests: a real uvicorn server on a free
loopback port around the exported smoke model. It must stay up, score every good image exactly as
`Detector.predict` does, refuse every hostile request with the right status in the one error shape,
and keep its peak resident memory under a fixed bound.
"""

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from helpers import subprocess_env
from ship_support import png_bytes, png_header, running_service, smoke_export, smoke_test_images

from diff_fastener_jax import Detector

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

NUM_REQUESTS, CONCURRENCY = 24, 8
# Peak RSS of the whole server process (Python, JAX, the compiled smoke model and the burst): about
# 0.7 GB measured on a 2-core CPU host; the bound leaves room for allocator noise, not for a decoded bomb.
PEAK_RSS_BOUND_MB = 1500
LIMITS = {"max_upload_mb": "1", "max_pixels": "1000000", "max_files": "4", "max_queue": str(NUM_REQUESTS)}


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set (VmHWM), MB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmHWM")


@pytest.fixture(scope="module")
def server(tmp_path_factory, smoke_run):
    """(url, export folder, smoke run, server process, log path); the server is stopped afterwards."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs /proc to read the server's peak memory")
    folder = smoke_export(tmp_path_factory, smoke_run)
    log_path = tmp_path_factory.mktemp("load") / "server.log"
    args = [a for k, v in LIMITS.items() for a in (f"--{k}", v)]
    env = subprocess_env(XLA_FLAGS="", PYTHONUNBUFFERED="1")
    with running_service(folder, log_path, *args, env=env) as (url, proc):
        yield url, folder, smoke_run, proc, log_path


def multipart(field: str, name: str, data: bytes, boundary: str = "l0ad") -> tuple[bytes, str]:
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def hostile_requests(good: bytes) -> list[tuple[str, int, dict]]:
    """(name, expected status, httpx.post keyword arguments) of the requests a client must not get past;
    a "content" value is a function that makes a fresh chunked body (a generator is used up once sent)."""
    body, ctype = multipart("file", "stream.bin", b"\0" * (1_300_000))

    def chunked():  # no Content-Length: the limit is enforced as the chunks arrive
        for i in range(0, len(body), 65536):
            yield body[i : i + 65536]

    truncated = png_bytes(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    return [
        ("bomb", 413, {"files": [("file", ("bomb.png", png_header(13000, 13000), "image/png"))]}),
        ("oversize", 413, {"files": [("file", ("big.png", b"\0" * 1_300_000, "image/png"))]}),
        ("oversize_chunked", 413, {"content": chunked, "headers": {"content-type": ctype}}),
        ("truncated", 422, {"files": [("file", ("cut.png", truncated[: len(truncated) // 2], "image/png"))]}),
        ("wrong_field", 422, {"files": [("image", ("a.png", good, "image/png"))]}),
        ("too_many_files", 413, {"files": [("file", (f"{i}.png", good, "image/png")) for i in range(5)]}),
        ("not_an_image", 415, {"files": [("file", ("notes.txt", b"plain text", "text/plain"))]}),
        ("bad_query", 422, {"files": [("file", ("a.png", good, "image/png"))], "params": {"heatmap": "maybe"}}),
    ]


@pytest.mark.slow
def test_service_survives_a_burst_of_good_and_hostile_requests(server):
    url, folder, run, proc, log_path = server
    paths = smoke_test_images(run, 4)
    reference = Detector.load(folder).predict(paths)
    good = [open(p, "rb").read() for p in paths]
    hostile = hostile_requests(good[0])
    jobs = []  # (kind, expected, kwargs)
    for i in range(NUM_REQUESTS):
        if i % 2 == 0:
            j = (i // 2) % len(paths)
            jobs.append(
                (
                    ("good", j),
                    200,
                    {
                        "files": [("file", (f"good{j}.png", good[j], "image/png"))],
                        "params": {"heatmap": "true"} if i % 4 == 0 else {},
                    },
                )
            )
        else:
            name, status, kw = hostile[(i // 2) % len(hostile)]
            jobs.append((name, status, kw))

    def send(job):
        kind, _, kw = job
        if callable(kw.get("content")):
            kw = kw | {"content": kw["content"]()}
        with httpx.Client(timeout=120.0) as client:
            return kind, client.post(url + "/predict", **kw)

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        answers = list(pool.map(send, jobs))

    assert proc.poll() is None, "the server died"
    assert httpx.get(url + "/health", timeout=10).json()["status"] == "ok"
    for (kind, r), (_, expected, _) in zip(answers, jobs):
        assert r.status_code == expected, (kind, r.text[:300])
        if expected == 200:
            j = kind[1]
            assert r.json()["score"] == pytest.approx(float(reference.scores[j]), abs=1e-5), kind
        else:
            err = r.json()["error"]
            assert set(r.json()) == {"error"} and err["status"] == expected and err["message"], (kind, r.text)
    rss = peak_rss_mb(proc.pid)
    assert rss < PEAK_RSS_BOUND_MB, f"server peak RSS {rss:.0f} MB"
    # The start-up line and one access-log line per request.
    text = open(log_path).read()
    assert f"serving {folder} at {url}" in text and "threshold" in text
    assert text.count('"POST /predict') == NUM_REQUESTS  # '"POST /predict?heatmap=true HTTP/1.1" 200 OK'
