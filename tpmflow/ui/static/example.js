// One-click examples (the Examples page links here): /ui/generate?form=generate&prompt=CC(
// fills the fields of form "generate" by name and submits it; ?click=look&smiles=… fills the
// elements with those ids and clicks the button "look". Values are set as values, never as HTML.
const params = new URLSearchParams(location.search);
const formId = params.get("form"), click = params.get("click");
if (formId || click) {
  const form = formId ? document.getElementById(formId) : null;
  for (const [key, value] of params) {
    if (key === "form" || key === "click") continue;
    const field = form ? form.elements.namedItem(key) : document.getElementById(key);
    if (field && "value" in field) {
      field.value = value;
      field.dispatchEvent(new Event("input"));
      field.dispatchEvent(new Event("change"));
    }
  }
  if (form) form.requestSubmit();
  else if (click && document.getElementById(click)) document.getElementById(click).click();
}
