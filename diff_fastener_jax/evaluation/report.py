"""Self-contained HTML evaluation report: one file, every image a base64 PNG data URI.

The page holds the headline metrics, per-defect metrics, image-level ROC and PR curves, score
histograms per defect type with the decision threshold, per-image panels
(input | reconstruction | ground truth | heat-map overlay | predicted mask) and the run's config.
No external CSS, JS, fonts or images. Figures are drawn with matplotlib's object API on an Agg
canvas (no pyplot, so no global backend switch and no display needed).
"""

from __future__ import annotations

import base64
import html
import io
import math
import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from diff_fastener_jax.deploy.heatmap import heat_overlay
from diff_fastener_jax.evaluation import metrics as M

# Headline table order; other scalar metrics follow in sorted order.
_HEADLINE_KEYS = (
    "image_auroc",
    "image_ap",
    "image_f1_max",
    "image_tpr_at_5fpr",
    "pixel_auroc",
    "pixel_ap",
    "pixel_f1_max",
    "pixel_aupro",
    "threshold",
    "threshold_source",
    "precision",
    "recall",
    "f1",
    "accuracy",
    "images_per_second",
    "num_images",
    "num_anomalous",
    "has_masks",
)
# Shown elsewhere on the page (confusion matrix, warnings) or nested.
_SKIP_KEYS = {
    "per_defect",
    "confusion_matrix",
    "warnings",
    "identical_test_images",
    "tp",
    "fp",
    "tn",
    "fn",
    "pixel_metrics_note",
    "reference",
}
_PER_DEFECT_KEYS = (
    "num_images",
    "image_auroc",
    "image_ap",
    "image_f1_max",
    "image_tpr_at_5fpr",
    "pixel_auroc",
    "pixel_ap",
    "pixel_f1_max",
    "pixel_aupro",
    "precision",
    "recall",
    "f1",
)
_PANEL_CELLS = ("input", "reconstruction", "ground truth", "heat-map overlay", "predicted mask")
NO_MASKS_TEXT = (
    "This dataset has no ground-truth masks: pixel-level metrics are not computed and the panels show no ground truth."
)

