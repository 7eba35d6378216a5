// The Generate page: streams a completion from the gateway's own /v1/completions (the session
// cookie goes with it; the CSRF header proves this page sent it) and shows what the ledger will:
// tokens, the charge, and the provenance headers. Every value is written as text, never as HTML.
const main = document.querySelector("main");
const csrf = main.dataset.csrf;
const $ = (id) => document.getElementById(id);

// Chat mode keeps the conversation here (the page's memory only) and sends it whole each turn.
const history = [];

function showConversation() {
  const box = $("conversation");
  box.replaceChildren();
  for (const turn of history) {
    const p = document.createElement("p");
    p.className = `turn ${turn.role}`;
    p.textContent = `${turn.role}: ${turn.content}`;
    box.append(p);
  }
  box.hidden = history.length === 0;
}

async function generate(event) {
  event.preventDefault();
  const form = new FormData(event.target);
  const chat = form.get("mode") === "chat";
  const prompt = form.get("prompt");
  const body = {
    max_tokens: Number(form.get("max_tokens")),
    temperature: Number(form.get("temperature")),
    seed: Number(form.get("seed")),
    stream: true,
    stream_options: { include_usage: true },
  };
  if (chat) {
    history.push({ role: "user", content: prompt });
    body.messages = history.slice();
  } else {
    body.prompt = prompt;
  }
  $("answer").hidden = false;
  $("prompt-echo").textContent = prompt;
  $("output").textContent = "";
  $("error").textContent = "";
  for (const id of ["tokens", "charge", "version", "replica", "request", "seed"]) $(id).textContent = "";
  $("run").disabled = true;
  try {
    const resp = await fetch(chat ? "/v1/chat/completions" : "/v1/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-Tpmflow-CSRF": csrf },
      body: JSON.stringify(body),
    });
    $("version").textContent = resp.headers.get("X-Tpmflow-Content-Hash") || "";
    $("replica").textContent = resp.headers.get("X-Tpmflow-Replica") || "";
    $("request").textContent = resp.headers.get("X-Request-Id") || "";
    $("seed").textContent = String(body.seed);
    if (!resp.ok) {
      const err = await resp.json().catch(() => ({}));
      $("error").textContent = `${resp.status}: ${err.error ? `${err.error.type}: ${err.error.message}` : resp.statusText}`;
      if (chat) history.pop();
      return;
    }
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffered = "";
    let usage = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffered += decoder.decode(value, { stream: true });
      const lines = buffered.split("\n");
      buffered = lines.pop();
      for (const line of lines) {
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const chunk = JSON.parse(line.slice(6));
        if (chunk.error) throw new Error(`${chunk.error.type || "Error"}: ${chunk.error.message || ""}`);
        if (chunk.choices && chunk.choices.length) {
          const choice = chunk.choices[0];
          $("output").textContent += chat ? (choice.delta && choice.delta.content) || "" : choice.text || "";
        }
        if (chunk.usage) usage = chunk.usage;
      }
    }
    if (chat) {
      history.push({ role: "assistant", content: $("output").textContent });
      showConversation();
    }
    if (usage) {
      $("tokens").textContent = `${usage.prompt_tokens} prompt + ${usage.completion_tokens} output`;
      const charge = await chargeOf($("request").textContent);
      $("charge").textContent = charge === null ? "(on the ledger shortly)" : `${charge.toFixed(6)} SU`;
    }
  } catch (err) {
    $("error").textContent = String(err.message || err);
    if (chat && history.length && history[history.length - 1].role === "user") history.pop();
  } finally {
    $("run").disabled = false;
  }
}

// The SU charged for a request, read back from the ledger (its row is completed just after the
// stream's last chunk, so ask a few times).
async function chargeOf(requestId) {
  for (let i = 0; i < 40; i++) {
    const resp = await fetch(`/v1/tpmflow/usage/request?id=${encodeURIComponent(requestId)}`, {
      headers: { "X-Tpmflow-CSRF": csrf },
    });
    if (!resp.ok) return null;
    const body = await resp.json();
    if (body.finished) return body.charge_su;
    await new Promise((done) => setTimeout(done, 250));
  }
  return null;
}

$("generate").addEventListener("submit", generate);
$("new-chat").addEventListener("click", () => {
  history.length = 0;
  showConversation();
});
