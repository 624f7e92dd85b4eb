"""logging_utils: JSON lines, TensorBoard scalars through tensorboardX, plain progress lines off a terminal."""

import glob
import io
import json
import struct

from diff_fastener_jax.logging_utils import MetricsWriter, ProgressBar, format_seconds


def _tensorboard_scalars(logdir) -> dict:
    """{(tag, step): value} from the event files (TFRecord framing: length, crc, payload, crc)."""
    from tensorboardX.proto import event_pb2

    out = {}
    for path in glob.glob(f"{logdir}/events.out.tfevents.*"):
        data = open(path, "rb").read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                out[(v.tag, event.step)] = v.simple_value
    return out


def test_metrics_jsonl_and_tensorboard_without_tensorflow(tmp_path, capsys):
    writer = MetricsWriter(str(tmp_path))
    writer.enable_tensorboard(str(tmp_path / "tb"))
    writer.write({"step": 2, "total": 1.5, "event": "x"}, "step 2")
    writer.write({"step": 4, "total": 0.25, "val_image_auroc": 0.75})
    writer.close()
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [x["step"] for x in lines] == [2, 4] and lines[0]["event"] == "x"
    assert capsys.readouterr().out == "step 2\n"
    scalars = _tensorboard_scalars(tmp_path / "tb")
    assert scalars == {("total", 2): 1.5, ("total", 4): 0.25, ("val_image_auroc", 4): 0.75}


def test_progress_prints_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    bar = ProgressBar(10, "images", file=out, every_s=3600)
    for _ in range(5):
        bar.update(2)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("10/10 images (") and "\r" not in out.getvalue()
    silent = io.StringIO()
    ProgressBar(3, file=silent, disable=True).update(3)
    assert silent.getvalue() == ""


def test_format_seconds():
    assert format_seconds(12345) == "3h25m45s" and format_seconds(65) == "1m05s" and format_seconds(float("inf")) == "?"


def test_resume_drops_the_lines_a_resumed_run_writes_again(tmp_path):
    """A run checkpointed at step 3 that died after logging steps 4 and 5 (and half a line): the resume
    from step 3 keeps what the checkpoint covers, so no step is in the file twice; the values are
    strict JSON (NaN is null)."""
    writer = MetricsWriter(str(tmp_path), quiet=True)
    writer.write({"event": "start", "step": 0})
    writer.write({"event": "auto", "step": 0, "foreground": "otsu"})
    for step in (1, 2, 3, 4, 5):
        writer.write({"step": step, "total": 1.0 / step})
    writer.write({"step": 3, "event": "validation", "val_image_auroc": float("nan")})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "tot')  # the crash cut this line short
    writer.resume_at(3)
    writer.write({"event": "resume", "step": 3})
    writer.write({"event": "auto", "step": 3, "foreground": "otsu"})
    for step in (4, 5, 6):
        writer.write({"step": step, "total": 1.0 / step})
    writer.write({"event": "done", "step": 6})
    text = open(tmp_path / "metrics.jsonl").read()
    assert "NaN" not in text
    lines = [json.loads(x) for x in text.splitlines()]
    keys = [(x.get("event"), x["step"]) for x in lines]
    assert len(keys) == len(set(keys)), keys
    assert [x["step"] for x in lines if "total" in x] == [1, 2, 3, 4, 5, 6]
    assert [x for x in lines if x.get("event") == "validation"][0]["val_image_auroc"] is None
    # Resumed again from the same checkpoint: still one resume line, one done line, and the foreground
    # choice once per start.
    writer.resume_at(3)
    writer.write({"event": "resume", "step": 3})
    writer.write({"event": "auto", "step": 3, "foreground": "otsu"})
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [x["step"] for x in lines if x.get("event") == "resume"] == [3]
    assert [x["step"] for x in lines if x.get("event") == "auto"] == [0, 3]
    assert [x for x in lines if x.get("event") == "done"] == []
