// The Examples page: "Run it" hands the example to its page through sessionStorage (this origin's
// alone, port included) and opens it; the page (example.js) fills it in and runs it once. A link
// from elsewhere can open a page, never make it act.
for (const button of document.querySelectorAll(".run-example")) {
  button.addEventListener("click", () => {
    const example = JSON.parse(button.dataset.example);
    sessionStorage.setItem("tpmflow-example", button.dataset.example);
    window.location.assign(example.page);
  });
}
