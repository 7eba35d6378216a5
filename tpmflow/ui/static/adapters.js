// The Adapters page. Everything the model computes comes from the gateway's adapter routes
// (/v1/tpmflow/adapters/{embed,predict,generate}); the server only draws molecules (RDKit, in a
// sandbox) and stores uploads. SMILES, errors and outputs are written as text; drawings are <img>.
import { $, api, cell, decodeArray, upload } from "/ui/static/api.js";

const parts = JSON.parse($("adapter").dataset.parts);

function fillParts() {
  const mine = parts[$("adapter").value] || { heads: [], projectors: [] };
  for (const [id, names] of [["head", mine.heads], ["part", mine.projectors]]) {
    const select = $(id);
    select.replaceChildren(new Option("(none)", ""));
    for (const name of names) select.add(new Option(name, name));
  }
  if (mine.projectors.length) $("part").value = mine.projectors[0];
}
$("adapter").addEventListener("change", fillParts);
fillParts();

// The adapter's settings for a request: the projector a file adapter's encoder was trained as.
function settings() {
  return $("part").value ? { config: { part: $("part").value } } : {};
}

// Drawings in batches of 64 (the server's cap per request).
async function drawAll(smiles) {
  const out = [];
  for (let i = 0; i < smiles.length; i += 64) {
    out.push(...(await api("/ui/adapters/draw", { smiles: smiles.slice(i, i + 64) })).drawings);
  }
  return { drawings: out };
}

function lines() {
  return $("smiles").value.split("\n").map((s) => s.trim()).filter(Boolean);
}

function cosine(a, b) {
  let ab = 0, aa = 0, bb = 0;
  for (let i = 0; i < a.length; i++) { ab += a[i] * b[i]; aa += a[i] * a[i]; bb += b[i] * b[i]; }
  return ab / Math.sqrt(aa * bb || 1);
}

function image(src, alt) {
  const img = document.createElement("img");
  img.src = src;
  img.alt = alt;
  img.className = "mol";
  return img;
}

function shown(prediction) {
  if (!prediction) return "";
  if (prediction.error) return `error: ${prediction.error.message}`;
  if (prediction.label !== null && prediction.label !== undefined) {
    const p = prediction.probabilities ? prediction.probabilities[prediction.label] : null;
    return p === null || p === undefined ? prediction.label : `${prediction.label} (${p.toFixed(2)})`;
  }
  return prediction.value === null || prediction.value === undefined ? "" : prediction.value.toFixed(3);
}

async function look() {
  const items = lines();
  const adapter = $("adapter").value, head = $("head").value;
  $("error").textContent = "";
  $("status").textContent = `drawing and embedding ${items.length} item(s)…`;
  $("look").disabled = true;
  try {
    const [drawn, embedded, predicted] = await Promise.all([
      adapter.startsWith("smiles") ? drawAll(items).catch(() => null) : null,
      api("/v1/tpmflow/adapters/embed", { adapter, items, pooling: "mean", ...settings() }),
      head ? api("/v1/tpmflow/adapters/predict", { adapter, items, head, ...settings() }) : null,
    ]);
    const vectors = embedded.data.map((d) => decodeArray(d.embedding));
    const body = $("molecules").tBodies[0];
    body.replaceChildren();
    items.forEach((smiles, i) => {
      const row = body.insertRow();
      const d = embedded.data[i];
      row.className = d.error ? "down" : "";
      cell(row, String(i));
      const pic = row.insertCell();
      const drawing = drawn ? drawn.drawings[i] : null;
      if (drawing && drawing.image) pic.append(image(drawing.image, smiles));
      else pic.textContent = drawing ? drawing.error : "";
      cell(row, smiles, "smiles");
      cell(row, d.error ? `${d.error.type}: ${d.error.message}` : `ok, ${d.n_tokens} tokens`, "verdict");
      let best = null;
      if (vectors[i]) {
        vectors.forEach((v, j) => {
          if (j !== i && v) {
            const s = cosine(vectors[i], v);
            if (!best || s > best.s) best = { j, s };
          }
        });
      }
      cell(row, best ? `#${best.j} ${items[best.j]} (${best.s.toFixed(3)})` : "", "neighbour");
      cell(row, predicted ? shown(predicted.data[i]) : "", "prediction");
    });
    $("molecules").hidden = false;
    const bad = embedded.data.filter((d) => d.error).length;
    $("status").textContent = `${items.length - bad} read, ${bad} refused by the adapter · ${embedded.usage.prompt_tokens} tokens · replica ${embedded.provenance.replica_id}`;
  } catch (err) {
    $("error").textContent = err.message;
    $("status").textContent = "";
  } finally {
    $("look").disabled = false;
  }
}

async function generate() {
  const items = lines();
  $("error").textContent = "";
  $("status").textContent = `generating from ${items.length} prefix(es)…`;
  $("generate").disabled = true;
  try {
    const out = await api("/v1/tpmflow/adapters/generate", {
      adapter: $("adapter").value, items, n: Number($("n").value), max_tokens: 64,
      temperature: Number($("temperature").value), seed: 0,
    });
    const made = [];
    out.data.forEach((d) => {
      if (d.error) made.push({ prefix: items[d.index], text: "", why: `${d.error.type}: ${d.error.message}` });
      for (const o of d.outputs) made.push({ prefix: items[d.index], text: o.text, why: o.reason || "" });
    });
    const drawn = await drawAll(made.map((m) => m.text || " ")).catch(() => ({ drawings: made.map(() => ({})) }));
    const grid = $("generated");
    grid.replaceChildren();
    made.forEach((m, k) => {
      const fig = document.createElement("figure");
      const drawing = drawn.drawings[k];
      if (drawing.image) fig.append(image(drawing.image, m.text));
      const cap = document.createElement("figcaption");
      cap.textContent = `${m.text || "(nothing)"}  ← ${m.prefix}${m.why ? ` · ${m.why}` : ""}`;
      fig.append(cap);
      grid.append(fig);
    });
    $("status").textContent = `${made.length} molecule(s) generated · ${out.usage.completion_tokens} tokens`;
  } catch (err) {
    $("error").textContent = err.message;
    $("status").textContent = "";
  } finally {
    $("generate").disabled = false;
  }
}

