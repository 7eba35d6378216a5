// Inside the model: a logit-lens heatmap and a steering playground, both through the gateway's
// own /v1/tpmflow/probe (the probe permission, metering and limits are the API's). Text from the
// model is written with textContent only.
const csrf = document.querySelector("main").dataset.csrf;
const $ = (id) => document.getElementById(id);

async function probe(body) {
  const resp = await fetch("/v1/tpmflow/probe", {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-Tpmflow-CSRF": csrf },
    body: JSON.stringify(body),
  });
  const answer = await resp.json();
  if (!resp.ok) {
    const e = answer.error || {};
    throw new Error(`${resp.status} ${e.type || ""}: ${e.message || resp.statusText}`);
  }
  return answer;
}

// -- logit lens ----------------------------------------------------------------------------------

function colour(p) {
  // viridis-like ramp from dark blue (0) to yellow (1)
  const stops = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  const x = Math.max(0, Math.min(1, p)) * (stops.length - 1);
  const i = Math.min(stops.length - 2, Math.floor(x));
  const f = x - i;
  const c = stops[i].map((v, k) => Math.round(v + f * (stops[i + 1][k] - v)));
  return `rgb(${c[0]}, ${c[1]}, ${c[2]})`;
}

async function lens(event) {
  event.preventDefault();
  const form = new FormData(event.target);
  $("lens-error").textContent = "";
  const grid = $("heatmap");
  grid.replaceChildren();
  $("run-lens").disabled = true;
  try {
    const answer = await probe({ prompt: form.get("prompt"), lens: { top_k: Number(form.get("top_k")) } });
    const layers = answer.lens;
    const tokens = answer.prompt_tokens;
    grid.style.gridTemplateColumns = `auto repeat(${tokens.length}, minmax(2.4em, 1fr))`;
    for (let row = layers.length - 1; row >= 0; row--) {
      const layer = layers[row];
      const label = document.createElement("div");
      label.className = "label";
      label.textContent = `layer ${layer.layer}`;
      grid.append(label);
      layer.positions.forEach((pos, r) => {
        const cell = document.createElement("div");
        cell.className = "cell";
        const p = layer.probs[r][0];
        cell.style.background = colour(p);
        cell.style.color = p > 0.6 ? "#000" : "#fff";
        cell.textContent = layer.tokens[r][0];
        cell.title = layer.tokens[r].map((t, k) => `${JSON.stringify(t)} ${(layer.probs[r][k] * 100).toFixed(1)}%`).join("\n");
        cell.dataset.layer = layer.layer;
        cell.dataset.position = pos;
        grid.append(cell);
      });
    }
    grid.append(document.createElement("div"));
    for (const token of tokens) {
      const head = document.createElement("div");
      head.className = "label token";
      head.textContent = token;
      grid.append(head);
    }
    $("lens-caption").textContent = `${layers.length} layers x ${tokens.length} positions; each cell: the predicted next token after that layer.`;
  } catch (err) {
    $("lens-error").textContent = String(err.message || err);
  } finally {
    $("run-lens").disabled = false;
  }
}

// -- steering --------------------------------------------------------------------------------------

function decode(array) {
  if (!array || !array.b64) throw new Error("the activation came back by reference: too large for the playground");
  const bytes = Uint8Array.from(atob(array.b64), (c) => c.charCodeAt(0));
  return new Float32Array(bytes.buffer);
}

function encode(values) {
  const bytes = new Uint8Array(new Float32Array(values).buffer);
  let text = "";
  for (const b of bytes) text += String.fromCharCode(b);
  return { dtype: "float32", shape: [values.length], b64: btoa(text) };
}

// The residual stream after ``layer`` at the prompt's last position.
async function lastResidual(prompt, layer) {
  const answer = await probe({ prompt, captures: [{ site: "hook_resid_post", layers: [layer] }] });
  const array = answer.captures[0].array;
  const values = decode(array);
  const hidden = array.shape[array.shape.length - 1];
  return values.slice(values.length - hidden);
}

async function steer(event) {
  event.preventDefault();
  const form = new FormData(event.target);
  const layer = Number(form.get("layer"));
  const scale = Number(form.get("scale"));
  const maxTokens = Number(form.get("max_tokens"));
  $("steer-error").textContent = "";
  $("with").textContent = "";
  $("without").textContent = "";
  $("run-steer").disabled = true;
  try {
    const [plus, minus] = await Promise.all([lastResidual(form.get("plus"), layer), lastResidual(form.get("minus"), layer)]);
    const vector = Array.from(plus, (v, i) => v - minus[i]);
    const prompt = form.get("prompt");
    const [without, withVector] = await Promise.all([
      probe({ prompt, max_tokens: maxTokens }),
      probe({
        prompt,
        max_tokens: maxTokens,
        interventions: [{ op: "add", site: "hook_resid_post", layer, vector: encode(vector), scale }],
      }),
    ]);
    $("without").textContent = prompt + without.text;
    $("with").textContent = prompt + withVector.text;
  } catch (err) {
    $("steer-error").textContent = String(err.message || err);
  } finally {
    $("run-steer").disabled = false;
  }
}

