// What every workbench script shares: calls to the gateway's own API with the session cookie
// (sent by the browser) and the page's CSRF header, errors turned into messages, and arrays of
// the API's inline form decoded.
export const csrf = document.querySelector("main").dataset.csrf;
export const $ = (id) => document.getElementById(id);

async function answer(resp) {
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok) {
    const e = body.error || {};
    throw new Error(`${resp.status} ${e.type || resp.statusText}: ${e.message || ""}`);
  }
  return body;
}

export async function api(path, body) {
  const resp = await fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-Tpmflow-CSRF": csrf },
    body: JSON.stringify(body),
  });
  return answer(resp);
}

export async function upload(path, form) {
  const resp = await fetch(path, { method: "POST", headers: { "X-Tpmflow-CSRF": csrf }, body: form });
  return answer(resp);
}

// An InlineArray ({dtype, shape, b64}, little-endian) as a Float32Array; null for a reference.
export function decodeArray(a) {
  if (!a || !a.b64) return null;
  const raw = Uint8Array.from(atob(a.b64), (c) => c.charCodeAt(0));
  if (a.dtype === "float32") return new Float32Array(raw.buffer);
  if (a.dtype === "float64") return Float32Array.from(new Float64Array(raw.buffer));
  const half = new Uint16Array(raw.buffer);
  const out = new Float32Array(half.length);
  const view = new DataView(new ArrayBuffer(4));
  for (let i = 0; i < half.length; i++) {
    if (a.dtype === "bfloat16") {
      view.setUint32(0, half[i] << 16);
      out[i] = view.getFloat32(0);
    } else {  // float16
      const h = half[i], s = h & 0x8000 ? -1 : 1, e = (h >> 10) & 0x1f, f = h & 0x3ff;
      out[i] = e === 0 ? s * 2 ** -14 * (f / 1024) : e === 31 ? (f ? NaN : s * Infinity) : s * 2 ** (e - 15) * (1 + f / 1024);
    }
  }
  return out;
}

export function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}