// -- files: a point cloud as a 3-D scatter (drag to turn), a frame as the image the encoder sees --

let points = null, yaw = 0.6, pitch = 0.4;

function drawPoints() {
  const canvas = $("view"), g = canvas.getContext("2d");
  g.fillStyle = "#10141c";
  g.fillRect(0, 0, canvas.width, canvas.height);
  const mean = [0, 1, 2].map((k) => points.reduce((s, p) => s + p[k], 0) / points.length);
  const scale = Math.max(...points.map((p) => Math.hypot(p[0] - mean[0], p[1] - mean[1], p[2] - mean[2]))) || 1;
  const [cy, sy, cp, sp] = [Math.cos(yaw), Math.sin(yaw), Math.cos(pitch), Math.sin(pitch)];
  const projected = points.map((p) => {
    const x = (p[0] - mean[0]) / scale, y = (p[1] - mean[1]) / scale, z = (p[2] - mean[2]) / scale;
    const x1 = cy * x + sy * z, z1 = -sy * x + cy * z;
    return [x1, cp * y - sp * z1, sp * y + cp * z1];
  }).sort((a, b) => a[2] - b[2]);
  for (const [x, y, z] of projected) {
    const light = Math.round(120 + 120 * (z + 1) / 2);
    g.fillStyle = `rgb(${light >> 1}, ${light}, 255)`;
    g.fillRect(210 + x * 190, 210 - y * 190, 2, 2);
  }
}

function drawFrame(frame) {
  const canvas = $("view"), g = canvas.getContext("2d");
  const img = g.createImageData(frame.size, frame.size);
  frame.pixels.forEach((v, i) => { img.data.set([v, v, v, 255], i * 4); });
  const tmp = document.createElement("canvas");
  tmp.width = tmp.height = frame.size;
  tmp.getContext("2d").putImageData(img, 0, 0);
  g.imageSmoothingEnabled = false;
  g.drawImage(tmp, 0, 0, canvas.width, canvas.height);
}

let dragging = null;
$("view").addEventListener("pointerdown", (e) => { dragging = [e.clientX, e.clientY]; });
window.addEventListener("pointerup", () => { dragging = null; });
$("view").addEventListener("pointermove", (e) => {
  if (!dragging || !points) return;
  yaw += (e.clientX - dragging[0]) / 100;
  pitch += (e.clientY - dragging[1]) / 100;
  dragging = [e.clientX, e.clientY];
  drawPoints();
});

async function uploadFile() {
  const file = $("file").files[0];
  $("file-error").textContent = "";
  if (!file) { $("file-error").textContent = "choose a file first"; return; }
  const adapter = $("adapter").value, head = $("head").value;
  const form = new FormData();
  form.append("adapter", adapter);
  if ($("part").value) form.append("part", $("part").value);
  form.append("file", file);
  $("file-status").textContent = `uploading ${file.name} (${file.size} bytes)…`;
  $("upload").disabled = true;
  try {
    const up = await upload("/ui/adapters/upload", form);
    $("file-result").hidden = false;
    $("file-name").textContent = `${up.name}, ${up.nbytes} bytes, stored as ${up.reference.key}`;
    points = null;
    if (up.read.error) {
      $("file-read").textContent = `the adapter refused it: ${up.read.error}`;
      $("view").hidden = true;
    } else if (up.read.points) {
      points = up.read.points;
      $("file-read").textContent = `${points.length} points sampled by the adapter (drag the view to turn it)`;
      $("view").hidden = false;
      drawPoints();
    } else if (up.read.frame) {
      $("file-read").textContent = `a ${up.read.frame.size} x ${up.read.frame.size} frame, as the encoder sees it`;
      $("view").hidden = false;
      drawFrame(up.read.frame);
    } else {
      $("file-read").textContent = `read as an array of shape ${JSON.stringify(up.read.shape)}`;
    }
    $("file-status").textContent = "embedding through the pool…";
    const [embedded, predicted] = await Promise.all([
      api("/v1/tpmflow/adapters/embed", { adapter, items: [up.reference], pooling: "mean", ...settings() }),
      head ? api("/v1/tpmflow/adapters/predict", { adapter, items: [up.reference], head, ...settings() }) : null,
    ]);
    const d = embedded.data[0], v = decodeArray(d.embedding);
    $("file-embedding").textContent = d.error
      ? `${d.error.type}: ${d.error.message}`
      : `${d.n_tokens} tokens; vector of ${v ? v.length : "?"} (norm ${v ? Math.hypot(...v).toFixed(3) : "?"})`;
    $("file-prediction").textContent = predicted ? shown(predicted.data[0]) : "(choose a head)";
    $("file-status").textContent = "";
  } catch (err) {
    $("file-error").textContent = err.message;
    $("file-status").textContent = "";
  } finally {
    $("upload").disabled = false;
  }
}

$("look").addEventListener("click", look);
$("generate").addEventListener("click", generate);
$("upload").addEventListener("click", uploadFile);
