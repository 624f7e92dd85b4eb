"""The HTML report: self-contained, every embedded PNG decodes, no-masks runs say so; panel choice."""

import base64
import io
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from diff_fastener_jax.evaluation import metrics as M
from diff_fastener_jax.evaluation import report


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs = []  # (alt, src)
        self.external = []  # any tag pulling something from outside the page
        self.pre = []
        self._in_pre = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append((a.get("alt"), a.get("src", "")))
        if tag in ("script", "link", "iframe") or (tag == "img" and not a.get("src", "").startswith("data:")):
            self.external.append((tag, a))
        self._in_pre = tag == "pre"

    def handle_endtag(self, tag):
        if tag == "pre":
            self._in_pre = False

    def handle_data(self, data):
        if self._in_pre:
            self.pre.append(data)


def _fake_run(rng, n=24, size=32, with_masks=True):
    labels = np.array([0] * 12 + [1] * (n - 12))
    defects = ["good"] * 12 + ["crack", "scratch"] * ((n - 12) // 2)
    scores = rng.uniform(0, 1, n) + 0.5 * labels
    masks = np.zeros((n, size, size), np.uint8)
    masks[labels == 1, 8:16, 8:20] = 1
    maps = np.clip(rng.uniform(0, 0.6, masks.shape) + 0.4 * masks, 0, 1)
    threshold = M.calibrate_threshold(scores[:12], 0.1)
    metrics = M.compute_all_metrics(
        scores, labels, maps=maps if with_masks else None, masks=masks if with_masks else None, threshold=threshold
    )
    per_defect = M.per_defect_metrics(
        scores, labels, defects, maps if with_masks else None, masks if with_masks else None, threshold=threshold
    )
    panels = []
    for idx, kind in report.select_panels(scores, labels, 4):
        img = rng.uniform(-1, 1, (size, size, 3)).astype(np.float32)
        panels.append(
            {
                "image": img,
                "reconstruction": (np.clip(img * 0.9, -1, 1) * 127.5 + 127.5).astype(np.uint8),
                "mask": masks[idx] if with_masks else None,
                "anomaly_map": maps[idx],
                "pred_mask": maps[idx] >= 0.5,
                "score": float(scores[idx]),
                "label": int(labels[idx]),
                "defect": defects[idx],
                "path": f"test/{defects[idx]}/{idx:03d}<&>.png",
                "kind": kind,
            }
        )
    return dict(metrics=metrics, per_defect=per_defect, scores=scores, labels=labels, defects=defects, panels=panels)


def _parse(path):
    text = path.read_text(encoding="utf-8")
    c = _Collector()
    c.feed(text)
    return text, c


def _decode_all(imgs):
    for alt, src in imgs:
        assert src.startswith("data:image/png;base64,"), alt
        im = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        im.load()
        assert im.size[0] > 0 and im.size[1] > 0


def test_report_embeds_decodable_figures(tmp_path):
    run = _fake_run(np.random.default_rng(0))
    config_json = '{"data": {"root": "<script>alert(1)</script>"}}'
    out = tmp_path / "sub" / "report.html"
    report.write_report(str(out), config_json=config_json, title="Test <run>", notes=["a note"], **run)
    text, c = _parse(out)
    assert not c.external, c.external
    _decode_all(c.imgs)
    alts = [a for a, _ in c.imgs]
    for fig in ("ROC curve", "PR curve", "score histogram"):
        assert alts.count(fig) == 1, fig
    for cell in report._PANEL_CELLS:  # one image per panel cell, masks included
        assert alts.count(cell) == len(run["panels"]), cell
    # Config shown verbatim after unescaping, never as live markup.
    assert "".join(c.pre).strip() == config_json
    assert "<script>" not in text and "Test &lt;run&gt;" in text
    assert "a note" in text and report.NO_MASKS_TEXT not in text
    assert "image_auroc" in text and "pixel_aupro" in text and "crack" in text and "scratch" in text
    assert "hardest" in text and "clearest" in text


def test_report_without_masks_says_so(tmp_path):
    run = _fake_run(np.random.default_rng(1), with_masks=False)
    out = tmp_path / "report.html"
    report.write_report(str(out), config_json="{}", title="no masks", **run)
    text, c = _parse(out)
    _decode_all(c.imgs)
    assert report.NO_MASKS_TEXT in text
    assert "pixel_auroc" not in text
    alts = [a for a, _ in c.imgs]
    assert alts.count("ground truth") == 0 and alts.count("heat-map overlay") == len(run["panels"])
    assert text.count("no mask</div>") == len(run["panels"])


def test_report_single_class_still_renders(tmp_path):
    rng = np.random.default_rng(2)
    scores = rng.uniform(size=6)
    labels = np.zeros(6, int)
    metrics = M.compute_all_metrics(scores, labels, threshold=0.5)
    out = tmp_path / "r.html"
    report.write_report(
        str(out),
        metrics=metrics,
        per_defect={},
        scores=scores,
        labels=labels,
        defects=["good"] * 6,
        panels=[],
        config_json="{}",
        title="one class",
    )
    text, c = _parse(out)
    _decode_all(c.imgs)
    assert len(c.imgs) == 3 and "image metrics undefined" in text


def test_select_panels():
    scores = np.array([0.1, 0.9, 0.2, 0.3, 0.8, 0.05, 0.7, 0.4])
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    chosen = report.select_panels(scores, labels, 4)
    assert chosen == [(1, "hardest"), (5, "hardest"), (0, "clearest"), (4, "clearest")]
    # Indices never repeat, even when k covers everything; k is capped at the number of images.
    all_ = report.select_panels(scores, labels, 20)
    assert sorted(i for i, _ in all_) == list(range(8))
    # One class only: the other class's share is filled from it.
    only_normal = report.select_panels(scores[:4], labels[:4], 2)
    assert only_normal == [(1, "hardest"), (0, "clearest")]
    assert report.select_panels(scores, labels, 0) == []


def test_write_summary_html(tmp_path):
    out = tmp_path / "cv.html"
    report.write_summary_html(
        str(out), "5-fold <cv>", {"image_auroc": (0.95, 0.01), "pixel_aupro": (0.8, float("nan"))}
    )
    text, c = _parse(out)
    assert "0.9500" in text and "0.0100" in text and "n/a" in text and "5-fold &lt;cv&gt;" in text
    assert not c.external


def test_panel_shape_mismatch_is_a_clear_error(tmp_path):
    run = _fake_run(np.random.default_rng(3))
    run["panels"][0]["anomaly_map"] = np.zeros((5, 5))
    with pytest.raises(ValueError, match="anomaly_map shape"):
        report.write_report(str(tmp_path / "r.html"), config_json="{}", title="t", **run)