_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em 0; }
th, td { border: 1px solid #bbb; padding: 3px 8px; text-align: right; }
th { background: #eee; }
td.l, th.l { text-align: left; }
.note { background: #fff6d5; border: 1px solid #e0c060; padding: 6px 10px; margin: 6px 0; }
.panel { margin: 1em 0; }
.panel td { text-align: center; vertical-align: top; }
.panel img { width: 192px; image-rendering: pixelated; }
.missing { width: 192px; height: 192px; display: flex; align-items: center; justify-content: center;
           background: #f0f0f0; color: #666; }
pre { background: #f6f6f6; padding: 10px; overflow-x: auto; font-size: 12px; }
"""


# ----------------------------------------------------------------------------------------------
# Panel selection
# ----------------------------------------------------------------------------------------------


def select_panels(scores, labels, k: int) -> list[tuple[int, str]]:
    """Chooses up to k distinct images: about half 'hardest', the rest 'clearest'.

    hardest: highest-scoring normals (near false alarms) and lowest-scoring anomalies (near misses);
    clearest: highest-scoring anomalies and lowest-scoring normals. Each half splits between the two
    classes (normals get the extra one); a class that runs short hands its share to the other.
    Returns [(index, kind)], hardest first, each list ordered from the most extreme case.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"select_panels: scores has {s.size} entries but labels has {y.size}")
    k = max(0, min(int(k), s.size))
    normal = np.flatnonzero(y == 0)
    anomal = np.flatnonzero(y != 0)
    # Stable sorts keep ties in index order, so the choice is deterministic.
    normal_desc = normal[np.argsort(-s[normal], kind="stable")]
    anomal_asc = anomal[np.argsort(s[anomal], kind="stable")]
    used: set[int] = set()

    def take(first: np.ndarray, second: np.ndarray, n: int) -> list[int]:
        n_first = (n + 1) // 2
        a = [int(i) for i in first if int(i) not in used][:n_first]
        b = [int(i) for i in second if int(i) not in used][: n - len(a)]
        if len(a) + len(b) < n:  # `second` ran short: give `first` the rest
            a = [int(i) for i in first if int(i) not in used][: n - len(b)]
        chosen = a + b
        used.update(chosen)
        return chosen

    n_hard = (k + 1) // 2
    hardest = take(normal_desc, anomal_asc, n_hard)
    clearest = take(normal_desc[::-1], anomal_asc[::-1], k - len(hardest))
    return [(i, "hardest") for i in hardest] + [(i, "clearest") for i in clearest]


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------


def _png_uri_from_array(rgb: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _png_uri_from_figure(fig: Figure) -> str:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _to_rgb_u8(img, where: str) -> np.ndarray:
    """(H, W, 3) uint8 from uint8 or float in [-1, 1]; greyscale (H, W) / (H, W, 1) is repeated."""
    a = np.asarray(img)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3):
        raise ValueError(f"{where}: expected an (H, W, 3) or (H, W) image, got shape {a.shape}")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    if a.dtype == np.uint8:
        return a
    a = np.nan_to_num(a.astype(np.float32))
    return np.round(np.clip((a + 1.0) * 127.5, 0, 255)).astype(np.uint8)


def _mask_u8(mask, shape, where: str) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim == 3 and m.shape[-1] == 1:
        m = m[..., 0]
    if m.shape != shape:
        raise ValueError(f"{where}: mask shape {m.shape} does not match the image's {shape}")
    return np.repeat((m > 0).astype(np.uint8)[..., None] * 255, 3, axis=-1)


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------


def _has_both_classes(labels: np.ndarray) -> bool:
    return labels.size > 0 and 0 < int(labels.sum()) < labels.size


def _roc_figure(scores, labels, threshold) -> str:
    fig = Figure(figsize=(4.5, 4.0))
    ax = fig.add_subplot()
    if _has_both_classes(labels):
        fpr, tpr, _ = M.roc_curve_points(scores, labels)
        auroc = M.image_metrics(scores, labels)["image_auroc"]
        ax.plot(fpr, tpr, lw=1.8, label=f"AUROC {auroc:.4f}")
        if threshold is not None:
            pred = scores > threshold
            ax.plot([pred[labels == 0].mean()], [pred[labels == 1].mean()], "ro", label="threshold")
        ax.plot([0, 1], [0, 1], color="0.7", ls="--", lw=1)
        ax.legend(loc="lower right")
    else:
        ax.text(0.5, 0.5, "ROC undefined:\nonly one class", ha="center", va="center")
    ax.set(
        xlim=(0, 1), ylim=(0, 1.02), xlabel="false positive rate", ylabel="true positive rate", title="Image-level ROC"
    )
    fig.tight_layout()
    return _png_uri_from_figure(fig)


def _pr_figure(scores, labels, threshold) -> str:
    fig = Figure(figsize=(4.5, 4.0))
    ax = fig.add_subplot()
    if _has_both_classes(labels):
        recall, precision, _ = M.pr_curve_points(scores, labels)
        ap = M.image_metrics(scores, labels)["image_ap"]
        # sklearn lists recall decreasing; each precision holds over the recall step ending at its point.
        ax.step(recall[::-1], precision[::-1], where="pre", lw=1.8, label=f"AP {ap:.4f}")
        if threshold is not None:
            pred = scores > threshold
            tp = int(np.sum(pred & (labels == 1)))
            if pred.any():
                ax.plot([tp / labels.sum()], [tp / pred.sum()], "ro", label="threshold")
        ax.axhline(labels.mean(), color="0.7", ls="--", lw=1)
        ax.legend(loc="lower left")
    else:
        ax.text(0.5, 0.5, "PR curve undefined:\nonly one class", ha="center", va="center")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision", title="Image-level precision-recall")
    fig.tight_layout()
    return _png_uri_from_figure(fig)


def _histogram_figure(scores, labels, defects, threshold) -> str:
    fig = Figure(figsize=(7.0, 4.0))
    ax = fig.add_subplot()
    groups: dict[str, list[int]] = {}
    for i, d in enumerate(defects):
        groups.setdefault(str(d), []).append(i)
    # Normal groups first, then defect types by name.
    names = sorted(groups, key=lambda g: (int(labels[groups[g]].max()) if groups[g] else 0, g))
    edges = np.histogram_bin_edges(scores, bins=min(40, max(5, scores.size // 4)))
    if edges[0] == edges[-1]:
        edges = np.array([edges[0] - 0.5, edges[0] + 0.5])
    for name in names:
        idx = np.array(groups[name])
        is_normal = labels[idx].max() == 0
        ax.hist(
            scores[idx],
            bins=edges,
            histtype="step",
            lw=2.2 if is_normal else 1.4,
            ls="--" if is_normal else "-",
            label=f"{name} ({idx.size})",
        )
    if threshold is not None and np.isfinite(threshold):
        ax.axvline(threshold, color="k", lw=1.2, label=f"threshold {threshold:.4g}")
    ax.set(xlabel="image anomaly score", ylabel="images", title="Score histograms by defect type")
    ax.legend(fontsize=8, loc="best", ncol=3 if len(names) > 4 else 1)
    fig.tight_layout()
    return _png_uri_from_figure(fig)


# ----------------------------------------------------------------------------------------------
# HTML pieces
# ----------------------------------------------------------------------------------------------


def _fmt(v) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if math.isnan(v):
            return "n/a"
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
    return html.escape(str(v))


def _is_scalar(v) -> bool:
    return isinstance(v, (bool, int, float, str, np.generic)) or v is None


def _metrics_table(metrics: dict) -> str:
    # None: a metric the split cannot give (pixel metrics without pixel labels); the notes say why
    keys = [k for k in _HEADLINE_KEYS if metrics.get(k) is not None]
    keys += sorted(
        k
        for k in metrics
        if k not in keys and k not in _SKIP_KEYS and metrics[k] is not None and _is_scalar(metrics[k])
    )
    rows = "".join(f"<tr><th class='l'>{html.escape(k)}</th><td>{_fmt(metrics[k])}</td></tr>" for k in keys)
    return f"<table>{rows}</table>"


def _confusion_table(metrics: dict) -> str:
    cm = metrics.get("confusion_matrix")
    if cm is None:
        return ""
    (tn, fp), (fn, tp) = cm
    return (
        "<h3>Confusion matrix at the threshold</h3><table>"
        "<tr><th></th><th>predicted normal</th><th>predicted anomalous</th></tr>"
        f"<tr><th class='l'>normal</th><td>{_fmt(tn)}</td><td>{_fmt(fp)}</td></tr>"
        f"<tr><th class='l'>anomalous</th><td>{_fmt(fn)}</td><td>{_fmt(tp)}</td></tr></table>"
    )


def _per_defect_table(per_defect: dict) -> str:
    if not per_defect:
        return "<p>No defect types.</p>"
    cols = [k for k in _PER_DEFECT_KEYS if any(e.get(k) is not None for e in per_defect.values())]
    head = "<tr><th class='l'>defect</th>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>"
    body = "".join(
        f"<tr><td class='l'>{html.escape(str(d))}</td>"
        + "".join(f"<td>{_fmt(e[c]) if c in e else '-'}</td>" for c in cols)
        + "</tr>"
        for d, e in per_defect.items()
    )
    return f"<table>{head}{body}</table>"


def _reference_table(metrics: dict) -> str:
    """The model's image / pixel AUROC and AUPRO beside each reference detector's (evaluation.reference)."""
    ref = metrics.get("reference") or {}
    if not ref:
        return ""
    cols = ("image_auroc", "pixel_auroc", "pixel_aupro")
    rows = {"model": metrics} | {
        name + (f" ({r['statistic']})" if r.get("statistic") else ""): r for name, r in ref.items()
    }
    head = "<tr><th class='l'>detector</th>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>"
    body = "".join(
        f"<tr><td class='l'>{html.escape(name)}</td>"
        + "".join(f"<td>{'-' if r.get(c) is None else _fmt(r[c])}</td>" for c in cols)
        + "</tr>"
        for name, r in rows.items()
    )
    return (
        "<h2>Reference detectors</h2><p>Fitted on the training normals only, scored on the same test "
        "images: global_stats = the best of four grey-level image statistics (two-sided), pixel_gaussian "
        f"= a per-pixel Gaussian of the normals (z-score map, top-K).</p><table>{head}{body}</table>"
    )


def _panel_html(p: dict, i: int) -> str:
    where = f"panel {i} ({p.get('path', '?')})"
    rgb = _to_rgb_u8(p["image"], where + " image")
    shape = rgb.shape[:2]
    cells = [_png_uri_from_array(rgb), _png_uri_from_array(_to_rgb_u8(p["reconstruction"], where + " reconstruction"))]
    mask = p.get("mask")
    cells.append(None if mask is None else _png_uri_from_array(_mask_u8(mask, shape, where)))
    cells.append(_png_uri_from_array(heat_overlay(rgb, p["anomaly_map"], where)))
    pred = p.get("pred_mask")
    if pred is None:  # fall back to the 0.5 probability cut the segmentation head is trained for
        pred = np.asarray(p["anomaly_map"]) >= 0.5
    cells.append(_png_uri_from_array(_mask_u8(pred, shape, where + " pred_mask")))
    label = "anomalous" if int(p.get("label", 0)) else "normal"
    head = "".join(f"<th>{c}</th>" for c in _PANEL_CELLS)
    tds = "".join(
        f"<td><img alt='{name}' src='{uri}'></td>" if uri else "<td><div class='missing'>no mask</div></td>"
        for name, uri in zip(_PANEL_CELLS, cells, strict=True)
    )
    caption = (
        f"<b>{html.escape(str(p.get('kind', '')))}</b> &middot; {html.escape(str(p.get('defect', '')))} "
        f"({label}) &middot; score {_fmt(float(p.get('score', math.nan)))} &middot; "
        + (f"denoising step {int(p['denoise_step'])} &middot; " if "denoise_step" in p else "")
        + f"<code>{html.escape(str(p.get('path', '')))}</code>"
    )
    return f"<div class='panel'><div>{caption}</div><table><tr>{head}</tr><tr>{tds}</tr></table></div>"


def _page(title: str, body: str) -> str:
    return (
        f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body>\n<h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n"
    )


def _write(path: str, text: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)  # readers never see a half-written page


# ----------------------------------------------------------------------------------------------
# Public writers
# ----------------------------------------------------------------------------------------------


def write_report(
    path: str,
    *,
    metrics: dict,
    per_defect: dict,
    scores,
    labels,
    defects,
    panels: list[dict],
    config_json: str,
    title: str,
    notes=(),
) -> None:
    """Writes one self-contained HTML evaluation page to `path`.

    metrics: flat dict (scalars shown in the headline table; `threshold` draws the threshold line and
    operating points; `confusion_matrix` and `warnings` get their own sections; `has_masks` False
    adds the no-masks notice). per_defect: {defect: {metric: value}}. scores (N,), labels (N,) {0,1},
    defects (N,) names. panels: dicts with image, reconstruction ((H, W, 3) float in [-1, 1] or
    uint8), mask ((H, W) or None), anomaly_map ((H, W) in [0, 1]), pred_mask ((H, W) bool),
    score, label, defect, path, kind. config_json: shown escaped in <pre>. notes: extra lines.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    defects = [str(d) for d in defects]
    if not (s.size == y.size == len(defects)):
        raise ValueError(f"write_report: scores/labels/defects have {s.size}/{y.size}/{len(defects)} entries")
    threshold = metrics.get("threshold")
    threshold = float(threshold) if threshold is not None else None
    has_masks = metrics.get("has_masks")
    if has_masks is None:
        has_masks = bool(panels) and all(p.get("mask") is not None for p in panels)

    parts = []
    all_notes = list(notes) + list(metrics.get("warnings", []))
    if not has_masks:
        all_notes.insert(0, NO_MASKS_TEXT)
    parts += [f"<div class='note'>{html.escape(str(n))}</div>" for n in all_notes]
    parts.append("<h2>Metrics</h2>" + _metrics_table(metrics) + _confusion_table(metrics))
    parts.append(_reference_table(metrics))
    if metrics.get("per_category"):
        rows = dict(metrics["per_category"])
        rows["mean over categories"] = metrics.get("per_category_mean", {})
        parts.append(
            "<h2>Per category (one unified model)</h2><p>Each row: that category's test images, "
            "scored against its own threshold.</p>" + _per_defect_table(rows).replace(">defect<", ">category<")
        )
    parts.append(
        "<h2>Per defect type</h2><p>Each row: that type's images plus every normal image.</p>"
        + _per_defect_table(per_defect)
    )
    parts.append(
        "<h2>Curves and score distributions</h2><div>"
        f"<img alt='ROC curve' src='{_roc_figure(s, y, threshold)}'> "
        f"<img alt='PR curve' src='{_pr_figure(s, y, threshold)}'></div>"
        f"<div><img alt='score histogram' src='{_histogram_figure(s, y, defects, threshold)}'></div>"
    )
    parts.append(
        "<h2>Images</h2><p><b>hardest</b>: highest-scoring normals and lowest-scoring anomalies; "
        "<b>clearest</b>: highest-scoring anomalies and lowest-scoring normals. The heat map is the "
        "anomaly probability (blue 0, red 1) over the input.</p>"
    )
    parts += [_panel_html(p, i) for i, p in enumerate(panels)] or ["<p>No panels.</p>"]
    parts.append(f"<h2>Configuration</h2><pre>{html.escape(config_json)}</pre>")
    _write(path, _page(title, "\n".join(parts)))


def write_summary_html(path: str, title: str, rows: dict) -> None:
    """Writes a small self-contained page: one table row per metric, `rows = {name: (mean, std)}`."""
    body = "".join(
        f"<tr><th class='l'>{html.escape(str(k))}</th><td>{_fmt(float(m))}</td><td>{_fmt(float(sd))}</td></tr>"
        for k, (m, sd) in rows.items()
    )
    table = f"<table><tr><th class='l'>metric</th><th>mean</th><th>std</th></tr>{body}</table>"
    _write(path, _page(title, table if rows else "<p>No metrics.</p>"))
