// The inspection page: sends each picked or dropped image to the service's own /predict (one request
// per image, so one bad file does not hide the others' results) and shows the verdict, the score
// against the threshold and the heat-map overlay. Everything stays on this page: the CSV is built here.
"use strict";

(function () {
  const SCORE_DIGITS = 4; // significant digits of the scores shown (the CSV keeps them all)
  const MODEL_INFO_URLS = ["metadata", "info"]; // relative: the page also works behind a path prefix
  const PREDICT_URL = "predict";

  const el = (id) => document.getElementById(id);
  const results = []; // one row per image sent, in order: what the table and the CSV show
  let model = null; // the service's model description (categories, threshold, limits)

  function formatScore(x) {
    return typeof x === "number" && isFinite(x) ? x.toPrecision(SCORE_DIGITS) : "–";
  }

  // The readable message of an error answer, whichever shape the service uses:
  // {"error": {"message": ...}}, {"error": "..."} or FastAPI's {"detail": "..." | [{loc, msg}, ...]}.
  function errorMessage(body, response) {
    const fallback = `HTTP ${response.status}${response.statusText ? " " + response.statusText : ""}`;
    if (!body || typeof body !== "object") return fallback;
    const err = body.error;
    if (err && typeof err === "object" && err.message) return String(err.message);
    if (typeof err === "string" && err) return err;
    const detail = body.detail;
    if (typeof detail === "string" && detail) return detail;
    if (Array.isArray(detail) && detail.length) {
      return detail.map((d) => {
        const where = Array.isArray(d.loc) ? d.loc.filter((p) => p !== "body" && p !== "query").join(".") : "";
        const what = d.msg || JSON.stringify(d);
        return where ? `${where}: ${what}` : what;
      }).join("; ");
    }
    if (detail && typeof detail === "object" && detail.message) return String(detail.message);
    return fallback;
  }

  async function readJson(response) {
    const text = await response.text();
    try {
      return JSON.parse(text);
    } catch (e) {
      return null; // a proxy's HTML error page, an empty body: errorMessage falls back to the status
    }
  }

  function showPageError(message) {
    const box = el("page-error");
    box.textContent = message;
    box.hidden = !message;
  }

  function setStatus(message) {
    el("status").textContent = message;
  }

  function categoriesOf(info) {
    if (Array.isArray(info.categories)) return info.categories;
    const perCategory = info.threshold && info.threshold.per_category;
    return perCategory ? Object.keys(perCategory) : [];
  }

  async function loadModel() {
    for (const url of MODEL_INFO_URLS) {
      let response;
      try {
        response = await fetch(url, { headers: { Accept: "application/json" } });
      } catch (e) {
        showPageError(`The service cannot be reached (${e.message}). Is it still running?`);
        return;
      }
      if (response.status === 404) continue;
      const body = await readJson(response);
      if (!response.ok || !body) {
        showPageError(`Cannot read the model description: ${errorMessage(body, response)}`);
        return;
      }
      model = body;
      showModel(body);
      return;
    }
    showPageError("The service describes no model (neither /metadata nor /info answers).");
  }

  function showModel(info) {
    el("model-version").textContent = info.model_version || "unknown";
    const input = info.input || {};
    el("model-input").textContent = input.height ? `${input.width} × ${input.height} px` : "–";
    const categories = categoriesOf(info);
    const perCategory = info.threshold && info.threshold.per_category;
    el("model-threshold").textContent = perCategory && categories.length
      ? `per category (${categories.length})` : formatScore(info.threshold_value);
    if (categories.length) {
      const select = el("category");
      for (const name of categories) {
        const option = document.createElement("option");
        option.value = name;
        option.textContent = perCategory && name in perCategory
          ? `${name} (threshold ${formatScore(perCategory[name])})` : name;
        select.appendChild(option);
      }
      el("category-field").hidden = false;
    } else {
      el("results-table").classList.add("one-category"); // no category column to fill
    }
  }

  function formatBytes(n) {
    if (n >= 2 ** 20) return `${(n / 2 ** 20).toFixed(1)} MiB`;
    return n >= 1024 ? `${(n / 1024).toFixed(1)} KiB` : `${n} bytes`;
  }

  function tooLarge(file) {
    const limit = model && model.limits && model.limits.max_body_bytes;
    if (!limit || file.size <= limit) return null;
    return `${file.name}: ${formatBytes(file.size)} is over the service's upload limit of ${formatBytes(limit)}`;
  }

  function newCard(file) {
    const card = el("card-template").content.firstElementChild.cloneNode(true);
    card.querySelector(".card-title").textContent = file.name;
    const original = card.querySelector(".original");
    original.src = URL.createObjectURL(file); // released by "Clear"
    original.alt = `The uploaded image ${file.name}`;
    original.addEventListener("load", () => markSmall(original));
    original.addEventListener("error", () => { // e.g. TIFF, which browsers do not display
      original.closest("figure").querySelector("figcaption").textContent = "Image (no preview in this browser)";
    });
    card.classList.add("pending");
    card.querySelector(".verdict").textContent = "Inspecting…";
    el("no-results").hidden = true;
    el("cards").prepend(card);
    return card;
  }

  // Small images (a model's own 32–256 px inputs) are enlarged with visible pixels, not blurred.
  function markSmall(img) {
    if (img.naturalWidth && img.naturalWidth < 160) img.classList.add("small");
  }

  function showResult(card, r) {
    const anomalous = Boolean(r.label);
    card.classList.remove("pending");
    card.classList.add(anomalous ? "anomalous" : "normal");
    const verdict = card.querySelector(".verdict");
    verdict.textContent = anomalous ? "Anomalous" : "Normal";
    card.querySelector(".score").textContent = formatScore(r.score);
    card.querySelector(".comparator").textContent = anomalous ? ">" : "≤";
    card.querySelector(".threshold").textContent = formatScore(r.threshold);
    // The gauge spans 0 .. 2 x threshold, so the threshold mark sits in the middle.
    const span = r.threshold > 0 ? 2 * r.threshold : Math.max(1, Math.abs(r.score) * 2);
    const fraction = Math.min(1, Math.max(0, r.score / span));
    card.querySelector(".gauge-fill").style.width = `${(100 * fraction).toFixed(1)}%`;
    const heatmap = card.querySelector(".heatmap");
    if (r.heatmap_png) {
      heatmap.addEventListener("load", () => markSmall(heatmap));
      heatmap.alt = `Anomaly heat map of ${r.filename} over the image: red marks the most anomalous regions`;
      heatmap.src = `data:image/png;base64,${r.heatmap_png}`;
    } else {
      heatmap.closest("figure").hidden = true;
    }
  }

  function showError(card, message) {
    card.classList.remove("pending");
    card.classList.add("failed");
    card.querySelector(".verdict").textContent = "Not inspected";
    card.querySelector(".score-line").hidden = true;
    card.querySelector(".gauge").hidden = true;
    card.querySelector(".figures").hidden = true;
    card.querySelector(".error-message").textContent = message;
  }

  async function inspect(file, category) {
    const card = newCard(file);
    const row = { filename: file.name, category: category || "", verdict: "error", label: "", score: "",
                  threshold: "", milliseconds: "", width: "", height: "", model_version: "", message: "" };
    const refused = tooLarge(file);
    if (refused) {
      row.message = refused;
      showError(card, refused);
      return addRow(row);
    }
    const form = new FormData();
    form.append("file", file, file.name);
    const query = new URLSearchParams({ heatmap: "true" });
    if (category) query.set("category", category);
    let response;
    try {
      response = await fetch(`${PREDICT_URL}?${query}`, { method: "POST", body: form });
    } catch (e) {
      row.message = `${file.name}: the service cannot be reached (${e.message})`;
      showError(card, row.message);
      return addRow(row);
    }
    const body = await readJson(response);
    if (!response.ok || !body || Array.isArray(body)) {
      row.message = response.ok ? `${file.name}: unexpected answer from the service` : errorMessage(body, response);
      if (response.status === 503) row.message += " The service is busy: try again shortly.";
      showError(card, row.message);
      return addRow(row);
    }
    showResult(card, body);
    Object.assign(row, {
      verdict: body.label ? "anomalous" : "normal", label: body.label, score: body.score,
      threshold: body.threshold, milliseconds: body.milliseconds, width: body.width, height: body.height,
      model_version: body.model_version, category: body.category || row.category,
    });
    return addRow(row);
  }

  function addRow(row) {
    results.push(row);
    const tr = document.createElement("tr");
    tr.className = row.verdict;
    const ms = typeof row.milliseconds === "number" ? row.milliseconds.toFixed(0) : "";
    // [text, class] per column of the table's header
    const cells = [[String(results.length), "num"], [row.filename, "col-file"], [row.category || "–", "col-category"],
                   [row.verdict, "col-verdict"], [formatScore(row.score), "num"], [formatScore(row.threshold), "num"],
                   [ms, "num"], [row.message, "col-message"]];
    for (const [text, cls] of cells) {
      const td = document.createElement("td");
      td.textContent = text;
      td.className = cls;
      tr.appendChild(td);
    }
    el("results-body").appendChild(tr);
    el("download-csv").disabled = false;
    el("clear-results").disabled = false;
    return row.verdict !== "error";
  }

  const CSV_COLUMNS = ["filename", "category", "verdict", "label", "score", "threshold", "milliseconds",
                       "width", "height", "model_version", "message"];

  function csvField(value) {
    const text = value === null || value === undefined ? "" : String(value);
    return /[",\r\n]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
  }

  function downloadCsv() {
    const lines = [CSV_COLUMNS.join(",")];
    for (const row of results) lines.push(CSV_COLUMNS.map((c) => csvField(row[c])).join(","));
    const blob = new Blob([lines.join("\r\n") + "\r\n"], { type: "text/csv" });
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = "inspection_results.csv";
    document.body.appendChild(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 10000);
  }

  function clearResults() {
    results.length = 0;
    el("results-body").replaceChildren();
    for (const img of el("cards").querySelectorAll("img.original")) URL.revokeObjectURL(img.src);
    el("cards").replaceChildren();
    el("no-results").hidden = false;
    el("download-csv").disabled = true;
    el("clear-results").disabled = true;
    setStatus("");
  }

  let queue = Promise.resolve(); // images are sent one after another, in the order they were given

  function inspectAll(fileList) {
    const files = Array.from(fileList);
    if (!files.length) return;
    queue = queue.then(async () => {
      const category = el("category-field").hidden ? "" : el("category").value;
      let failed = 0;
      for (let i = 0; i < files.length; i++) {
        setStatus(`Inspecting ${files[i].name} (${i + 1} of ${files.length})…`);
        if (!(await inspect(files[i], category))) failed += 1;
      }
      const inspected = files.length - failed;
      setStatus(`Done: ${inspected} image${inspected === 1 ? "" : "s"} inspected` +
                (failed ? `, ${failed} not (see ${failed === 1 ? "its card" : "their cards"}).` : "."));
    });
  }

  function wireDropZone() {
    const zone = el("drop-zone");
    // A file dropped outside the zone would make the browser leave the page to show it.
    for (const type of ["dragover", "drop"]) window.addEventListener(type, (e) => e.preventDefault());
    zone.addEventListener("dragenter", (e) => { e.preventDefault(); zone.classList.add("dragging"); });
    zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("dragging"); });
    zone.addEventListener("dragleave", (e) => {
      if (!zone.contains(e.relatedTarget)) zone.classList.remove("dragging");
    });
    zone.addEventListener("drop", (e) => {
      e.preventDefault();
      zone.classList.remove("dragging");
      if (e.dataTransfer && e.dataTransfer.files) inspectAll(e.dataTransfer.files);
    });
  }

  document.addEventListener("DOMContentLoaded", () => {
    const input = el("file-input");
    input.addEventListener("change", () => {
      inspectAll(input.files);
      input.value = ""; // picking the same file again inspects it again
    });
    el("upload-form").addEventListener("submit", (e) => e.preventDefault());
    el("download-csv").addEventListener("click", downloadCsv);
    el("clear-results").addEventListener("click", clearResults);
    wireDropZone();
    const modelLoaded = loadModel();
    // Images picked before the model description arrives wait for it (the category list, the limits).
    queue = queue.then(() => modelLoaded);
  });
})();
