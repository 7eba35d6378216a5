// A campaign run's page: polls the run's JSON every 2 s until the run has its run.json, then once
// more at most. Everything from the run (SMILES, errors, settings) is untrusted: it goes into the
// page as text (textContent) or as an <img> data: URL the server drew, never as HTML.
const root = document.getElementById("campaign");
const src = root.dataset.src;
const COLORS = ["#2a6fdb", "#d9480f", "#2b8a3e", "#862e9c", "#e67700", "#0b7285", "#c2255c", "#5c940d"];
const SVG_PREFIX = "data:image/svg+xml;base64,";
let chart = null;
let chartArms = "";

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function row(table, cells, header = false) {
  const tr = el("tr");
  for (const c of cells) tr.appendChild(el(header ? "th" : "td", c));
  table.appendChild(tr);
}

function fmt(v, digits = 3) {
  return typeof v === "number" ? v.toFixed(digits) : v === null || v === undefined ? "-" : String(v);
}

function drawChart(data) {
  const box = document.getElementById("chart");
  if (!data.x.length) {
    box.textContent = "No simulation has finished yet.";
    return;
  }
  const series = [data.x, ...data.arms.map((a) => data.best_so_far[a])];
  const arms = data.arms.join("\n");
  if (chart && arms === chartArms) {
    chart.setData(series);
    return;
  }
  if (chart) chart.destroy();
  box.textContent = "";
  chartArms = arms;
  chart = new uPlot(
    {
      width: Math.min(900, box.clientWidth || 900),
      height: 300,
      scales: { x: { time: false } },
      series: [
        { label: "simulations" },
        ...data.arms.map((a, i) => ({ label: a, stroke: COLORS[i % COLORS.length], width: 2, spanGaps: false })),
      ],
      axes: [{ label: "simulations", incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000] }, { label: "best objective" }],
    },
    series,
    box,
  );
}

function drawMolecules(data) {
  const box = document.getElementById("molecules");
  box.replaceChildren();
  if (!data.top.length) {
    box.appendChild(el("p", "No molecule with a finite objective yet.", "muted"));
    return;
  }
  for (const m of data.top) {
    const card = el("figure");
    if (typeof m.image === "string" && m.image.startsWith(SVG_PREFIX)) {
      const img = el("img");
      img.src = m.image;
      img.alt = m.smiles;
      card.appendChild(img);
    }
    const caption = el("figcaption");
    caption.appendChild(el("code", m.smiles, "smiles"));
    caption.appendChild(el("div", `${fmt(m.objective)} · ${m.arm}, seed ${m.seed} · ${m.source}`, "small"));
    card.appendChild(caption);
    box.appendChild(card);
  }
}

function drawFailures(data) {
  const box = document.getElementById("failures");
  box.replaceChildren();
  if (!data.failures) return;
  box.appendChild(el("h2", `Failed simulations (${data.failures})`));
  const table = el("table");
  row(table, ["Arm", "Seed", "Index", "Error"], true);
  for (const f of data.errors) row(table, [f.arm, f.seed, f.index, f.error]);
  box.appendChild(table);
  if (data.errors.length < data.failures) box.appendChild(el("p", "The latest ones.", "small"));
}

function drawRecord(run) {
  document.getElementById("finished").hidden = false;
  const results = document.getElementById("results");
  results.replaceChildren();
  row(results, ["Arm", "Best (mean ± std)", "Per seed", "Simulations", "Failed", "Proposals simulated", "TPM failures"], true);
  const ranked = Object.entries(run.results || {}).sort((a, b) => (b[1].best_mean ?? -Infinity) - (a[1].best_mean ?? -Infinity));
  for (const [arm, r] of ranked) {
    const perSeed = (r.best_per_seed || []).map((v) => fmt(v)).join(", ");
    row(results, [arm, `${fmt(r.best_mean)} ± ${fmt(r.best_std)}`, perSeed, r.simulations, r.failed, r.proposed_simulated, r.tpm_failures]);
  }
  drawUsage(document.getElementById("usage"), run.ledger_usage);
  const settings = document.getElementById("settings");
  settings.replaceChildren();
  row(settings, ["seeds", (run.seeds || []).join(", ")]);
  if (run.model) row(settings, ["model", `${run.model.name ?? ""} ${run.model.content_hash ?? ""}`]);
  if (run.seconds !== null && run.seconds !== undefined) row(settings, ["seconds", run.seconds]);
  for (const [k, v] of Object.entries(run.settings || {})) {
    row(settings, [k, typeof v === "object" && v !== null ? JSON.stringify(v) : String(v)]);
  }
}

function drawUsage(table, usage) {
  table.replaceChildren();
  row(table, ["Principal", "TPM calls", "Prompt tokens", "Output tokens", "SU"], true);
  if (usage === null || usage === undefined) {
    row(table, ["(shown to the campaign's principal and to admins)", "", "", "", ""]);
    return;
  }
  for (const u of usage) {
    row(table, [u.principal ?? u.project, u.requests, u.prompt_tokens, u.output_tokens, fmt(u.charge_su, 4)]);
  }
}

async function load() {
  let data;
  try {
    const resp = await fetch(src, { headers: { Accept: "application/json" } });
    if (resp.redirected) {
      window.location.assign("/ui/signin"); // the session ended
      return;
    }
    if (resp.status === 404) {
      document.getElementById("status").textContent = "This run is no longer listed here.";
      return;
    }
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    data = await resp.json();
  } catch (err) {
    document.getElementById("status").textContent = `Could not read the run (${err.message}); retrying.`;
    setTimeout(load, 5000);
    return;
  }
  const state = data.finished ? "finished" : "running, updated every 2 s";
  document.getElementById("status").textContent =
    `${data.simulations} simulations, ${data.failures} failed, best ${fmt(data.best)} (${state}).`;
  drawChart(data);
  drawMolecules(data);
  drawFailures(data);
  if (data.run) drawRecord(data.run);
  document.getElementById("live").hidden = !data.live_usage;
  if (data.live_usage) drawUsage(document.getElementById("live-usage"), data.live_usage);
  if (!data.finished) setTimeout(load, 2000);
}

load();
