// Runs the example the Examples page handed over (sessionStorage, set only by that page's own
// script), once: fills the fields of an allowed form by name (or elements by id) and submits it
// (or clicks an allowed button). Only these pages' read-only actions, never a form that changes
// anything; values are set as values, never as HTML.
const ALLOWED = {
  "/ui/generate": { form: ["generate"] },
  "/ui/adapters": { click: ["look", "generate"] },
  "/ui/inside": { form: ["lens", "steer", "patch"] },
};
const handed = sessionStorage.getItem("tpmflow-example");
sessionStorage.removeItem("tpmflow-example");
let example = null;
try { example = JSON.parse(handed); } catch { example = null; }
const allowed = example && example.page === window.location.pathname ? ALLOWED[example.page] : null;
if (allowed) {
  const form = example.form && allowed.form && allowed.form.includes(example.form) ? document.getElementById(example.form) : null;
  const button = example.click && allowed.click && allowed.click.includes(example.click) ? document.getElementById(example.click) : null;
  if (form || button) {
    for (const [key, value] of Object.entries(example.fields || {})) {
      const field = form ? form.elements.namedItem(key) : document.getElementById(key);
      if (field && "value" in field) {
        field.value = String(value);
        field.dispatchEvent(new Event("input"));
        field.dispatchEvent(new Event("change"));
      }
    }
    if (form) form.requestSubmit();
    else button.click();
  }
}