// -- activation patching -------------------------------------------------------------------------

const TOP_K = 20;

// The probability the final layer gives ``token`` at the prompt's last position (0 when it is
// not among the top TOP_K: then it is below the smallest of them).
function finalProb(answer, token) {
  const last = answer.lens[answer.lens.length - 1];
  const k = last.token_ids[last.token_ids.length - 1].indexOf(token);
  return k < 0 ? 0 : last.probs[last.probs.length - 1][k];
}

async function patch(event) {
  event.preventDefault();
  const form = new FormData(event.target);
  const clean = form.get("clean"), corrupt = form.get("corrupt");
  const grid = $("patchmap");
  grid.replaceChildren();
  $("patch-error").textContent = "";
  $("patch-caption").textContent = "";
  $("run-patch").disabled = true;
  try {
    const site = "hook_resid_post";
    const first = await probe({ prompt: clean, captures: [{ site }], lens: { top_k: TOP_K } });
    const layers = first.captures.length, last = first.lens[first.lens.length - 1].layer;
    const base = await probe({ prompt: corrupt, lens: { layers: [last], top_k: TOP_K } });
    const n = first.prompt_tokens.length;
    const lens = { layers: [last], top_k: TOP_K, positions: [n - 1] };
    if (base.prompt_tokens.length !== n) {
      throw new Error(`the prompts must have the same number of tokens: clean has ${n}, corrupted ${base.prompt_tokens.length}`);
    }
    const top = first.lens[first.lens.length - 1];
    const target = top.token_ids[n - 1][0], targetText = top.tokens[n - 1][0];
    const pClean = top.probs[n - 1][0], pCorrupt = finalProb(base, target);
    const jobs = [];
    for (const cap of first.captures) {
      const values = decode(cap.array), hidden = cap.array.shape[cap.array.shape.length - 1];
      for (let pos = 0; pos < n; pos++) {
        const row = Array.from(values.slice(pos * hidden, (pos + 1) * hidden));
        jobs.push({ layer: cap.layer, pos, body: { prompt: corrupt, lens,
          interventions: [{ op: "replace", site, layer: cap.layer, positions: [pos], values: encode(row) }] } });
      }
    }
    let done = 0;
    const results = [];
    for (let i = 0; i < jobs.length; i += 8) {  // 8 at a time: the engine batches them
      const batch = jobs.slice(i, i + 8);
      const answers = await Promise.all(batch.map((j) => probe(j.body)));
      answers.forEach((a, k) => results.push({ ...batch[k], p: finalProb(a, target) }));
      done += batch.length;
      $("patch-status").textContent = `${done} of ${jobs.length} patched runs`;
    }
    const span = pClean - pCorrupt || 1;
    grid.style.gridTemplateColumns = `auto repeat(${n}, minmax(2.4em, 1fr))`;
    const layerIds = [...new Set(results.map((r) => r.layer))].sort((a, b) => b - a);
    for (const layer of layerIds) {
      const label = document.createElement("div");
      label.className = "label";
      label.textContent = `layer ${layer}`;
      grid.append(label);
      for (const r of results.filter((x) => x.layer === layer).sort((a, b) => a.pos - b.pos)) {
        const restored = (r.p - pCorrupt) / span;
        const c = document.createElement("div");
        c.className = "cell";
        c.style.background = colour(Math.max(0, Math.min(1, restored)));
        c.style.color = restored > 0.6 ? "#000" : "#fff";
        c.textContent = restored.toFixed(2);
        c.title = `patched p(${JSON.stringify(targetText)}) = ${(r.p * 100).toFixed(1)}%`;
        c.dataset.layer = layer;
        c.dataset.position = r.pos;
        grid.append(c);
      }
    }
    grid.append(document.createElement("div"));
    for (const token of base.prompt_tokens) {
      const head = document.createElement("div");
      head.className = "label token";
      head.textContent = token;
      grid.append(head);
    }
    $("patch-status").textContent = "";
    $("patch-caption").textContent = `${layers} layers x ${n} positions patched from the clean prompt; the clean prompt predicts ${JSON.stringify(targetText)} with ${(pClean * 100).toFixed(1)}%, the corrupted with ${(pCorrupt * 100).toFixed(1)}%.`;
  } catch (err) {
    $("patch-error").textContent = String(err.message || err);
  } finally {
    $("run-patch").disabled = false;
  }
}

$("patch").addEventListener("submit", patch);
$("lens").addEventListener("submit", lens);
$("steer").addEventListener("submit", steer);
$("scale").addEventListener("input", (e) => { $("scale-value").textContent = e.target.value; });
