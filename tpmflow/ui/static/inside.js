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

$("lens").addEventListener("submit", lens);
$("steer").addEventListener("submit", steer);
$("scale").addEventListener("input", (e) => { $("scale-value").textContent = e.target.value; });
